"""What an export directory holds, and reading its metadata.

No jax and no TensorFlow here: a serving process that runs `model.onnx`
(`runtimes.py`) imports only numpy and its runtime.
"""

from __future__ import annotations

import json

import numpy as np

FORMAT_VERSION = 1
EXPORT_FILE = "model.jax_export"
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
SAVED_MODEL_DIR = "saved_model"
OUTPUT_NAMES = ("maps", "scores")
RUNTIMES = ("jax", "onnxruntime", "openvino")  # predict.runtime (runtimes.py)
PRECISIONS = ("float32", "bfloat16")  # predict.precision (OpenVINO only)


def read_metadata(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read export metadata {path}: {e}") from None
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"export metadata {path} has format_version {version!r}; this code "
            f"reads version {FORMAT_VERSION}"
        )
    return metadata


def checked_images(images_uint8, size: int, directory: str) -> np.ndarray:
    """The batch as a contiguous uint8 array, or a ValueError naming the contract."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"the model exported in {directory} expects uint8 images "
            f"[B, {size}, {size}, 3] (see export.preprocess_for_export), got "
            f"{images.dtype} {images.shape}"
        )
    return np.ascontiguousarray(images)
