"""Tests of the ``aptos2019`` TFDS builder, its split and its fundus crop."""

import pathlib
import random
import shutil
import tempfile
from unittest import mock

import numpy as np
import pytest
import scipy.ndimage
import skimage.measure
import tensorflow_datasets as tfds
from PIL import Image

from recontrast_jax.data import aptos

# Dummy train.csv: 5 normals, 3 abnormals, in this (CSV) order.
_GRADES = [
    ("a0", 0),
    ("b2", 2),
    ("c0", 0),
    ("d0", 0),
    ("e4", 4),
    ("f0", 0),
    ("g1", 1),
    ("h0", 0),
]


# The dummy data is built with a 3-image training split and 24 px images.
_SMALL = {"NUM_TRAIN": 3, "IMAGE_SIZE": 24}


def _small_builder_patches():
    return [
        mock.patch.object(aptos.Aptos2019, name, value)
        for name, value in _SMALL.items()
    ]


def _disc_image(height, width, centre, radius, colour=(180, 90, 40)):
    """A black RGB image with a filled bright disc."""
    rows, cols = np.mgrid[:height, :width]
    inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
    image = np.zeros((height, width, 3), np.uint8)
    image[inside] = colour
    return image


def make_dummy_aptos(root: pathlib.Path) -> pathlib.Path:
    """Writes small fundus-like PNGs and train.csv in the Kaggle layout."""
    (root / "train_images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, (id_code, _) in enumerate(_GRADES):
        image = _disc_image(30 + index, 40, (15, 18 + index), 10 + index % 3)
        image = np.maximum(image, rng.integers(0, 8, image.shape, dtype=np.uint8))
        Image.fromarray(image).save(root / "train_images" / f"{id_code}.png")
    lines = ["id_code,diagnosis"] + [f"{i},{g}" for i, g in _GRADES]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


class Aptos2019BuilderTest(tfds.testing.DatasetBuilderTestCase):
    """Standard TFDS builder checks on the generated dummy data."""

    DATASET_CLASS = aptos.Aptos2019
    SPLITS = {"train": 3, "test": 5}
    SKIP_CHECKSUMS = True

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.mkdtemp()
        cls.EXAMPLE_DIR = str(make_dummy_aptos(pathlib.Path(cls._tmp)))
        cls._patches = _small_builder_patches()
        for patch in cls._patches:
            patch.start()
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        for patch in cls._patches:
            patch.stop()
        shutil.rmtree(cls._tmp, ignore_errors=True)


def test_default_sizes_are_the_reference():
    assert aptos.Aptos2019.NUM_TRAIN == 1000
    assert aptos.Aptos2019.IMAGE_SIZE == 512
    assert aptos.Aptos2019.name == "aptos2019"


def test_builder_is_registered_by_import(tmp_path):
    builder = tfds.builder("aptos2019", data_dir=str(tmp_path))
    assert isinstance(builder, aptos.Aptos2019)


def test_split_matches_global_random_seed_1_shuffle():
    ids = [f"id{i:04d}" for i in range(1805)]
    state = random.getstate()
    try:
        random.seed(1)
        shuffled = list(ids)
        random.shuffle(shuffled)
    finally:
        random.setstate(state)
    train, test = aptos.reference_split(ids)
    assert train == shuffled[:1000]
    assert test == shuffled[1000:]


def test_builder_splits_and_images(tmp_path, monkeypatch):
    for name, value in _SMALL.items():
        monkeypatch.setattr(aptos.Aptos2019, name, value)
    manual = make_dummy_aptos(tmp_path / "manual")
    builder = aptos.Aptos2019(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    state = random.getstate()
    try:
        random.seed(1)
        normals = [i for i, g in _GRADES if g == 0]
        random.shuffle(normals)
    finally:
        random.setstate(state)
    grade_of = dict(_GRADES)
    expected = {
        "train": set(normals[:3]),
        "test": set(normals[3:]) | {i for i, g in _GRADES if g},
    }
    for split, wanted in expected.items():
        found = set()
        for example in tfds.as_numpy(builder.as_dataset(split=split)):
            id_code = example["file_name"].decode().removesuffix(".png")
            grade = grade_of[id_code]
            assert example["defect_type"].decode() == f"grade_{grade}"
            assert example["label"] == (0 if grade == 0 else 1)
            source = np.asarray(Image.open(manual / "train_images" / f"{id_code}.png"))
            # PNG is lossless: the stored image is exactly the cropped source.
            np.testing.assert_array_equal(
                example["image"], aptos.fundus_crop(source, size=24)
            )
            found.add(id_code)
        assert found == wanted


def _oracle_resize(image, out_h, out_w):
    """Bilinear sampling at half-pixel source coordinates with scipy."""
    image = np.asarray(image, np.float64)

    def coords(n_in, n_out):
        return np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)

    rows, cols = np.meshgrid(
        coords(image.shape[0], out_h), coords(image.shape[1], out_w), indexing="ij"
    )
    channels = [
        scipy.ndimage.map_coordinates(
            image[..., c], [rows, cols], order=1, mode="nearest"
        )
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=-1)


@pytest.mark.parametrize("out_size", [(7, 5), (24, 31), (64, 64), (3, 90)])
def test_resize_matches_map_coordinates(out_size):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (19, 23, 3), dtype=np.uint8)
    oracle = _oracle_resize(image, *out_size)
    np.testing.assert_allclose(
        aptos.resize_bilinear_float(image, out_size), oracle, atol=1e-9
    )
    resized = aptos.resize_bilinear(image, out_size)
    # Away from exact .5 ties, rounding half up of the oracle is the answer.
    clear = np.abs(oracle - np.floor(oracle) - 0.5) > 1e-6
    expected = np.floor(oracle + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(resized[clear], expected[clear])


def test_resize_closed_form_upsampling():
    # cv2.resize([[0, 255]], (4, 1), INTER_LINEAR) samples x = -0.25 (clamped
    # to 0), 0.25, 0.75 and 1.25 (clamped to 1).
    image = np.array([[[0], [255]]], np.uint8)
    resized = aptos.resize_bilinear(image, (1, 4))
    np.testing.assert_array_equal(resized[0, :, 0], [0, 64, 191, 255])


def _reference_crop(image, margin):
    """Naive transcription of the reference crop with skimage and np.pad."""
    labels = skimage.measure.label(image.sum(axis=-1) > 30)
    region = max(skimage.measure.regionprops(labels), key=lambda r: r.area)
    extent = (np.array(region.bbox[2:4]) - np.array(region.bbox[0:2])).max()
    lo = np.trunc(np.array(region.centroid) - extent / 2).astype(int) - margin
    hi = np.trunc(np.array(region.centroid) + extent / 2).astype(int) + margin
    pad = max(0, -lo.min(), (hi - np.array(image.shape[:2])).max())
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    return padded[lo[0] + pad : hi[0] + pad, lo[1] + pad : hi[1] + pad]


@pytest.mark.parametrize(
    "centre, radius",
    # Square crop inside the image rows; disc cut by the top border (zero
    # fill, truncation gives a 40x41 crop); disc cut by the right border with
    # a diagonal-only neighbour (44x44 crop only with 8-connectivity).
    [((40, 50), 20), ((12, 30), 15), ((45, 88), 18)],
)
def test_fundus_crop_matches_naive_reference(centre, radius):
    image = _disc_image(60, 100, centre, radius)
    # A smaller bright blob that must be ignored (not the largest region).
    image[56:59, 2:5] = 200
    # A pixel touching the disc's top pixel only diagonally: 8-connectivity
    # joins it, which makes the box one row taller than wide.
    top = centre[0] - radius
    if top >= 1:
        image[top - 1, centre[1] + 1] = 250
    expected_crop = _reference_crop(image, margin=5)
    for size in (expected_crop.shape[0], 128):
        oracle = _oracle_resize(expected_crop, size, size)
        clear = np.abs(oracle - np.floor(oracle) - 0.5) > 1e-6
        crop = aptos.fundus_crop(image, size=size)
        assert crop.shape == (size, size, 3)
        np.testing.assert_array_equal(
            crop[clear], np.floor(oracle + 0.5).astype(np.uint8)[clear]
        )


def test_fundus_crop_square_case_is_a_plain_crop():
    image = _disc_image(90, 100, (40, 50), 20)
    # Centroid (40, 50), box side 41: rows trunc(40 -+ 20.5) = 19..60 and
    # columns 29..70, each widened by the 5 px margin.
    expected_crop = image[14:65, 24:75]
    np.testing.assert_array_equal(_reference_crop(image, margin=5), expected_crop)
    # Output size equal to the crop size: the resize is the identity.
    np.testing.assert_array_equal(aptos.fundus_crop(image, size=51), expected_crop)


def test_fundus_crop_centres_the_disc_with_margin():
    radius, margin = 20, 5
    image = _disc_image(70, 90, (35, 41), radius)
    crop = aptos.fundus_crop(image, size=512, margin=margin)
    assert crop.shape == (512, 512, 3)
    rows, cols = np.nonzero(crop.sum(axis=-1) > 30)
    scale = 512 / (2 * radius + 1 + 2 * margin)
    # The disc's centre lands in the middle and its edge ~margin px inside.
    assert abs(rows.mean() - 255.5) < scale and abs(cols.mean() - 255.5) < scale
    assert abs(rows.min() - margin * scale) < 1.5 * scale
    assert abs(511 - cols.max() - margin * scale) < 1.5 * scale


def test_black_image_error_names_the_file(tmp_path, monkeypatch):
    for name, value in _SMALL.items():
        monkeypatch.setattr(aptos.Aptos2019, name, value)
    manual = make_dummy_aptos(tmp_path / "manual")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
        manual / "train_images" / "a0.png"
    )
    builder = aptos.Aptos2019(data_dir=str(tmp_path / "tfds"))
    with pytest.raises(aptos.DatasetLayoutError, match="a0.png"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
        )
