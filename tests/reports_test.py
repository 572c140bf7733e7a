"""Tests for recontrast_jax.reports (atomic files, jet colours, panels, tables)."""

import json
import os
import re
from html.parser import HTMLParser

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


# --- score histogram --------------------------------------------------------


def _expected_range(values):
    # Independent transcription of the documented range: min..max of scores and
    # thresholds, widened by 5 % of the span on each side.
    low, high = min(values), max(values)
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def _expected_column(value, x_range, width):
    left = reports.HIST_MARGIN_LEFT
    right = width - reports.HIST_MARGIN_RIGHT - 1
    low, high = x_range
    return int(round(left + (value - low) / (high - low) * (right - left)))


def _plot_rows(height):
    # Below the stacked threshold labels, above the x axis.
    top = reports.HIST_MARGIN_TOP + 3 * reports._LINE_HEIGHT
    return slice(top, height - reports.HIST_MARGIN_BOTTOM - 2)


def _reddish(pixels):
    pixels = pixels.astype(int)
    return (pixels[..., 0] - pixels[..., 2]) > 60


def _bluish(pixels):
    pixels = pixels.astype(int)
    return (pixels[..., 2] - pixels[..., 0]) > 60


def _separated_scores():
    rng = np.random.default_rng(3)
    return rng.uniform(0.0, 1.0, 300), rng.uniform(3.0, 4.0, 300)


def test_score_histogram_shape_and_dtype():
    normal, anomalous = _separated_scores()
    image = reports.score_histogram(
        normal, anomalous, {"t": 2.0}, title="x", size=(500, 300)
    )
    assert image.dtype == np.uint8
    assert image.shape == (300, 500, 3)


def test_score_histogram_threshold_line_at_mapped_column():
    normal, anomalous = _separated_scores()
    width, height = 640, 400
    threshold = 2.6
    image = reports.score_histogram(
        normal, anomalous, {"quantile 0.99": threshold}, size=(width, height)
    )
    x_range = _expected_range([*normal, *anomalous, threshold])
    column = _expected_column(threshold, x_range, width)
    rows = _plot_rows(height)
    black = (image[rows] == 0).all(axis=-1)
    # Dashed: about 6 of every 10 pixels of the column are the line colour.
    assert black[:, column].mean() > 0.5
    # The gap between the groups is empty apart from the line itself.
    for offset in (-4, -3, 3, 4):
        assert not black[:, column + offset].any()


def test_score_histogram_colours_in_expected_halves():
    normal, anomalous = _separated_scores()
    width, height = 640, 400
    image = reports.score_histogram(normal, anomalous, {}, size=(width, height))
    x_range = _expected_range([*normal, *anomalous])
    split = _expected_column(2.0, x_range, width)
    plot = image[_plot_rows(height), reports.HIST_MARGIN_LEFT + 1 : width - 17]
    split -= reports.HIST_MARGIN_LEFT + 1
    left, right = plot[:, :split], plot[:, split:]
    assert _bluish(left).sum() > 1000 and not _reddish(left).any()
    assert _reddish(right).sum() > 1000 and not _bluish(right).any()
    # Nothing blue right of the upper edge of the bin holding the largest
    # normal score (30 equal bins over the range).
    edges = np.linspace(*x_range, 31)
    last_edge = edges[np.searchsorted(edges, normal.max(), side="right")]
    beyond = _expected_column(last_edge, x_range, width) + 1
    assert _bluish(image[_plot_rows(height), beyond - 4 : beyond - 1]).any()
    assert not _bluish(image[_plot_rows(height), beyond:]).any()


def test_score_histogram_without_anomalous_scores():
    normal, _ = _separated_scores()
    width, height = 400, 300
    image = reports.score_histogram(
        normal, [], {"max": float(normal.max())}, size=(width, height)
    )
    assert image.shape == (height, width, 3)
    plot = image[_plot_rows(height)]
    assert _bluish(plot).sum() > 1000 and not _reddish(plot).any()
    # Nothing at all (no scores, no thresholds) still gives an empty plot.
    empty = reports.score_histogram([], [], {}, size=(width, height))
    assert not _bluish(empty[_plot_rows(height)]).any()


def test_score_histogram_rejects_nan_scores():
    with pytest.raises(ValueError, match="normal scores"):
        reports.score_histogram([0.1, float("nan")], [], {})


# --- gallery ------------------------------------------------------------------


