"""One-class CIFAR-10 on top of TFDS's own ``cifar10`` dataset.

ReContrast's code has no CIFAR-10 script, so this follows the usual one-class
protocol: for a chosen normal class, the training set is the CIFAR-10 training
images of that class only (5000); the test set is the whole CIFAR-10 test set
(10000), that class normal and the other nine abnormal.

Wrapping another TFDS dataset inside a builder would duplicate its storage, so
the split is a function over ``tfds.load("cifar10")`` returning the same
features as the medical builders: ``image``, ``label`` (0 normal, 1 abnormal),
``defect_type`` (the original CIFAR-10 class name) and ``file_name`` (the
CIFAR-10 example id). CIFAR-10 is downloaded by TFDS itself (no manual step).
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SPLITS = ("train", "test")


def one_class_split(
    normal_class: str,
    split: str,
    data_dir: str | None = None,
    download: bool = True,
) -> tf.data.Dataset:
    """Returns one split of one-class CIFAR-10.

    Args:
      normal_class: One of :data:`CLASS_NAMES`.
      split: "train" (normal class only) or "test" (all ten classes).
      data_dir: TFDS data directory; TFDS's default when None.
      download: Whether TFDS may download and prepare ``cifar10``.

    Returns:
      A dataset of dicts with ``image`` (32x32x3 uint8), ``label`` (int64,
      0 normal / 1 abnormal), ``defect_type`` and ``file_name`` (strings).

    Raises:
      ValueError: Unknown class or split.
    """
    if normal_class not in CLASS_NAMES:
        raise ValueError(
            f"normal_class {normal_class!r} is not a CIFAR-10 class; "
            f"expected one of {', '.join(CLASS_NAMES)}."
        )
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}.")
    normal_index = CLASS_NAMES.index(normal_class)
    dataset = tfds.load("cifar10", split=split, data_dir=data_dir, download=download)
    if split == "train":
        dataset = dataset.filter(lambda example: example["label"] == normal_index)
    names = tf.constant(CLASS_NAMES)

    def to_one_class(example):
        return {
            "image": example["image"],
            "label": tf.cast(example["label"] != normal_index, tf.int64),
            "defect_type": tf.gather(names, example["label"]),
            "file_name": example["id"],
        }

    return dataset.map(to_one_class)
