"""Deployment runtimes for an exported model: ONNX Runtime and OpenVINO.

`--config.predict.runtime=onnxruntime|openvino` scores images with the
`model.onnx` that `--config.mode=export` wrote, exactly as a serving system
would run it; `jax` (the default) scores them with the checkpoint in process.
Each runtime is an extra of its own (`pip install 'recontrast_jax[onnxruntime]'`
or `[openvino]`). Loading a model here imports neither jax nor TensorFlow, so a
serving process holds only numpy, the runtime and the model.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

import numpy as np

from recontrast_jax import export_format

RUNTIMES = export_format.RUNTIMES
PRECISIONS = export_format.PRECISIONS

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class RuntimeUnavailable(RuntimeError):
    """A runtime that cannot run here (not installed, no bfloat16, no model)."""


def _import(module: str):
    if module == "openvino":
        # Importing OpenVINO sends a usage event from a forked process
        # (openvino_telemetry): a fork of a running JAX process can deadlock,
        # and inspection machines are often offline. Its stub is used instead.
        sys.modules.setdefault("openvino_telemetry", None)
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeUnavailable(
            f"predict.runtime={module!r} needs pip install 'recontrast_jax[{module}]'"
        ) from None


def onnx_path(directory: str) -> str:
    """The export's `model.onnx`, with one clear error line when it is missing."""
    path = os.path.join(directory, export_format.ONNX_FILE)
    if not os.path.isfile(path):
        raise RuntimeUnavailable(
            f"no ONNX model {path}: run --config.mode=export first (with the "
            "'onnx' extra installed)"
        )
    return path


def load_onnxruntime(
    path: str, precision: str = "float32", threads: int = 0
) -> Predict:
    """`predict(images_uint8) -> (maps, scores)` on ONNX Runtime's CPU provider."""
    if precision != "float32":
        raise RuntimeUnavailable(
            f"predict.precision={precision!r} needs predict.runtime='openvino'; "
            "ONNX Runtime runs the model in float32"
        )
    ort = _import("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def predict(images: np.ndarray):
        maps, scores = session.run(list(export_format.OUTPUT_NAMES), {"images": images})
        return maps, scores

    return predict


def import_openvino():
    """`openvino`, without its usage telemetry (see `_import`)."""
    return _import("openvino")


def openvino_bfloat16_supported() -> bool:
    """Whether OpenVINO's CPU plugin runs bfloat16 here (AVX-512 BF16 or AMX)."""
    ov = _import("openvino")
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def load_openvino(path: str, precision: str = "float32", threads: int = 0) -> Predict:
    """`predict(images_uint8) -> (maps, scores)` on OpenVINO's CPU plugin."""
    ov = _import("openvino")
    if precision == "bfloat16" and not openvino_bfloat16_supported():
        raise RuntimeUnavailable(
            "predict.precision='bfloat16' needs a CPU with AVX-512 BF16 or AMX; "
            "this one runs OpenVINO in float32 only"
        )
    properties = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32"
    }
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(path, "CPU", properties)
    maps_port, scores_port = (
        compiled.output(name) for name in export_format.OUTPUT_NAMES
    )

    def predict(images: np.ndarray):
        result = compiled(images)
        return np.asarray(result[maps_port]), np.asarray(result[scores_port])

    return predict


def load(
    directory: str, runtime: str, precision: str = "float32"
) -> tuple[Predict, dict]:
    """The exported model in `directory` on `runtime`, and its metadata.

    Args:
      directory: an export directory (`export.export_model`).
      runtime: 'onnxruntime' or 'openvino' (`export.load_exported` runs the
        jax.export artifact).
      precision: 'float32', or 'bfloat16' on OpenVINO where the CPU has it.

    Returns:
      `(predict, metadata)` as `export.load_exported`: `predict(images_uint8
      [B, S, S, 3]) -> (maps [B, C, C], scores [B])`, numpy float32.
    """
    if runtime not in ("onnxruntime", "openvino"):
        raise ValueError(
            f"runtimes.load runs model.onnx on 'onnxruntime' or 'openvino', not "
            f"{runtime!r} (the jax.export artifact: export.load_exported)"
        )
    loader = {"onnxruntime": load_onnxruntime, "openvino": load_openvino}[runtime]
    metadata = _metadata(directory)
    run = loader(onnx_path(directory), precision)
    size = metadata["image_size"]

    def predict(images_uint8: np.ndarray):
        return run(export_format.checked_images(images_uint8, size, directory))

    return predict, metadata


def _metadata(directory: str) -> dict:
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"export directory {directory} does not exist: run --config.mode=export first"
        )
    path = os.path.join(directory, export_format.METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"export file {path} is missing (run --config.mode=export)"
        )
    return export_format.read_metadata(path)