class _GalleryParser(HTMLParser):
    """Collects per section heading the image sources and card names/scores."""

    def __init__(self):
        super().__init__()
        self.sections = {}  # h2 text -> list of cards
        self.images = []
        self.headings = []
        self._current = None
        self._capture = None  # ('h2' | 'h3' | 'name' | 'score', buffer)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
            if self._current is not None and attrs.get("class") != "histogram":
                self.sections[self._current].append({"src": attrs["src"]})
        elif tag in ("h2", "h3"):
            self._capture = (tag, [])
        elif tag == "span" and attrs.get("class") in ("name", "score"):
            self._capture = (attrs["class"], [])

    def handle_data(self, data):
        if self._capture is not None:
            self._capture[1].append(data)

    def handle_endtag(self, tag):
        if self._capture is None or tag not in ("h2", "h3", "span"):
            return
        kind, parts = self._capture
        text = "".join(parts)
        self._capture = None
        if kind == "h2":
            self._current = text
            self.sections[text] = []
            self.headings.append(text)
        elif kind == "h3":
            self.headings.append(text)
        else:
            self.sections[self._current][-1][kind] = text


def _parse_gallery(path):
    parser = _GalleryParser()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    parser.close()
    return parser


def _entries():
    scores = [0.3, 2.5, -1.0, 7.25, 1.5, 0.9, 4.0]
    labels = [0, 1, 0, 1, 1, 0, 0]
    return [
        {
            "image": f"panels/{i}.png",
            "name": f"<b>item {i} & co</b>",
            "score": s,
            "label": y,
            "decision": int(s > 1.0),
        }
        for i, (s, y) in enumerate(zip(scores, labels, strict=True))
    ]


def test_gallery_sections_order_and_images(tmp_path):
    entries = _entries()
    reports.save_png(tmp_path / "histogram.png", np.zeros((4, 4, 3), np.uint8))
    path = reports.write_gallery(tmp_path, entries, "bottle", "rule: quantile 0.99")
    assert path == str(tmp_path / "index.html")
    page = _parse_gallery(path)
    n = len(entries)
    # Most + least anomalous show all 7; worst mistakes shows every labelled one.
    assert len(page.images) == 1 + 3 * n
    assert page.images[0] == "histogram.png"
    assert [h for h in page.headings if h in page.sections] == [
        "Most anomalous",
        "Least anomalous",
        "Worst mistakes",
    ]
    most = page.sections["Most anomalous"]
    scores = [float(card["score"]) for card in most]
    assert scores == sorted((e["score"] for e in entries), reverse=True)
    assert [c["name"] for c in most] == [
        e["name"] for e in sorted(entries, key=lambda e: -e["score"])
    ]
    least = [float(c["score"]) for c in page.sections["Least anomalous"]]
    assert least == sorted(e["score"] for e in entries)
    worst = page.sections["Worst mistakes"]
    anomalous = sorted(
        (e for e in entries if e["label"] == 1), key=lambda e: e["score"]
    )
    normal = sorted(
        (e for e in entries if e["label"] == 0), key=lambda e: e["score"], reverse=True
    )
    assert [c["name"] for c in worst] == [e["name"] for e in anomalous + normal]
    assert {c["src"] for c in most} == {e["image"] for e in entries}


def test_gallery_escapes_names_and_is_self_contained(tmp_path):
    path = reports.write_gallery(tmp_path, _entries(), "a < b", "x & y")
    text = open(path, encoding="utf-8").read()
    assert "<b>item" not in text
    assert "&lt;b&gt;item 0 &amp; co&lt;/b&gt;" in text
    assert "a &lt; b" in text and "x &amp; y" in text
    assert "<script" not in text.lower() and "http" not in text.lower()
    assert _leftovers(tmp_path) == []


def test_gallery_without_labels_or_histogram(tmp_path):
    entries = [dict(e, label=None) for e in _entries()]
    for e in entries:
        del e["decision"]
    page = _parse_gallery(reports.write_gallery(tmp_path, entries, "t"))
    assert "Worst mistakes" not in page.sections
    assert "histogram.png" not in page.images
    assert len(page.images) == 2 * len(entries)
    assert "decision" not in (tmp_path / "index.html").read_text()


def test_gallery_per_section_limit_and_bad_entry(tmp_path):
    page = _parse_gallery(
        reports.write_gallery(tmp_path, _entries(), "t", per_section=2)
    )
    assert [float(c["score"]) for c in page.sections["Most anomalous"]] == [7.25, 4.0]
    assert len(page.sections["Worst mistakes"]) == 4
    with pytest.raises(ValueError, match=r"entry 1 .*'score'"):
        reports.write_gallery(tmp_path / "g", [_entries()[0], {"name": "x"}], "t")
