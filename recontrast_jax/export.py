"""Self-contained inference artifacts: ``jax.export``, ONNX and a TF SavedModel.

An exported model takes uint8 RGB images already resized to
``(image_size, image_size)`` (PIL bilinear, as in training; see
:func:`preprocess_for_export`) and does everything else inside: the
torchvision center crop, ``ToTensor`` + ImageNet normalisation in float32,
and the method's predict (``configured_predict`` of its ``methods/`` module:
model, anomaly map, image score). The model variables are embedded as
constants, so the artifact needs neither the checkpoint nor this package (only
``jax`` to deserialise it). The batch dimension is symbolic: any batch size
works with the same artifact.

Layout of an export directory::

  model.jax_export   serialized jax.export.Exported
  model.onnx         the same function for ONNX Runtime and OpenVINO (with the
                     `onnx` extra; `onnx_export.py`), the metadata embedded
  metadata.json      sizes, settings, input description, extra metadata
  saved_model/       TensorFlow SavedModel (only if jax2tf succeeded)
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

# input_pipeline first: it configures TensorFlow's logging and oneDNN before
# anything (jax2tf) imports TensorFlow.
from recontrast_jax.data import input_pipeline  # isort: skip

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from recontrast_jax import console, onnx_export, parallel, reports, run, thresholds
from recontrast_jax.data import sources
from recontrast_jax.export_format import (  # noqa: E402, F401 (this module's surface)
    EXPORT_FILE,
    FORMAT_VERSION,
    METADATA_FILE,
    ONNX_FILE,
    OUTPUT_NAMES,
    SAVED_MODEL_DIR,
    checked_images,
    read_metadata,
)
from recontrast_jax.methods import lookup

INPUT_DESCRIPTION = (
    "uint8 RGB images [batch, image_size, image_size, 3], resized from the "
    "original with PIL bilinear (antialiased) to (image_size, image_size), or "
    "for resize 'shorter_side' with the aspect kept and cut to that square "
    "(preprocess_for_export); the "
    "model center-crops to crop_size and normalises with the ImageNet mean/std. "
    "Outputs: anomaly maps float32 [batch, crop_size, crop_size] and image "
    "scores float32 [batch]."
)

# normalize_uint8 of every uint8 value, per channel: (256, 3) float32. Looking
# values up keeps the exported normalisation bit-identical to the host one (XLA
# would otherwise turn the division by 255 into a multiplication).
_NORMALIZE_TABLE = input_pipeline.normalize_uint8(
    np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
)


def preprocess_for_export(
    image_uint8: np.ndarray,
    image_size: int,
    resize: str = "squash",
    crop_size: int | None = None,
) -> np.ndarray:
    """Resizes one image of any size to the exported model's input.

    The same PIL bilinear resize as training; the center crop is left to the
    exported model (a crop of the full size is the identity). With
    ``resize='shorter_side'`` (``metadata['resize']``) the aspect-kept resize is
    cut to the (image_size, image_size) square whose centre crop of
    ``crop_size`` is torchvision's ``CenterCrop`` of the whole resized image.

    Args:
      image_uint8: uint8 RGB array (H, W, 3) of any size.
      image_size: Side of the square input (``metadata['image_size']``).
      resize: ``metadata['resize']``, one of ``input_pipeline.RESIZE_MODES``.
      crop_size: ``metadata['crop_size']``; needed for 'shorter_side'.

    Returns:
      uint8 array (image_size, image_size, 3).
    """
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"preprocess_for_export expects a uint8 (H, W, 3) RGB image, got "
            f"{image.dtype} {image.shape}"
        )
    if resize == "squash":
        return input_pipeline.resize_and_crop_uint8(image, image_size, image_size)
    if crop_size is None:
        raise ValueError(
            "preprocess_for_export with resize='shorter_side' needs crop_size"
        )
    resized = input_pipeline.resize_uint8(image, image_size, resize)
    inner = input_pipeline.center_crop_offsets(image_size, crop_size)
    top = input_pipeline.center_crop_offsets(resized.shape[0], crop_size) - inner
    left = input_pipeline.center_crop_offsets(resized.shape[1], crop_size) - inner
    return resized[top : top + image_size, left : left + image_size]


def _normalize(images_uint8: jax.Array) -> jax.Array:
    """``input_pipeline.normalize_uint8`` on device, bit-identical to it."""
    table = jnp.asarray(_NORMALIZE_TABLE)
    return table[images_uint8.astype(jnp.int32), jnp.arange(3)]


def inference_fn(
    model, config: ml_collections.ConfigDict
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """The pure function that is exported, with the variables closed over.

    Args:
      model: the method's model (a ReContrast ``TrainState``, a list of
        memory-bank models); its host copy is closed over.
      config: Run config; reads ``data.image_size``, ``data.crop_size``,
        ``model.arch`` and ``eval.sigma``/``score_rule``/``max_ratio``.

    Returns:
      ``fn(images_uint8 [B, S, S, 3]) -> (maps [B, C, C], scores [B])``, float32,
      with S = image_size and C = crop_size.
    """
    image_size, crop_size = config.data.image_size, config.data.crop_size
    top = input_pipeline.center_crop_offsets(image_size, crop_size)
    model_fn = _model_fn(model, config)

    def fn(images_uint8):
        if images_uint8.dtype != jnp.uint8 or tuple(images_uint8.shape[1:]) != (
            image_size,
            image_size,
            3,
        ):
            raise ValueError(
                f"expected uint8 images [B, {image_size}, {image_size}, 3], got "
                f"{images_uint8.dtype} {images_uint8.shape}"
            )
        crops = images_uint8[:, top : top + crop_size, top : top + crop_size, :]
        return model_fn(_normalize(crops))

    return fn


def _model_fn(model, config: ml_collections.ConfigDict):
    """`normalised images -> (maps, scores)` with the host variables closed over."""
    method = lookup.get(config.method)
    return functools.partial(
        method.configured_predict(config), method.host_model(model)
    )


def _input_spec(image_size: int) -> jax.ShapeDtypeStruct:
    """uint8 [b, S, S, 3] with a symbolic batch dimension ``b``."""
    shape = jax.export.symbolic_shape(f"b, {image_size}, {image_size}, 3")
    return jax.ShapeDtypeStruct(shape, jnp.uint8)


def _metadata(config: ml_collections.ConfigDict, extra: Mapping[str, Any] | None):
    metadata = {
        "format_version": FORMAT_VERSION,
        "image_size": int(config.data.image_size),
        "crop_size": int(config.data.crop_size),
        "resize": str(config.data.resize),
        "method": str(config.method),
        "arch": str(config.model.arch),
        "ensemble": list(config.patchcore.ensemble),
        "score_rule": str(config.eval.score_rule),
        "sigma": float(config.eval.sigma),
        "max_ratio": float(config.eval.max_ratio),
        "border": int(config.eval.border),
        "input": INPUT_DESCRIPTION,
        "jax_version": jax.__version__,
    }
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"extra_metadata key {key!r} would overwrite {key}")
        metadata[key] = value
    return metadata


def _save_tf_saved_model(fn, image_size: int, path: str) -> bool:
    """Writes a SavedModel with jax2tf; logs a warning and returns False on failure.

    The SavedModel is a convenience for TensorFlow users; the ``jax.export``
    artifact is the reference, so a jax2tf failure must not fail the export.
    """
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf

        tf_fn = jax2tf.convert(
            fn,
            polymorphic_shapes=[f"(b, {image_size}, {image_size}, 3)"],
            with_gradient=False,
        )
        module = tf.Module()
        module.predict = tf.function(
            lambda images: dict(zip(("maps", "scores"), tf_fn(images), strict=True)),
            input_signature=[
                tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, "images")
            ],
            autograph=False,
        )
        tf.saved_model.save(
            module, path, signatures={"serving_default": module.predict}
        )
        return True
    except Exception as e:  # noqa: BLE001 - optional artifact, see docstring.
        logging.warning(
            "export: skipped the TensorFlow SavedModel at %s (jax2tf failed: %s: %s); "
            "the jax.export artifact is complete without it",
            path,
            type(e).__name__,
            e,
        )
        return False


class ExportError(ValueError):
    """An artifact that cannot be written; the message names it."""


def onnx_available() -> bool:
    """Whether the `onnx` extra is installed (the ONNX export needs it)."""
    return onnx_export.onnx is not None


def save_onnx(fn, image_size: int, path: str, metadata: Mapping[str, Any]) -> None:
    """Writes `fn` as an ONNX model with a dynamic batch; `metadata` embedded."""
    try:
        model = onnx_export.convert(fn, _input_spec(image_size), OUTPUT_NAMES)
    except onnx_export.UnsupportedPrimitive as e:
        raise ExportError(
            f"cannot write {path}: {e} (--config.export.onnx=False skips it)"
        ) from None
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    reports.atomic_write_bytes(path, model.SerializeToString())


def export_model(
    model,
    config: ml_collections.ConfigDict,
    directory: str | os.PathLike,
    extra_metadata: Mapping[str, Any] | None = None,
    *,
    saved_model: bool = True,
    onnx: bool = True,
    platforms: tuple[str, ...] | None = None,
) -> str:
    """Exports the model for inference on uint8 images of any batch size.

    Args:
      model: the method's model (variables are copied to the host).
      config: Run config (see :func:`inference_fn`).
      directory: Output directory, created if needed.
      extra_metadata: JSON-compatible values added to ``metadata.json`` (e.g.
        thresholds); keys must not clash with the standard ones.
      saved_model: Also try to write a TensorFlow SavedModel (jax2tf).
      onnx: Also write `model.onnx` (needs the `onnx` extra; skipped with a
        warning without it).
      platforms: ``jax.export`` platforms; None for the default backend.

    Returns:
      ``directory`` as a string.
    """
    directory = os.fspath(directory)
    metadata = _metadata(config, extra_metadata)
    fn = inference_fn(model, config)
    spec = _input_spec(config.data.image_size)
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(spec)
    reports.atomic_write_bytes(
        os.path.join(directory, EXPORT_FILE), bytes(exported.serialize())
    )
    metadata["platforms"] = list(exported.platforms)
    metadata["onnx"] = onnx and onnx_available()
    if onnx and not metadata["onnx"]:
        console.say_once(
            "no onnx",
            "warning: no ONNX model written: the ONNX export needs "
            "pip install 'recontrast_jax[onnx]'",
        )
    if metadata["onnx"]:
        save_onnx(
            fn, config.data.image_size, os.path.join(directory, ONNX_FILE), metadata
        )
    metadata["saved_model"] = saved_model and _save_tf_saved_model(
        fn, config.data.image_size, os.path.join(directory, SAVED_MODEL_DIR)
    )
    reports.atomic_write_json(os.path.join(directory, METADATA_FILE), metadata)
    return directory


def load_exported(
    directory: str | os.PathLike,
) -> tuple[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], dict]:
    """Loads an export written by :func:`export_model`.

    Args:
      directory: The export directory.

    Returns:
      ``(predict, metadata)``: ``predict(images_uint8 [B, S, S, 3])`` returns
      numpy ``(maps [B, C, C], scores [B])`` float32; ``metadata`` is the dict
      from ``metadata.json``.

    Raises:
      FileNotFoundError: If the directory or one of its files is missing.
      ValueError: If ``metadata.json`` is unreadable or of another format.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"export directory {directory} does not exist")
    export_path = os.path.join(directory, EXPORT_FILE)
    metadata_path = os.path.join(directory, METADATA_FILE)
    for path in (export_path, metadata_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"export file {path} is missing (expected {EXPORT_FILE} and "
                f"{METADATA_FILE} in {directory}, written by export_model)"
            )
    metadata = read_metadata(metadata_path)
    with open(export_path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    size = metadata["image_size"]

    def predict(images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = checked_images(images_uint8, size, directory)
        maps, scores = exported.call(images)
        return np.asarray(maps), np.asarray(scores)

    return predict, metadata


def export_directory(
    config: ml_collections.ConfigDict, workdir: str, category: str
) -> str:
    """`export.directory`, by default `<workdir>/export/<category>`."""
    return config.export.directory or os.path.join(workdir, "export", category)


def export_categories(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Export mode: writes one artifact per category from its checkpoint.

    The chosen thresholds (when calibrated) go into the metadata, so a serving
    system can decide exactly as `predict` does.
    """
    method = lookup.get(config.method)
    mesh = parallel.make_mesh()
    console.say(f"{config.method}: exporting the models in {workdir}")
    directories = []
    for category in sources.category_names(config):
        name = run.model_name(config, category)
        model = method.restore(config, workdir, name, mesh)
        extra = {"category": category, "step": method.model_step(model)}
        try:
            extra["thresholds"] = thresholds.choose(
                thresholds.load(workdir, category), config.threshold
            )
        except (FileNotFoundError, ValueError) as e:
            logging.warning("%s: no thresholds in the export (%s)", category, e)
        directory = export_directory(config, workdir, category)
        directories.append(
            export_model(model, config, directory, extra, onnx=config.export.onnx)
        )
    return directories
