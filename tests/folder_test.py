"""Tests for the MVTec-layout folder reader (recontrast_jax.data.folder)."""

import os

import numpy as np
import pytest
from PIL import Image

from recontrast_jax.data import folder


def _save(path, array=None, mode=None, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if array is None:
        array = np.full((size, size, 3), 128, np.uint8)
    Image.fromarray(array, mode).save(path)
    return str(path)


def _mask(value=255, size=8):
    return np.full((size, size), value, np.uint8)


def test_scan_category_orders_and_pairs_masks_by_stem(tmp_path):
    cat = tmp_path / "widget"
    train = [_save(cat / "train/good" / n) for n in ("002.png", "000.png", "001.png")]
    (cat / "train/good/old.png.bak").write_bytes(b"x")  # Not an image extension.
    (cat / "train/good/readme.txt").write_text("not an image")
    good = [_save(cat / "test/good" / n) for n in ("1.png", "0.png")]
    crack = [_save(cat / "test/crack" / n) for n in ("10.png", "9.png")]
    dent = [_save(cat / "test/dent" / "a.JPG")]
    # An orphan mask that sorts first: pairing by sorted position would shift
    # every crack mask by one.
    _save(cat / "ground_truth/crack/0_mask.png", _mask(), "L")
    crack_masks = {
        stem: _save(cat / f"ground_truth/crack/{stem}_mask.png", _mask(), "L")
        for stem in ("9", "10")
    }
    dent_mask = _save(cat / "ground_truth/dent/a.png", _mask(), "L")  # VisA style.

    files = folder.scan_category(tmp_path, "widget")

    assert files.root == str(tmp_path) and files.category == "widget"
    assert [s.path for s in files.train] == sorted(train)
    assert all(s.label == 0 and s.mask_path is None for s in files.train)
    expected = [
        (good[1], None, 0, "good"),
        (good[0], None, 0, "good"),
        (crack[0], crack_masks["10"], 1, "crack"),  # "10.png" < "9.png" by name.
        (crack[1], crack_masks["9"], 1, "crack"),
        (dent[0], dent_mask, 1, "dent"),
    ]
    got = [(s.path, s.mask_path, s.label, s.defect_type) for s in files.test]
    assert got == expected


def test_list_categories_keeps_only_folders_with_train_good(tmp_path):
    _save(tmp_path / "b/train/good/0.png")
    _save(tmp_path / "a/train/good/0.png")
    _save(tmp_path / "c/test/good/0.png")  # No train/good.
    (tmp_path / "file.txt").write_text("x")
    assert folder.list_categories(tmp_path) == ["a", "b"]


def test_list_categories_errors_name_the_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(folder.DatasetError, match="does not exist") as e:
        folder.list_categories(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(folder.DatasetError, match="no category") as e:
        folder.list_categories(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_root_category_and_test_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(folder.DatasetError) as e:
        folder.scan_category(missing, "x")
    assert str(missing) in str(e.value)
    with pytest.raises(folder.DatasetError) as e:
        folder.scan_category(tmp_path, "x")
    assert str(tmp_path / "x") in str(e.value)
    _save(tmp_path / "x/train/good/0.png")
    with pytest.raises(folder.DatasetError, match="test folder") as e:
        folder.scan_category(tmp_path, "x")
    assert str(tmp_path / "x" / "test") in str(e.value)


def test_empty_train_folder(tmp_path):
    train_dir = tmp_path / "x/train/good"
    train_dir.mkdir(parents=True)
    (train_dir / "thumbs.db").write_text("x")
    with pytest.raises(folder.DatasetError) as e:
        folder.scan_category(tmp_path, "x")
    assert str(e.value) == f"no training images in {train_dir}"


def test_missing_mask_names_image_and_tried_masks(tmp_path):
    _save(tmp_path / "x/train/good/0.png")
    image = _save(tmp_path / "x/test/hole/007.png")
    _save(tmp_path / "x/ground_truth/hole/008_mask.png", _mask(), "L")
    with pytest.raises(folder.DatasetError) as e:
        folder.scan_category(tmp_path, "x")
    message = str(e.value)
    gt = tmp_path / "x/ground_truth/hole"
    for path in (image, gt / "007_mask.png", gt / "007.png"):
        assert str(path) in message


def test_corrupt_file_raises_with_path(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(np.random.default_rng(0).bytes(500))
    for load in (folder.load_rgb, folder.load_mask):
        with pytest.raises(folder.DatasetError) as e:
            load(path)
        assert str(path) in str(e.value)


def test_truncated_png_raises_with_path(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _save(tmp_path / "full.png", noise)
    data = open(full, "rb").read()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(folder.DatasetError) as e:
        folder.load_rgb(path)
    assert str(path) in str(e.value)


def test_missing_file_raises_with_path(tmp_path):
    path = tmp_path / "gone.png"
    with pytest.raises(folder.DatasetError, match="does not exist") as e:
        folder.load_rgb(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "RGB", "1"])
def test_png_modes_load_like_pil_convert(tmp_path, mode):
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16))
    elif mode == "RGBA":
        rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
        image = Image.fromarray(rgba)
    elif mode == "P":
        image = rgb.quantize(colors=16)
    else:
        image = rgb.convert(mode)
    assert image.mode == mode
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    image.save(path)

    expected_rgb = np.asarray(Image.open(path).convert("RGB"))
    expected_l = np.asarray(Image.open(path).convert("L"))
    got_rgb = folder.load_rgb(path)
    got_l = folder.load_mask(path)
    assert got_rgb.dtype == np.uint8 and got_rgb.shape == (9, 7, 3)
    np.testing.assert_array_equal(got_rgb, expected_rgb)
    assert got_l.dtype == np.uint8 and got_l.shape == (9, 7)
    np.testing.assert_array_equal(got_l, expected_l)


def test_jpeg_and_uppercase_extensions_are_images(tmp_path):
    for name in ("a.JPG", "b.jpeg", "c.BMP", "d.tif", "e.TIFF", "f.png"):
        _save(tmp_path / "x/train/good" / name)
    _save(tmp_path / "x/test/good/g.png")
    files = folder.scan_category(tmp_path, "x")
    assert [os.path.basename(s.path) for s in files.train] == [
        "a.JPG",
        "b.jpeg",
        "c.BMP",
        "d.tif",
        "e.TIFF",
        "f.png",
    ]
