"""Tests of the ``isic2018`` TFDS builder on generated dummy data."""

import io
import pathlib
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from recontrast_jax.data import isic2018

_COLUMNS = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
# (image id, diagnosis) per subset; 2 Training NV, whole Validation = 3.
_SUBSETS = {
    "Training": [
        ("ISIC_0000001", "NV"),
        ("ISIC_0000002", "MEL"),
        ("ISIC_0000003", "NV"),
        ("ISIC_0000004", "BKL"),
    ],
    "Validation": [
        ("ISIC_0000100", "DF"),
        ("ISIC_0000101", "NV"),
        ("ISIC_0000102", "NV"),
    ],
}


def make_dummy_isic(root: pathlib.Path) -> pathlib.Path:
    """Writes tiny RGB JPEGs and one-hot ground-truth CSVs in the ISIC layout."""
    rng = np.random.default_rng(0)
    for subset, rows in _SUBSETS.items():
        images = root / f"ISIC2018_Task3_{subset}_Input"
        truth = root / f"ISIC2018_Task3_{subset}_GroundTruth"
        images.mkdir(parents=True)
        truth.mkdir(parents=True)
        (images / "LICENSE.txt").write_text("not an image")
        lines = [",".join(_COLUMNS)]
        for image_id, diagnosis in rows:
            pixels = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{image_id}.jpg", quality=90)
            values = ["1.0" if name == diagnosis else "0.0" for name in _COLUMNS[1:]]
            lines.append(",".join([image_id, *values]))
        (truth / f"{truth.name}.csv").write_text("\n".join(lines) + "\n")
    return root


class Isic2018BuilderTest(tfds.testing.DatasetBuilderTestCase):
    """Standard TFDS builder checks on the generated dummy data."""

    DATASET_CLASS = isic2018.Isic2018
    SPLITS = {"train": 2, "test": 3}
    SKIP_CHECKSUMS = True

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.mkdtemp()
        cls.EXAMPLE_DIR = str(make_dummy_isic(pathlib.Path(cls._tmp)))
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls._tmp, ignore_errors=True)


def test_builder_is_registered_by_import(tmp_path):
    builder = tfds.builder("isic2018", data_dir=str(tmp_path))
    assert isinstance(builder, isic2018.Isic2018)


def test_splits_and_bytes_follow_the_csvs(tmp_path):
    manual = make_dummy_isic(tmp_path / "manual")
    builder = isic2018.Isic2018(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    expected = {
        "train": {i: d for i, d in _SUBSETS["Training"] if d == "NV"},
        "test": dict(_SUBSETS["Validation"]),
    }
    subset_of = {"train": "Training", "test": "Validation"}
    for split, wanted in expected.items():
        dataset = builder.as_dataset(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        found = {}
        for example in tfds.as_numpy(dataset):
            name = example["file_name"].decode()
            source = manual / f"ISIC2018_Task3_{subset_of[split]}_Input" / name
            assert example["image"] == source.read_bytes()
            # The accurate IDCT decodes the stored bytes exactly as PIL does.
            decoded = tf.io.decode_jpeg(
                example["image"], channels=3, dct_method="INTEGER_ACCURATE"
            ).numpy()
            pil = np.asarray(Image.open(io.BytesIO(source.read_bytes())).convert("RGB"))
            np.testing.assert_array_equal(decoded, pil)
            defect = example["defect_type"].decode()
            assert example["label"] == (0 if defect == "NV" else 1)
            found[pathlib.Path(name).stem] = defect
        assert found == wanted


def test_csv_errors_name_the_file(tmp_path):
    csv_path = tmp_path / "gt.csv"
    csv_path.write_text(
        "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,1.0,1.0,0,0,0,0,0\n"
    )
    with pytest.raises(isic2018.DatasetLayoutError, match="gt.csv, line 2"):
        isic2018.read_diagnoses(tfds.core.Path(csv_path))
    with pytest.raises(isic2018.DatasetLayoutError, match="not found"):
        isic2018.read_diagnoses(tfds.core.Path(tmp_path / "missing.csv"))


def test_missing_image_names_the_path(tmp_path):
    manual = make_dummy_isic(tmp_path / "manual")
    missing = manual / "ISIC2018_Task3_Validation_Input" / "ISIC_0000101.jpg"
    missing.unlink()
    with pytest.raises(isic2018.DatasetLayoutError, match="ISIC_0000101.jpg"):
        isic2018.load_subset(tfds.core.Path(manual), "Validation")
