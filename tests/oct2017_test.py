"""Tests of the ``oct2017`` TFDS builder on generated dummy data."""

import io
import pathlib
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from recontrast_jax.data import oct2017

# Images per split folder of the dummy data; train/CNV must be ignored.
_LAYOUT = {
    "train": {"NORMAL": 3, "CNV": 1},
    "test": {"CNV": 2, "DME": 1, "DRUSEN": 1, "NORMAL": 2},
}


def make_dummy_oct(root: pathlib.Path, parent: str = "OCT2017") -> pathlib.Path:
    """Writes tiny grey JPEGs in the OCT2017 layout under ``root/parent``."""
    rng = np.random.default_rng(0)
    base = root / parent
    for split, classes in _LAYOUT.items():
        for name in oct2017.CLASSES:
            folder = base / split / name
            folder.mkdir(parents=True)
            for index in range(classes.get(name, 0)):
                pixels = rng.integers(0, 256, (12, 16), dtype=np.uint8)
                Image.fromarray(pixels, "L").save(
                    folder / f"{name}-{split}{index}-1.jpeg", quality=90
                )
    # Not an image: must be skipped.
    (base / "test" / "DME" / "Thumbs.db").write_bytes(b"x")
    return root


class Oct2017BuilderTest(tfds.testing.DatasetBuilderTestCase):
    """Standard TFDS builder checks on the generated dummy data."""

    DATASET_CLASS = oct2017.Oct2017
    SPLITS = {"train": 3, "test": 6}
    SKIP_CHECKSUMS = True

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.mkdtemp()
        cls.EXAMPLE_DIR = str(make_dummy_oct(pathlib.Path(cls._tmp)))
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls._tmp, ignore_errors=True)


def _build(tmp_path, manual_dir):
    builder = oct2017.Oct2017(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def test_builder_is_registered_by_import(tmp_path):
    assert isinstance(tfds.builder("oct2017", data_dir=str(tmp_path)), oct2017.Oct2017)


def test_stored_bytes_are_the_source_files(tmp_path):
    manual = make_dummy_oct(tmp_path / "manual", parent="CellData/OCT")
    builder = _build(tmp_path, manual)
    base = manual / "CellData" / "OCT"
    for split in ("train", "test"):
        dataset = builder.as_dataset(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        seen = []
        for example in tfds.as_numpy(dataset):
            defect = example["defect_type"].decode()
            name = example["file_name"].decode()
            source = base / split / defect / name
            assert example["image"] == source.read_bytes()
            expected_label = 0 if defect == "NORMAL" else 1
            assert example["label"] == expected_label
            # Decoding the stored bytes gives the pixels PIL reads from the file.
            stored = np.asarray(Image.open(io.BytesIO(example["image"])))
            np.testing.assert_array_equal(stored, np.asarray(Image.open(source)))
            seen.append((defect, name))
        expected = sorted(
            (name, path.name)
            for name, count in _LAYOUT[split].items()
            if split == "test" or name == "NORMAL"
            for path in (base / split / name).glob("*.jpeg")
        )
        assert sorted(seen) == expected


def test_decoded_image_is_grey_replicated_to_rgb(tmp_path):
    manual = make_dummy_oct(tmp_path / "manual")
    builder = _build(tmp_path, manual)
    dataset = builder.as_dataset(
        split="train", decoders={"image": tfds.decode.SkipDecoding()}
    )
    example = next(iter(tfds.as_numpy(dataset)))
    source = manual / "OCT2017" / "train" / "NORMAL" / example["file_name"].decode()
    expected = np.asarray(Image.open(source).convert("RGB"))
    # TFDS's default decoder uses libjpeg's fast integer IDCT, which differs
    # from PIL by a few grey levels; the accurate IDCT matches PIL exactly.
    decoded = tf.io.decode_jpeg(
        example["image"], channels=3, dct_method="INTEGER_ACCURATE"
    ).numpy()
    np.testing.assert_array_equal(decoded, expected)
    default = next(iter(tfds.as_numpy(builder.as_dataset(split="train"))))
    assert default["image"].shape == expected.shape


def test_missing_layout_names_the_folder(tmp_path):
    with pytest.raises(oct2017.DatasetLayoutError, match=str(tmp_path)):
        oct2017.find_root(tfds.core.Path(tmp_path))
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    with pytest.raises(oct2017.DatasetLayoutError, match="no .jpeg image"):
        oct2017.list_images(tfds.core.Path(tmp_path) / "train" / "NORMAL")
