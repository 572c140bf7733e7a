"""Tests of one-class CIFAR-10 with TFDS's mock data (no download)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from recontrast_jax.data import cifar10_one_class

_NUM_EXAMPLES = 40


def _raw_cifar10(split):
    """The mocked cifar10 split, as (id, original label, image) lists."""
    examples = list(tfds.as_numpy(tfds.load("cifar10", split=split)))
    return (
        [example["id"].decode() for example in examples],
        [int(example["label"]) for example in examples],
        [example["image"] for example in examples],
    )


@pytest.mark.parametrize("normal_class", ["cat", "truck"])
def test_splits_follow_the_one_class_protocol(normal_class):
    normal_index = cifar10_one_class.CLASS_NAMES.index(normal_class)
    with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES):
        for split in ("train", "test"):
            ids, labels, images = _raw_cifar10(split)
            got = list(
                tfds.as_numpy(cifar10_one_class.one_class_split(normal_class, split))
            )
            keep = [
                i
                for i, label in enumerate(labels)
                if split == "test" or label == normal_index
            ]
            assert keep, "the mock data should hold the normal class"
            assert [e["file_name"].decode() for e in got] == [ids[i] for i in keep]
            assert [int(e["label"]) for e in got] == [
                int(labels[i] != normal_index) for i in keep
            ]
            assert [e["defect_type"].decode() for e in got] == [
                cifar10_one_class.CLASS_NAMES[labels[i]] for i in keep
            ]
            for example, index in zip(got, keep, strict=True):
                np.testing.assert_array_equal(example["image"], images[index])
            if split == "test":
                assert len(got) == _NUM_EXAMPLES


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'kitten'"):
        cifar10_one_class.one_class_split("kitten", "train")
    with pytest.raises(ValueError, match="'validation'"):
        cifar10_one_class.one_class_split("cat", "validation")
