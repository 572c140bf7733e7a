"""One-class CIFAR-10 on top of TFDS's own ``cifar10`` dataset.

ReContrast's code has no CIFAR-10 script, so this follows the usual one-class
protocol: for a chosen normal class, the training set is the CIFAR-10 training
images of that class only (5000); the test set is the whole CIFAR-10 test set
(10000), that class normal and the other nine abnormal.

Two interfaces with the same features as the medical builders (``image``,
``label`` 0 normal / 1 abnormal, ``defect_type`` = the original CIFAR-10 class
name, ``file_name`` = the CIFAR-10 example id):

* the builder ``cifar10_one_class/<class>`` (one config per class), which
  prepares TFDS's ``cifar10`` in the same data directory and copies its PNG
  bytes unchanged (registered by importing this module);
* :func:`one_class_split`, a view over ``tfds.load("cifar10")`` without a copy.

CIFAR-10 is downloaded by TFDS itself (no manual step).
"""

from __future__ import annotations

from collections.abc import Iterator

import tensorflow as tf
import tensorflow_datasets as tfds

from recontrast_jax.data import categories, tfds_common

CLASS_NAMES = categories.CIFAR10_CLASSES
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


def read_cifar10(split: str, data_dir) -> Iterator[tuple[str, int, bytes]]:
    """Yields (id, class index, PNG bytes) of TFDS's ``cifar10``, preparing it.

    Args:
      split: "train" or "test".
      data_dir: TFDS data directory holding (or receiving) ``cifar10``.

    Yields:
      One tuple per image, in the stored order.
    """
    builder = tfds.builder("cifar10", data_dir=str(data_dir))
    builder.download_and_prepare()
    dataset = builder.as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False
    )
    for example in tfds.as_numpy(dataset):
        yield example["id"].decode(), int(example["label"]), bytes(example["image"])


class Cifar10OneClass(tfds.core.GeneratorBasedBuilder):
    """One-class CIFAR-10: one config per normal class."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train = the class's training images; test = all."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=f"normal class: {name}")
        for name in CLASS_NAMES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "One-class CIFAR-10: train = training images of the normal "
                "class; test = the whole test set, other classes abnormal."
            ),
            features=tfds_common.classification_features((32, 32, 3)),
            supervised_keys=("image", "label"),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # cifar10 is prepared by its own TFDS builder.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        normal_index = CLASS_NAMES.index(self.builder_config.name)
        for example_id, class_index, png in read_cifar10(split, self.data_dir_root):
            if split == "train" and class_index != normal_index:
                continue
            yield (
                example_id,
                {
                    "image": png,
                    "label": "normal" if class_index == normal_index else "abnormal",
                    "defect_type": CLASS_NAMES[class_index],
                    "file_name": example_id,
                },
            )
