"""Tests for the embedded synthetic dataset (recontrast_jax.data.synthetic)."""

import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from recontrast_jax.data import folder, synthetic

SMALL = dict(image_size=64, num_train=3, num_test_good=2, num_test_per_defect=2)


def _read_tree(root):
    """All PNGs under root as {relative path: array}."""
    arrays = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".png"):
                path = os.path.join(dirpath, name)
                arrays[os.path.relpath(path, root)] = np.asarray(Image.open(path))
    return arrays


def test_generation_is_deterministic(tmp_path):
    a = _read_tree(synthetic.ensure_embedded_dataset(tmp_path / "a", **SMALL))
    b = _read_tree(synthetic.ensure_embedded_dataset(tmp_path / "b", **SMALL))
    per_category = 3 + 2 + 2 * len(synthetic.DEFECT_TYPES) * 2  # Images and masks.
    assert len(a) == 3 * per_category
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_layout_is_read_by_folder_reader(tmp_path):
    root = synthetic.ensure_embedded_dataset(tmp_path / "d", **SMALL)
    assert folder.list_categories(root) == sorted(synthetic.CATEGORIES)
    for category in synthetic.CATEGORIES:
        files = folder.scan_category(root, category)
        assert [os.path.basename(s.path) for s in files.train] == [
            "000.png",
            "001.png",
            "002.png",
        ]
        types = [s.defect_type for s in files.test]
        assert types == ["good"] * 2 + [
            t for t in sorted(synthetic.DEFECT_TYPES) for _ in range(2)
        ]
        for sample in files.test:
            image = folder.load_rgb(sample.path)
            assert image.shape == (64, 64, 3)
            if sample.mask_path:
                assert sample.mask_path.endswith("_mask.png")
                mask_image = Image.open(sample.mask_path)
                assert mask_image.mode == "L"
                assert set(np.unique(np.asarray(mask_image))) <= {0, 255}


def test_masks_are_exact_and_defects_visible(tmp_path):
    size = 128
    root = synthetic.ensure_embedded_dataset(
        tmp_path / "d",
        image_size=size,
        num_train=1,
        num_test_good=1,
        num_test_per_defect=3,
    )
    for category in synthetic.CATEGORIES:
        for sample in folder.scan_category(root, category).test:
            if sample.mask_path is None:
                continue
            image = folder.load_rgb(sample.path)
            mask = folder.load_mask(sample.mask_path) > 0
            index = int(os.path.basename(sample.path)[:3])
            base = synthetic.render_sample(
                category, sample.defect_type, index, size
            ).base
            where = f"{sample.path}"
            assert mask.any(), where
            # Outside the mask the image is the untouched base crop, bit for bit.
            np.testing.assert_array_equal(image[~mask], base[~mask], err_msg=where)
            changed = (image != base).any(axis=-1)
            assert changed[mask].mean() > 0.8, where
            # Size: between ~5% and ~45% of the side.
            rows, cols = np.nonzero(mask)
            extent = max(np.ptp(rows), np.ptp(cols)) + 1
            assert 0.05 * size <= extent <= 0.45 * size, (where, extent)
            # Visible after PIL downscaling to 64 px: a clear mean change.
            small = lambda a: np.asarray(  # noqa: E731
                Image.fromarray(a).resize((64, 64), Image.BILINEAR), np.float32
            )
            small_mask = small(mask.astype(np.uint8) * 255) > 127
            if small_mask.sum() >= 2:
                diff = np.abs(small(image) - small(base)).max(-1)
                assert diff[small_mask].mean() > 25, (where, diff[small_mask].mean())


def test_normal_images_differ_and_are_tinted():
    images = [synthetic.render_sample("grass", "train", i, 64).image for i in range(3)]
    assert not np.array_equal(images[0], images[1])
    means = images[0].reshape(-1, 3).mean(0)
    assert means[1] > means[0] and means[1] > means[2]  # Grass is greenish.
    sample = synthetic.render_sample("brick", "good", 0, 64)
    assert sample.mask is None and sample.image is sample.base


def test_marker_makes_second_call_a_noop(tmp_path, monkeypatch):
    root = synthetic.ensure_embedded_dataset(tmp_path / "d", **SMALL)
    marker = json.loads((root / synthetic.MARKER_NAME).read_text())
    assert marker["image_size"] == 64 and marker["num_train"] == 3

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic, "render_sample", fail)
    assert synthetic.ensure_embedded_dataset(tmp_path / "d", **SMALL) == root


def test_other_parameters_regenerate(tmp_path):
    root = synthetic.ensure_embedded_dataset(tmp_path / "d", **SMALL)
    synthetic.ensure_embedded_dataset(root, **{**SMALL, "num_train": 4})
    assert len(os.listdir(root / "brick/train/good")) == 4
    assert sorted(os.listdir(tmp_path)) == [".d.lock", "d"]  # No leftovers.


def test_half_written_dir_is_not_mistaken_for_complete(tmp_path):
    root = synthetic.ensure_embedded_dataset(tmp_path / "d", **SMALL)
    (root / synthetic.MARKER_NAME).unlink()
    (root / "gravel/test/hole/001.png").unlink()
    synthetic.ensure_embedded_dataset(root, **SMALL)
    assert (root / "gravel/test/hole/001.png").is_file()
    assert (root / synthetic.MARKER_NAME).is_file()


def test_crash_leaves_no_dataset_and_no_temporary(tmp_path, monkeypatch):
    calls = []
    original = synthetic.render_sample

    def crash_late(*args, **kwargs):
        calls.append(args)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_sample", crash_late)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_embedded_dataset(tmp_path / "d", **SMALL)
    assert sorted(os.listdir(tmp_path)) == [".d.lock"]
    # A stale temporary from a killed process is cleaned up, never used.
    (tmp_path / ".d.tmp-stale").mkdir()
    monkeypatch.setattr(synthetic, "render_sample", original)
    root = synthetic.ensure_embedded_dataset(tmp_path / "d", **SMALL)
    assert sorted(os.listdir(tmp_path)) == [".d.lock", "d"]
    assert len(os.listdir(root / "brick/train/good")) == 3


def test_concurrent_callers_get_one_complete_dataset(tmp_path):
    results, errors = [], []

    def call():
        try:
            results.append(synthetic.ensure_embedded_dataset(tmp_path / "d", **SMALL))
        except Exception as e:  # noqa: BLE001 - reported by the assert below.
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [tmp_path / "d"] * 3
    assert len(_read_tree(tmp_path / "d")) == 3 * (3 + 2 + 2 * 5 * 2)


def test_refuses_to_overwrite_unrelated_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(folder.DatasetError) as e:
        synthetic.ensure_embedded_dataset(root, **SMALL)
    assert str(root) in str(e.value)
    assert (root / "thesis.tex").read_text() == "precious"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RECONTRAST_JAX_DATA", str(tmp_path / "x"))
    assert synthetic.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("RECONTRAST_JAX_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".cache" / "recontrast_jax" / "embedded_v1"
    assert synthetic.default_cache_dir() == expected


def test_generation_says_where_the_dataset_goes(tmp_path, capsys):
    synthetic.ensure_embedded_dataset(tmp_path / "e", **SMALL)
    err = capsys.readouterr().err
    assert f"generating the embedded dataset in {tmp_path / 'e'}" in err
    assert "$RECONTRAST_JAX_DATA" in err
    synthetic.ensure_embedded_dataset(tmp_path / "e", **SMALL)
    assert "generating" not in capsys.readouterr().err  # reused silently
