"""Tests of the VisA TFDS builder on generated dummy data.

The dummy data (tiny PIL-generated JPEGs and class-id masks) is written to a
temporary directory in the raw VisA layout with a ``split_csv/1cls.csv``; no
image is committed. Oracles: the source files' bytes, PIL decoding of the source
files, a naive ``!= 0`` binarisation of the raw mask values and the CSV written
here.
"""

import pathlib
import shutil
import tarfile
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from recontrast_jax.data import tfds_common, visa
from recontrast_jax.data.folder import DatasetError

# object -> (#train normal, #test normal, #test anomaly); cashew only checks
# that other objects' rows are filtered out.
_LAYOUT = {"candle": (3, 2, 2), "pcb1": (3, 1, 3), "cashew": (1, 1, 1)}
_EXPECTED_SPLITS = {"train": 3, "test": 4}


def _write_jpeg(rng, path, width, height):
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, quality=90)


def _write_class_mask(rng, path, width, height, palette):
    """A class-id mask (ids 0..3), as a palette PNG or a gray PNG."""
    ids = np.zeros((height, width), np.uint8)
    ids[rng.integers(0, height), :] = rng.integers(1, 4)
    ids[:, rng.integers(0, width)] = rng.integers(1, 4)
    if palette:
        image = Image.fromarray(ids, "P")
        # Class 1 drawn black on purpose: converting colours would lose it.
        image.putpalette([0, 0, 0, 0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * (252 * 3))
    else:
        image = Image.fromarray(ids, "L")
    image.save(path)


def make_fake_visa(root):
    """Writes a tiny raw VisA tree under ``root``; returns the CSV rows written."""
    rng = np.random.default_rng(0)
    rows = []
    for obj, (n_train, n_test_normal, n_anomaly) in _LAYOUT.items():
        data = root / obj / "Data"
        for sub in ("Images/Normal", "Images/Anomaly", "Masks/Anomaly"):
            (data / sub).mkdir(parents=True)
        # Normal and anomaly images share stems (000.JPG), as in VisA.
        for i in range(n_train + n_test_normal):
            _write_jpeg(rng, data / "Images" / "Normal" / f"{i:03d}.JPG", 9 + i, 7)
            split = "train" if i < n_train else "test"
            rows.append(
                (obj, split, "normal", f"{obj}/Data/Images/Normal/{i:03d}.JPG", "")
            )
        for i in range(n_anomaly):
            size = (8, 6 + i)
            _write_jpeg(rng, data / "Images" / "Anomaly" / f"{i:03d}.JPG", *size)
            _write_class_mask(
                rng, data / "Masks" / "Anomaly" / f"{i:03d}.png", *size, i % 2 == 0
            )
            rows.append(
                (
                    obj,
                    "test",
                    "anomaly",
                    f"{obj}/Data/Images/Anomaly/{i:03d}.JPG",
                    f"{obj}/Data/Masks/Anomaly/{i:03d}.png",
                )
            )
    (root / "split_csv").mkdir()
    lines = ["object,split,label,image,mask"] + [",".join(r) for r in rows]
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    return rows


class VisaTest(tfds.testing.DatasetBuilderTestCase):
    """The standard TFDS builder checks on two objects."""

    DATASET_CLASS = visa.Visa
    BUILDER_CONFIG_NAMES_TO_TEST = ["candle", "pcb1"]
    SPLITS = _EXPECTED_SPLITS

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.mkdtemp()
        cls.EXAMPLE_DIR = pathlib.Path(cls._tmp) / "manual"
        make_fake_visa(cls.EXAMPLE_DIR / "VisA")
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls._tmp, ignore_errors=True)


def _build(obj, manual_dir, data_dir):
    builder = tfds.builder(f"visa/{obj}", data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


@pytest.fixture(scope="module")
def fake_visa(tmp_path_factory):
    root = tmp_path_factory.mktemp("visa")
    return root, make_fake_visa(root)


def test_registered_by_import(tmp_path):
    builder = tfds.builder("visa/pcb4", data_dir=str(tmp_path))
    assert isinstance(builder, visa.Visa)
    assert len(builder.BUILDER_CONFIGS) == 12


@pytest.mark.parametrize("obj", ["candle", "pcb1"])
def test_examples_match_source_files(fake_visa, tmp_path, obj):
    root, rows = fake_visa
    builder = _build(obj, root, tmp_path)
    expected = {r[3].removeprefix(f"{obj}/"): r for r in rows if r[0] == obj}
    seen = set()
    for split in ("train", "test"):
        raw = builder.as_dataset(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        decoded = builder.as_dataset(
            split=split, decoders=tfds_common.pil_exact_decoders()
        )
        for raw_ex, ex in zip(tfds.as_numpy(raw), tfds.as_numpy(decoded), strict=True):
            name = ex["file_name"].decode()
            _, exp_split, label, image_rel, mask_rel = expected[name]
            assert exp_split == split and name not in seen
            seen.add(name)
            assert (
                raw_ex["image"] == (root / image_rel).read_bytes()
            )  # stored unchanged
            with Image.open(root / image_rel) as im:
                np.testing.assert_array_equal(
                    ex["image"], np.asarray(im.convert("RGB"))
                )
                height, width = im.height, im.width
            if mask_rel:
                with Image.open(root / mask_rel) as m:
                    want_mask = (np.array(m) != 0).astype(np.uint8) * 255
            else:
                want_mask = np.zeros((height, width), np.uint8)
            np.testing.assert_array_equal(ex["mask"][..., 0], want_mask)
            assert ex["label"] == (label == "anomaly")
            assert ex["defect_type"].decode() == (
                "bad" if label == "anomaly" else "good"
            )
    assert seen == set(expected)


def test_reads_tar_archive(fake_visa, tmp_path):
    root, _ = fake_visa
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / visa.ARCHIVE_NAME, "w") as tar:
        for name in ("pcb1", "split_csv"):
            tar.add(root / name, arcname=name)
    builder = _build("pcb1", manual, tmp_path / "data")
    assert {
        k: v.num_examples for k, v in builder.info.splits.items()
    } == _EXPECTED_SPLITS


def test_missing_manual_dir_shows_instructions(tmp_path):
    with pytest.raises(AssertionError, match="VisA_20220922.tar"):
        _build("candle", tmp_path / "nowhere", tmp_path / "data")


def test_missing_split_csv_names_the_paths(tmp_path):
    manual = tmp_path / "manual"
    (manual / "candle").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"{manual / 'split_csv' / '1cls.csv'}"):
        _build("candle", manual, tmp_path / "data")


def test_missing_image_names_the_file(fake_visa, tmp_path):
    root, _ = fake_visa
    copy = tmp_path / "copy"
    shutil.copytree(root / "split_csv", copy / "split_csv")
    shutil.copytree(root / "candle", copy / "candle")
    missing = copy / "candle" / "Data" / "Images" / "Anomaly" / "001.JPG"
    missing.unlink()
    with pytest.raises(
        DatasetError, match=f"{missing} listed in split_csv/1cls.csv does not"
    ):
        _build("candle", copy, tmp_path / "data")


def test_object_without_rows_is_reported(fake_visa, tmp_path):
    root, _ = fake_visa
    with pytest.raises(
        DatasetError, match="1cls.csv has no training row for object 'pcb4'"
    ):
        _build("pcb4", root, tmp_path)
