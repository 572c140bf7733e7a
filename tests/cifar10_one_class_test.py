"""Tests of one-class CIFAR-10 with TFDS's mock data (no download)."""

import io
import tempfile
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

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


def _fake_cifar10():
    """Tiny generated stand-in for cifar10: {split: [(id, label, png bytes)]}."""
    rng = np.random.default_rng(0)
    labels = {"train": [3, 0, 3, 9, 3, 1, 5], "test": [3, 2, 0, 3, 8]}
    fake = {}
    for split, split_labels in labels.items():
        fake[split] = []
        for index, label in enumerate(split_labels):
            buffer = io.BytesIO()
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, format="PNG")
            fake[split].append((f"{split}_{index:05d}", label, buffer.getvalue()))
    return fake


_FAKE = _fake_cifar10()


def _read_fake(split, data_dir):
    del data_dir
    return iter(_FAKE[split])


class Cifar10OneClassBuilderTest(tfds.testing.DatasetBuilderTestCase):
    """Standard TFDS builder checks, cifar10 replaced by generated images."""

    DATASET_CLASS = cifar10_one_class.Cifar10OneClass
    BUILDER_CONFIG_NAMES_TO_TEST = ["cat"]
    SPLITS = {"train": 3, "test": 5}
    SKIP_CHECKSUMS = True
    # No manual data (the builder reads cifar10, patched); any existing folder.
    EXAMPLE_DIR = tempfile.gettempdir()

    @classmethod
    def setUpClass(cls):
        cls._patch = mock.patch.object(cifar10_one_class, "read_cifar10", _read_fake)
        cls._patch.start()
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls._patch.stop()


def test_builder_copies_bytes_and_relabels(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10_one_class, "read_cifar10", _read_fake)
    builder = tfds.builder("cifar10_one_class/airplane", data_dir=str(tmp_path))
    builder.download_and_prepare()
    for split in ("train", "test"):
        dataset = builder.as_dataset(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        got = {
            e["file_name"].decode(): (
                int(e["label"]),
                e["defect_type"].decode(),
                e["image"],
            )
            for e in tfds.as_numpy(dataset)
        }
        expected = {
            example_id: (int(label != 0), cifar10_one_class.CLASS_NAMES[label], png)
            for example_id, label, png in _FAKE[split]
            if split == "test" or label == 0
        }
        assert got == expected


def test_read_cifar10_gives_the_encoded_cifar10_images(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        ids, labels, images = _raw_cifar10("test")
        read = list(cifar10_one_class.read_cifar10("test", tmp_path))
    assert [example_id for example_id, _, _ in read] == ids
    assert [label for _, label, _ in read] == labels
    for (_, _, png), image in zip(read, images, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), image)
