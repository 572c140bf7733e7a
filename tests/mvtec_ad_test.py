"""Tests of the MVTec AD TFDS builder on generated dummy data.

The dummy data (a few pixels per side, PIL-generated) is written to a temporary
directory in the real MVTec AD layout; no image is committed. Oracles: the
source files' bytes, PIL decoding of the source files and a naive listing of
the folders written here.
"""

import hashlib
import shutil
import tarfile
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from recontrast_jax.data import mvtec_ad, tfds_common
from recontrast_jax.data.folder import DatasetError

# category -> (image mode, {folder under test/: number of images}, #train)
_LAYOUT = {
    "bottle": ("RGB", {"good": 1, "broken_large": 2, "contamination": 1}, 3),
    "screw": ("L", {"good": 2, "scratch_head": 2}, 3),
}
_EXPECTED_SPLITS = {"train": 3, "test": 4}


def _random_image(rng, mode, width, height):
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def _random_mask(rng, width, height):
    mask = np.zeros((height, width), np.uint8)
    mask[rng.integers(0, height), :] = 255
    mask[:, rng.integers(0, width)] = 255
    return Image.fromarray(mask, "L")


def _save_png(image, path):
    # Non-default compression: a builder that re-encoded the image would store
    # different bytes, so the byte-equality check can catch it.
    image.save(path, compress_level=1)


def make_fake_mvtec(root):
    """Writes a tiny MVTec AD tree under ``root`` (images of varied sizes)."""
    rng = np.random.default_rng(0)
    for category, (mode, test_counts, num_train) in _LAYOUT.items():
        base = root / category
        (base / "train" / "good").mkdir(parents=True)
        for i in range(num_train):
            size = (5 + i, 4 + 2 * i)
            _save_png(
                _random_image(rng, mode, *size),
                base / "train" / "good" / f"{i:03d}.png",
            )
        for defect, count in test_counts.items():
            (base / "test" / defect).mkdir(parents=True)
            if defect != "good":
                (base / "ground_truth" / defect).mkdir(parents=True)
            for i in range(count):
                size = (6 + i, 7 - i)
                _save_png(
                    _random_image(rng, mode, *size),
                    base / "test" / defect / f"{i:03d}.png",
                )
                if defect != "good":
                    mask_path = base / "ground_truth" / defect / f"{i:03d}_mask.png"
                    _random_mask(rng, *size).save(mask_path)
    (root / "license.txt").write_text("dummy")
    return root


def _naive_listing(category_dir):
    """file_name -> (label, defect_type, image path, mask path or None)."""
    out = {}
    for path in sorted(category_dir.glob("t*/*/*.png")):
        split, defect = path.parts[-3], path.parts[-2]
        mask = None
        if defect != "good":
            mask = category_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
        rel = path.relative_to(category_dir).as_posix()
        out[rel] = (split, int(defect != "good"), defect, path, mask)
    return out


class MvtecAdTest(tfds.testing.DatasetBuilderTestCase):
    """The standard TFDS builder checks on two categories."""

    DATASET_CLASS = mvtec_ad.MvtecAd
    BUILDER_CONFIG_NAMES_TO_TEST = ["bottle", "screw"]
    SPLITS = _EXPECTED_SPLITS

    @classmethod
    def setUpClass(cls):
        import pathlib

        cls._tmp = tempfile.mkdtemp()
        # The nested layout checks the mvtec_anomaly_detection/ sub-folder too.
        cls.EXAMPLE_DIR = pathlib.Path(cls._tmp) / "manual"
        make_fake_mvtec(cls.EXAMPLE_DIR / "mvtec_anomaly_detection")
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls._tmp, ignore_errors=True)


def _build(category, manual_dir, data_dir):
    builder = tfds.builder(f"mvtec_ad/{category}", data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return make_fake_mvtec(tmp_path_factory.mktemp("mvtec"))


def test_registered_by_import(tmp_path):
    builder = tfds.builder("mvtec_ad/screw", data_dir=str(tmp_path))
    assert isinstance(builder, mvtec_ad.MvtecAd)
    assert [c.name for c in builder.BUILDER_CONFIGS] == list(mvtec_ad.CATEGORIES)
    assert len(mvtec_ad.CATEGORIES) == 15


@pytest.mark.parametrize("category", ["bottle", "screw"])
def test_examples_match_source_files(fake_root, tmp_path, category):
    builder = _build(category, fake_root, tmp_path)
    expected = _naive_listing(fake_root / category)
    seen = set()
    for split in ("train", "test"):
        raw = builder.as_dataset(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        exact = builder.as_dataset(
            split=split, decoders=tfds_common.pil_exact_decoders()
        )
        # For PNG the default TFDS decoding is PIL-exact too.
        default = builder.as_dataset(split=split)
        for raw_ex, ex, default_ex in zip(
            tfds.as_numpy(raw),
            tfds.as_numpy(exact),
            tfds.as_numpy(default),
            strict=True,
        ):
            name = ex["file_name"].decode()
            exp_split, label, defect, image_path, mask_path = expected[name]
            assert exp_split == split and name not in seen
            seen.add(name)
            assert raw_ex["image"] == image_path.read_bytes()  # stored unchanged
            with Image.open(image_path) as im:
                np.testing.assert_array_equal(
                    ex["image"], np.asarray(im.convert("RGB"))
                )
                np.testing.assert_array_equal(default_ex["image"], ex["image"])
                height, width = im.height, im.width
            if mask_path is None:
                want_mask = np.zeros((height, width), np.uint8)
            else:
                with Image.open(mask_path) as m:
                    want_mask = np.asarray(m.convert("L"))
            np.testing.assert_array_equal(ex["mask"][..., 0], want_mask)
            assert ex["label"] == label
            assert ex["defect_type"].decode() == defect
    assert seen == set(expected)


def test_reads_checked_archive(fake_root, tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    manual.mkdir()
    archive = manual / mvtec_ad.ARCHIVE_NAME
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(fake_root / "screw", arcname="screw")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(mvtec_ad, "ARCHIVE_SHA256", digest)
    builder = _build("screw", manual, tmp_path / "data")
    assert {
        k: v.num_examples for k, v in builder.info.splits.items()
    } == _EXPECTED_SPLITS


def test_archive_with_wrong_checksum_is_rejected(fake_root, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    archive = manual / mvtec_ad.ARCHIVE_NAME
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(fake_root / "bottle", arcname="bottle")
    with pytest.raises(
        DatasetError, match=f"{archive}.*sha256.*{mvtec_ad.ARCHIVE_SHA256}"
    ):
        _build("bottle", manual, tmp_path / "data")


def test_missing_manual_dir_shows_instructions(tmp_path):
    with pytest.raises(AssertionError, match="mvtec_anomaly_detection.tar.xz"):
        _build("bottle", tmp_path / "nowhere", tmp_path / "data")


def test_missing_category_names_the_paths(fake_root, tmp_path):
    with pytest.raises(
        DatasetError, match=f"'zipper' not found.*{fake_root / 'zipper'}"
    ):
        _build("zipper", fake_root, tmp_path)


def test_missing_mask_names_the_image(fake_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(fake_root / "bottle", root / "bottle")
    (root / "bottle" / "ground_truth" / "contamination" / "000_mask.png").unlink()
    with pytest.raises(
        DatasetError, match="test/contamination/000.png has no ground-truth mask"
    ):
        _build("bottle", root, tmp_path / "data")
