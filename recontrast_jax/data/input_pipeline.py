"""tf.data input pipelines that reproduce ReContrast's PyTorch preprocessing.

The reference transforms are torchvision's ``Resize((s, s))`` on a PIL image
(bilinear, antialiased when downsampling), ``ToTensor``, ``CenterCrop(crop)`` and
``Normalize(IMAGENET_MEAN, IMAGENET_STD)``; ground-truth masks get the same
resize and crop and are binarised with ``> 0``. PatchCore's reference code
differs in two rules, both options here: ``Resize(s)`` (shorter side to s,
aspect ratio kept; ``resize='shorter_side'``) and masks that count only pixels
still exactly 1 after resizing (``mask_rule='exactly_one'``). Decoding and resizing run in PIL
(through ``tf.numpy_function``) so the pixels are exactly the reference's;
TensorFlow only schedules the work, batches and prefetches.

TensorFlow is used on the CPU only: accelerators are hidden from it at import so
it never competes with JAX for device memory.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Sequence

# Must be set before TensorFlow is imported to silence its C++ logs. TF 2.21
# prints its oneDNN notice regardless of the log level unless oneDNN graph
# rewrites are off; they only touch conv/matmul kernels, which this module never
# runs, so turning them off changes no pixel.
# JAX sets "1" when it is imported first, which lets TensorFlow's warnings
# through: a corrupt image then prints its op-kernel traceback (~80 lines)
# before the error line. Raised to 2 (warnings off, errors shown).
if int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") or 0) < 2:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from recontrast_jax import default_config  # noqa: E402
from recontrast_jax.data import folder  # noqa: E402

tf.get_logger().setLevel("ERROR")
try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
    # Devices were already initialised (TF imported and used elsewhere first).
    pass

# 'squash': Resize((s, s)) (ReContrast's scripts); 'shorter_side': Resize(s),
# the shorter side to s and the longer int(s * long / short) (PatchCore's).
# 'positive': a mask pixel > 0 after resizing is anomalous (ReContrast);
# 'exactly_one': only pixels that stay 255, i.e. 1.0 after ToTensor, count
# (PatchCore's `.astype(int)`), and the image label is the folder's.
RESIZE_MODES, MASK_RULES = default_config.RESIZE_MODES, default_config.MASK_RULES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN32 = np.asarray(IMAGENET_MEAN, np.float32)
_STD32 = np.asarray(IMAGENET_STD, np.float32)


# --------------------------------------------------------------------------
# Per-image preprocessing (numpy/PIL; the reference's exact arithmetic).
# --------------------------------------------------------------------------


def center_crop_offsets(size: int, crop_size: int) -> int:
    """Top (or left) offset of torchvision's ``CenterCrop`` along one side.

    Args:
      size: Height (or width) of the image.
      crop_size: Side of the crop.

    Returns:
      ``int(round((size - crop_size) / 2.0))`` (Python's half-to-even round, as
      torchvision uses).
    """
    if not 0 < crop_size <= size:
        raise ValueError(f"crop_size {crop_size} must be in [1, image_size={size}]")
    return int(round((size - crop_size) / 2.0))


def check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    """Raises a ValueError naming the config field if `value` is not a choice."""
    if value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(choices)}; got {value!r}")


def resized_shape(height: int, width: int, image_size: int, resize: str):
    """(H, W) after torchvision's ``Resize((s, s))`` or ``Resize(s)``.

    ``Resize(s)`` maps the shorter side to s and the longer one to
    ``int(s * long / short)``, the arithmetic of torchvision's
    ``_compute_resized_output_size``.
    """
    check_choice("data.resize", resize, RESIZE_MODES)
    if resize == "squash":
        return image_size, image_size
    if width <= height:
        return int(image_size * height / width), image_size
    return image_size, int(image_size * width / height)


def resize_and_crop_uint8(
    image_uint8: np.ndarray, image_size: int, crop_size: int, resize: str = "squash"
) -> np.ndarray:
    """PIL bilinear resize (see `resized_shape`), then torchvision's center crop.

    Args:
      image_uint8: uint8 array (H, W, 3) or (H, W).
      image_size: Side after resizing (the shorter side for 'shorter_side').
      crop_size: Side after center cropping.
      resize: one of `RESIZE_MODES`.

    Returns:
      uint8 array (crop_size, crop_size[, 3]).
    """
    resized = resize_uint8(image_uint8, image_size, resize)
    top = center_crop_offsets(resized.shape[0], crop_size)
    left = center_crop_offsets(resized.shape[1], crop_size)
    return resized[top : top + crop_size, left : left + crop_size]


def resize_uint8(image_uint8: np.ndarray, image_size: int, resize: str) -> np.ndarray:
    """PIL bilinear (antialiased) resize to `resized_shape`, uncropped."""
    image = np.asarray(image_uint8, np.uint8)
    height, width = resized_shape(*image.shape[:2], image_size, resize)
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def normalize_uint8(image_uint8: np.ndarray) -> np.ndarray:
    """``ToTensor`` (divide by 255) then ``Normalize`` in float32, as torch does."""
    scaled = np.asarray(image_uint8, np.float32) / np.float32(255)
    return (scaled - _MEAN32) / _STD32


def preprocess_image(
    image_uint8: np.ndarray, image_size: int, crop_size: int, resize: str = "squash"
) -> np.ndarray:
    """Reference image transform: Resize, ToTensor, CenterCrop, Normalize.

    Args:
      image_uint8: uint8 RGB array (H, W, 3), e.g. from :func:`folder.load_rgb`.
      image_size: Side of the resize (PIL bilinear, antialiased).
      crop_size: Side of the center crop.
      resize: one of `RESIZE_MODES`.

    Returns:
      float32 array (crop_size, crop_size, 3), channels last.
    """
    image = resize_and_crop_uint8(image_uint8, image_size, crop_size, resize)
    return normalize_uint8(image)


def preprocess_mask(
    mask_uint8: np.ndarray | None,
    image_size: int,
    crop_size: int,
    resize: str = "squash",
    mask_rule: str = "positive",
) -> np.ndarray:
    """Reference ground-truth transform: PIL bilinear resize, center crop, binarise.

    With 'positive' any pixel that bilinear resizing touches counts as
    anomalous, which slightly dilates the masks (ReContrast's reference does
    the same); with 'exactly_one' only pixels that stay 255 count, which
    erodes them (PatchCore's).

    Args:
      mask_uint8: uint8 array (H, W), or None for a good image.
      image_size: Side of the resize.
      crop_size: Side of the center crop.
      resize: one of `RESIZE_MODES`.
      mask_rule: one of `MASK_RULES`.

    Returns:
      bool array (crop_size, crop_size).
    """
    check_choice("data.mask_rule", mask_rule, MASK_RULES)
    if mask_uint8 is None:
        center_crop_offsets(image_size, crop_size)  # Validates the sizes.
        return np.zeros((crop_size, crop_size), bool)
    mask = resize_and_crop_uint8(mask_uint8, image_size, crop_size, resize)
    return mask == 255 if mask_rule == "exactly_one" else mask > 0


def eval_transform(data_config) -> dict:
    """`eval_dataset`'s resize, crop and mask arguments from a config's `data`."""
    return {
        "image_size": int(data_config.image_size),
        "crop_size": int(data_config.crop_size),
        "resize": str(data_config.resize),
        "mask_rule": str(data_config.mask_rule),
    }


# --------------------------------------------------------------------------
# Errors raised inside tf.numpy_function.
# --------------------------------------------------------------------------

_DATASET_ERROR_RE = re.compile(r"DatasetError: (.*)")


class NumpyIterator:
    """Iterator over a dataset's batches as dicts of numpy arrays.

    Besides converting wrapped data errors back into
    :class:`folder.DatasetError`, it releases the underlying TensorFlow iterator
    on :meth:`close`, on leaving a ``with`` block, or at interpreter exit. The
    last matters: a tf.data iterator still alive when Python shuts down can
    deadlock the process if a ``tf.numpy_function`` call is in flight (its thread
    waits for the GIL that the finalising interpreter never hands over), which
    happens whenever a program ends while an endless training pipeline is still
    prefetching.
    """

    def __init__(self, dataset: tf.data.Dataset):
        self._iterator = dataset.as_numpy_iterator()
        _LIVE_ITERATORS.add(self)

    def __iter__(self) -> NumpyIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            raise StopIteration
        try:
            return next(self._iterator)
        except StopIteration:
            self.close()
            raise
        except tf.errors.OpError as e:
            matches = _DATASET_ERROR_RE.findall(e.message or "")
            if matches:
                raise folder.DatasetError(matches[-1].strip()) from None
            raise

    def close(self) -> None:
        """Stops the pipeline and frees its buffers; iteration then ends."""
        self._iterator = None

    def __enter__(self) -> NumpyIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_LIVE_ITERATORS: weakref.WeakSet[NumpyIterator] = weakref.WeakSet()


class _CallbackGate:
    """Lets pipelines reach Python only while the interpreter is not exiting.

    Datasets iterated directly (not through :class:`NumpyIterator`) cannot be
    closed at exit. Instead, at exit every later Python callback fails at once,
    so the pipelines stop asking for Python within milliseconds (their buffers
    fill with errors) and no thread is waiting for the GIL when the interpreter
    finalises.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._closed = False
        self._active = 0
        self._last_call = time.monotonic()

    def wrap(self, fn):
        """Returns ``fn`` guarded by the gate (for use in tf.numpy_function)."""

        def guarded(*args):
            with self._lock:
                self._last_call = time.monotonic()
                if self._closed:
                    raise RuntimeError("the Python interpreter is shutting down")
                self._active += 1
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._active -= 1

        return guarded

    def close_and_drain(self, quiet_seconds=0.05, timeout_seconds=2.0):
        """Refuses new calls and waits until no callback has run for a moment."""
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            with self._lock:
                idle = time.monotonic() - self._last_call
                if self._active == 0 and idle > quiet_seconds:
                    return
            time.sleep(0.01)  # Releases the GIL so in-flight callbacks finish.


_GATE = _CallbackGate()


@atexit.register
def _stop_pipelines_at_exit() -> None:
    # atexit runs while the interpreter still works: threads blocked in a
    # tf.numpy_function can still take the GIL and finish.
    for iterator in list(_LIVE_ITERATORS):
        iterator.close()
    gc.collect()
    _GATE.close_and_drain()


def _numpy_function(fn, inputs, output_types):
    """``tf.numpy_function`` (pure) through the exit gate."""
    return tf.numpy_function(_GATE.wrap(fn), inputs, output_types, stateful=False)


def iterate_numpy(dataset: tf.data.Dataset) -> NumpyIterator:
    """Iterates a dataset as dicts of numpy arrays, with readable data errors.

    TensorFlow wraps exceptions raised inside ``tf.numpy_function`` in an
    ``OpError`` whose text is a Python traceback; this turns them back into a
    :class:`folder.DatasetError` carrying the original message (which names the
    file). Prefer it to iterating a dataset directly: its iterator is also shut
    down cleanly at interpreter exit (see :class:`NumpyIterator`).

    Args:
      dataset: A dataset from :func:`train_dataset` or :func:`eval_dataset`.

    Returns:
      An iterator of batches (dicts of numpy arrays); it raises
      :class:`folder.DatasetError` if an image or mask cannot be read.
    """
    return NumpyIterator(dataset)


# --------------------------------------------------------------------------
# Training pipeline.
# --------------------------------------------------------------------------


def _check_files_exist(samples: Sequence[folder.Sample]) -> None:
    """Fails early, in Python, on missing files (cheaper than a wrapped error)."""
    for sample in samples:
        files = [("mask", sample.mask_path)]
        if sample.image_bytes is None:
            files.append(("image", sample.path))
        for kind, path in files:
            if path is not None and not os.path.isfile(path):
                raise folder.DatasetError(f"{kind} file {path} does not exist")


def _batches_per_epoch(n: int, batch_size: int, multiple: int, drop: bool) -> int:
    full, rest = divmod(n, batch_size)
    return full + int(not drop and rest // multiple > 0)


def _epoch_permutation(seed: int, n: int):
    """Returns a tf function mapping an epoch number to its permutation."""

    def permute(epoch):
        rng = np.random.default_rng([seed, int(epoch)])
        return rng.permutation(n).astype(np.int32)

    def epoch_indices(epoch):
        perm = _numpy_function(permute, [epoch], tf.int32)
        return tf.ensure_shape(perm, [n])

    return epoch_indices


def _image_loader(
    samples: Sequence[folder.Sample],
    image_size: int,
    crop_size: int,
    cache: bool,
    resize: str,
):
    """Returns a numpy function loading a batch of indices as uint8 images."""
    memo: dict[int, np.ndarray] = {}

    def load_one(index: int) -> np.ndarray:
        image = memo.get(index)
        if image is None:
            rgb = folder.load_sample_image(samples[index])
            image = resize_and_crop_uint8(rgb, image_size, crop_size, resize)
            if cache:
                memo[index] = image
        return image

    def load_batch(indices: np.ndarray) -> np.ndarray:
        return np.stack([load_one(int(i)) for i in indices])

    return load_batch


def _normalize_tf(images_uint8: tf.Tensor) -> tf.Tensor:
    """``normalize_uint8`` in TensorFlow, bit-identical to it.

    The same float32 operations in the same order (IEEE division and
    subtraction, nothing fused), so the outputs agree exactly.
    """
    scaled = tf.cast(images_uint8, tf.float32) / tf.constant(255.0, tf.float32)
    return (scaled - tf.constant(_MEAN32)) / tf.constant(_STD32)


def train_dataset(
    samples: Sequence[folder.Sample],
    *,
    batch_size: int,
    image_size: int,
    crop_size: int,
    seed: int,
    resize: str = "squash",
    batch_multiple: int = 1,
    drop_remainder: bool = False,
    cache: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """Endless training batches, epoch after epoch, like a PyTorch DataLoader.

    Each epoch visits this process's samples once in a fresh order drawn from
    ``np.random.default_rng([seed, epoch])``. Batches do not cross epochs. With
    ``drop_remainder=False`` the last batch of an epoch is partial (as with the
    reference's ``drop_last=False``), rounded down to a multiple of
    ``batch_multiple`` so it still splits evenly over the local devices, and
    skipped if that leaves nothing.

    Args:
      samples: Training samples (all processes pass the same list).
      batch_size: Per-process batch size.
      image_size: Side of the resize.
      crop_size: Side of the center crop.
      seed: Non-negative shuffling seed.
      resize: one of `RESIZE_MODES`.
      batch_multiple: Every batch size is a multiple of this (local devices).
      drop_remainder: Drop each epoch's incomplete last batch.
      cache: Keep decoded, resized images in memory after their first use.
      process_index: This process's index; it reads
        ``samples[process_index::process_count]``, cut to
        ``len(samples) // process_count`` images so that every process runs
        the same number of steps per epoch.
      process_count: Number of processes.
      start_batch: Batches to skip (the data position of a resumed run); the
        stream then continues exactly where a run that consumed that many
        batches was. Skipping happens before any image is loaded.

    Returns:
      A ``tf.data.Dataset`` of ``{'image': float32 [b, crop, crop, 3],
      'index': int32 [b]}``; ``index`` is each image's position in ``samples``
      (the same on every process), e.g. to look up precomputed features.

    Raises:
      ValueError: On inconsistent arguments or if an epoch would yield no batch.
      folder.DatasetError: If an image file is missing.
    """
    _check_batch_args(batch_size, batch_multiple)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    check_choice("data.resize", resize, RESIZE_MODES)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if process_count > 1 and not drop_remainder:
        raise ValueError(
            "train_dataset with process_count > 1 needs drop_remainder=True: a "
            "partial last batch cannot be kept the same size on every host, and "
            "hosts that disagree on the global batch shape deadlock."
        )
    shard = list(samples)[process_index::process_count]
    # Equal shard lengths keep every host on the same number of steps per epoch.
    shard = shard[: len(samples) // process_count]
    _check_files_exist(shard)
    n = len(shard)
    if _batches_per_epoch(n, batch_size, batch_multiple, drop_remainder) == 0:
        raise ValueError(
            f"the training set ({n} images on this process) yields no batch per "
            f"epoch with batch_size={batch_size}, batch_multiple={batch_multiple}, "
            f"drop_remainder={drop_remainder}"
        )

    epoch_indices = _epoch_permutation(seed, n)

    def epoch_batches(epoch):
        batches = tf.data.Dataset.from_tensor_slices(epoch_indices(epoch))
        batches = batches.batch(batch_size, drop_remainder=drop_remainder)
        if not drop_remainder and (n % batch_size) % batch_multiple:
            batches = batches.map(lambda ix: _round_down(ix, batch_multiple))
            batches = batches.filter(lambda ix: tf.size(ix) > 0)
        return batches

    load_batch = _image_loader(shard, image_size, crop_size, cache, resize)

    def load(indices):
        images = _numpy_function(load_batch, [indices], tf.uint8)
        # A static batch dimension when every batch is full.
        batch_dim = batch_size if drop_remainder else None
        images = tf.ensure_shape(images, [batch_dim, crop_size, crop_size, 3])
        # shard[i] is samples[process_index + i * process_count].
        index = process_index + indices * process_count
        return {"image": _normalize_tf(images), "index": index}

    ds = tf.data.Dataset.counter().flat_map(epoch_batches).skip(start_batch)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _round_down(indices: tf.Tensor, multiple: int) -> tf.Tensor:
    keep = (tf.shape(indices)[0] // multiple) * multiple
    return indices[:keep]


def _check_batch_args(batch_size: int, batch_multiple: int) -> None:
    if batch_size < 1 or batch_multiple < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and batch_multiple ({batch_multiple}) "
            "must be positive"
        )
    if batch_size % batch_multiple:
        raise ValueError(
            f"batch_size {batch_size} is not a multiple of batch_multiple "
            f"{batch_multiple} (the number of local devices)"
        )


# --------------------------------------------------------------------------
# Evaluation pipeline.
# --------------------------------------------------------------------------


def _eval_loader(
    samples: Sequence[folder.Sample],
    batch_size: int,
    image_size: int,
    crop_size: int,
    resize: str,
    mask_rule: str,
):
    """Returns a numpy function loading batch number ``b`` (zero padded)."""
    n = len(samples)

    def load_batch(batch_number):
        start = int(batch_number) * batch_size
        images = np.zeros((batch_size, crop_size, crop_size, 3), np.uint8)
        masks = np.zeros((batch_size, crop_size, crop_size), bool)
        valid = np.zeros((batch_size,), bool)
        labels = np.zeros((batch_size,), np.int32)
        index = np.full((batch_size,), -1, np.int32)
        for slot, i in enumerate(range(start, min(start + batch_size, n))):
            sample = samples[i]
            rgb = folder.load_sample_image(sample)
            images[slot] = resize_and_crop_uint8(rgb, image_size, crop_size, resize)
            mask = folder.load_sample_mask(sample)
            masks[slot] = preprocess_mask(
                mask, image_size, crop_size, resize, mask_rule
            )
            # ReContrast's image label is the max of the resized GT mask;
            # PatchCore's and sources without masks (medical sets) carry the
            # sample's own.
            from_mask = sample.has_mask and mask_rule == "positive"
            labels[slot] = masks[slot].any() if from_mask else sample.label
            valid[slot] = True
            index[slot] = i
        return images, masks, labels, valid, index

    return load_batch


def eval_dataset(
    samples: Sequence[folder.Sample],
    *,
    batch_size: int,
    image_size: int,
    crop_size: int,
    resize: str = "squash",
    mask_rule: str = "positive",
    batch_multiple: int = 1,
    cache: bool = False,
) -> tf.data.Dataset:
    """Finite evaluation batches: every sample once, in order, last batch padded.

    Args:
      samples: Test samples (e.g. ``folder.scan_category(...).test``).
      batch_size: Batch size; every batch has exactly this size.
      image_size: Side of the resize.
      crop_size: Side of the center crop.
      resize: one of `RESIZE_MODES`.
      mask_rule: one of `MASK_RULES`.
      batch_multiple: ``batch_size`` must be a multiple of this (local devices).
      cache: Keep the decoded batches in memory after the first full pass, for
        repeated evaluations during training.

    Returns:
      A ``tf.data.Dataset`` of dicts: ``image`` float32 [b, crop, crop, 3],
      ``mask`` bool [b, crop, crop], ``label`` int32 [b] (with 'positive', 1 if
      the mask has any pixel set; otherwise, or without a mask, the sample's
      own label), ``valid`` bool [b] (False for padding) and ``index`` int32
      [b] (position in ``samples``). Padding entries are zero, with index -1.

    Raises:
      ValueError: If ``batch_size`` is not a multiple of ``batch_multiple`` or
        ``samples`` is empty.
      folder.DatasetError: If an image or mask file is missing.
    """
    _check_batch_args(batch_size, batch_multiple)
    samples = list(samples)
    if not samples:
        raise ValueError("eval_dataset needs at least one sample")
    _check_files_exist(samples)
    center_crop_offsets(image_size, crop_size)
    check_choice("data.resize", resize, RESIZE_MODES)
    check_choice("data.mask_rule", mask_rule, MASK_RULES)
    load_batch = _eval_loader(
        samples, batch_size, image_size, crop_size, resize, mask_rule
    )
    types = (tf.uint8, tf.bool, tf.int32, tf.bool, tf.int32)

    def load(batch_number):
        images, masks, labels, valid, index = _numpy_function(
            load_batch, [batch_number], types
        )
        b, c = batch_size, crop_size
        return {
            "image": tf.ensure_shape(images, [b, c, c, 3]),
            "mask": tf.ensure_shape(masks, [b, c, c]),
            "label": tf.ensure_shape(labels, [b]),
            "valid": tf.ensure_shape(valid, [b]),
            "index": tf.ensure_shape(index, [b]),
        }

    def normalize(batch):
        # Padding stays exactly zero rather than becoming normalized black.
        valid = tf.reshape(batch["valid"], [-1, 1, 1, 1])
        images = tf.where(valid, _normalize_tf(batch["image"]), 0.0)
        return {**batch, "image": images}

    num_batches = math.ceil(len(samples) / batch_size)
    ds = tf.data.Dataset.range(num_batches)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        ds = ds.cache()
    ds = ds.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
