"""Tests for recontrast_jax.reports (atomic files, jet colours, panels, tables)."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from recontrast_jax import reports

# matplotlib's 'jet' definition (matplotlib/_cm.py, _jet_data), copied here as the
# oracle: (x, value) breakpoints per channel, linear in between.
JET_RED = ([0.0, 0.35, 0.66, 0.89, 1.0], [0.0, 0.0, 1.0, 1.0, 0.5])
JET_GREEN = ([0.0, 0.125, 0.375, 0.64, 0.91, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
JET_BLUE = ([0.0, 0.11, 0.34, 0.65, 1.0], [0.5, 1.0, 1.0, 0.0, 0.0])


def _jet_reference(x):
    return 255.0 * np.stack(
        [np.interp(x, *JET_RED), np.interp(x, *JET_GREEN), np.interp(x, *JET_BLUE)], -1
    )


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_text_creates_parents_and_overwrites(tmp_path):
    path = tmp_path / "a" / "b" / "result.txt"
    reports.atomic_write_text(path, "first")
    reports.atomic_write_text(path, "second, longer content")
    assert path.read_text() == "second, longer content"
    assert _leftovers(path.parent) == []
    assert os.listdir(path.parent) == ["result.txt"]


def test_atomic_write_bytes_roundtrip(tmp_path):
    data = bytes(range(256)) * 10
    reports.atomic_write_bytes(tmp_path / "blob.bin", data)
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert _leftovers(tmp_path) == []


def test_atomic_write_json_sorted_indented_and_numpy(tmp_path):
    path = tmp_path / "metrics.json"
    obj = {
        "b": np.float32(0.5),
        "a": [np.int64(3), np.arange(2)],
        "c": {"z": 1, "y": True},
    }
    reports.atomic_write_json(path, obj)
    text = path.read_text()
    assert json.loads(text) == {"a": [3, [0, 1]], "b": 0.5, "c": {"y": True, "z": 1}}
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')
    assert '\n  "a": [' in text  # indent 2


def test_failed_json_write_keeps_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    reports.atomic_write_json(path, {"auroc": 0.9})
    with pytest.raises(TypeError):
        reports.atomic_write_json(path, {"auroc": object()})
    assert json.loads(path.read_text()) == {"auroc": 0.9}
    assert _leftovers(tmp_path) == []


def test_failed_write_mid_stream_removes_temp_and_keeps_file(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    reports.atomic_write_text(path, "old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(reports.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        reports.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_colorize_endpoints_and_middle():
    rgb = reports.colorize(np.array([[0.0, 5.0, 10.0]]), vmin=0.0, vmax=10.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 3, 3)
    low, mid, high = rgb[0].astype(int)
    # Dark blue (0, 0, ~128), dark red (~128, 0, 0), greenish in the middle.
    np.testing.assert_allclose(low, [0, 0, 127.5], atol=1)
    np.testing.assert_allclose(high, [127.5, 0, 0], atol=1)
    assert mid[1] == 255 and mid[0] < 160 and mid[2] < 160
    np.testing.assert_allclose(mid, _jet_reference(0.5), atol=3)


def test_colorize_matches_jet_definition_and_clips():
    values = np.linspace(-2.0, 3.0, 501).reshape(1, -1)
    got = reports.colorize(values, vmin=-1.0, vmax=2.0).astype(float)
    expected = _jet_reference(np.clip((values - -1.0) / 3.0, 0.0, 1.0))
    # matplotlib quantises to 256 colours; the steepest jet segment changes by
    # 4 * 255 / 256 per table entry, plus 1 for the truncation to bytes.
    np.testing.assert_allclose(got, expected, atol=5)


def test_overlay_is_weighted_mean():
    image = np.full((2, 3), 100, np.uint8)
    heat = np.full((2, 3, 3), [200, 0, 50], np.uint8)
    got = reports.overlay(image, heat, alpha=0.25)
    np.testing.assert_array_equal(got[0, 0], [125, 75, 88])  # 0.75*100 + 0.25*heat


def test_heatmap_panel_layout_and_tiles():
    h, w = 40, 30
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[10:20, 5:12] = 255
    amap = np.zeros((h, w))
    amap[:, w // 2 :] = 1.0

    panel = reports.heatmap_panel(
        image, mask, amap, score=0.75, vmin=0.0, vmax=1.0, title="x.png"
    )
    gap, caption = reports._GAP, 2 * reports._LINE_HEIGHT
    assert panel.dtype == np.uint8
    assert panel.shape == (caption + h, 4 * w + 3 * gap, 3)

    def tile(i):
        left = i * (w + gap)
        return panel[caption:, left : left + w]

    np.testing.assert_array_equal(tile(0), image)
    expected_mask = np.zeros((h, w, 3), np.uint8)
    expected_mask[10:20, 5:12] = 255
    np.testing.assert_array_equal(tile(1), expected_mask)
    np.testing.assert_allclose(tile(2)[0, 0], [0, 0, 127.5], atol=1)  # vmin: dark blue
    np.testing.assert_allclose(tile(2)[0, -1], [127.5, 0, 0], atol=1)  # vmax: dark red
    np.testing.assert_allclose(
        tile(3).astype(float), (image.astype(float) + tile(2)) / 2, atol=1
    )
    # The caption strip has text (dark pixels) on a white background.
    assert (panel[:caption] < 100).any() and (panel[:caption] == 255).mean() > 0.5


def test_heatmap_panel_rejects_size_mismatch():
    image = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="anomaly map"):
        reports.heatmap_panel(image, None, np.zeros((4, 4)), 0.0, 0.0, 1.0)


def test_save_png_roundtrip(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "panel.png"
    reports.save_png(path, array)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), array)
    assert _leftovers(path.parent) == []
    with pytest.raises(ValueError, match="panel.png"):
        reports.save_png(path, array.astype(np.float32))


def _parse_row(markdown, label):
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"row {label} not found in\n{markdown}")


def test_results_markdown_mean_row_and_missing_values():
    rows = {
        "bottle": {"image_auroc": 1.0, "pixel_auroc": 0.9876, "aupro": 0.95},
        "cable": {"image_auroc": 0.9712, "pixel_auroc": 0.97},
        "capsule": {"image_auroc": 0.9123, "pixel_auroc": 0.9911, "aupro": 0.9},
    }
    metrics = ["image_auroc", "pixel_auroc", "aupro"]
    text = reports.results_markdown(rows, metrics, title="MVTec AD")

    assert text.startswith("## MVTec AD")
    assert re.search(
        r"^\| category \| image_auroc \| pixel_auroc \| aupro \|$", text, re.M
    )
    assert _parse_row(text, "bottle") == ["100.00", "98.76", "95.00"]
    assert _parse_row(text, "cable")[2] == "-"
    mean = _parse_row(text, "**mean**")
    for cell, name in zip(mean, metrics, strict=True):
        values = [r[name] for r in rows.values() if name in r]
        assert float(cell) == pytest.approx(100 * np.mean(values), abs=0.005)
    assert text.strip().splitlines()[-1].startswith("| **mean**")
