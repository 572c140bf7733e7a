"""Tests for recontrast_jax.reports (atomic files, plots, tables, galleries)."""

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from PIL import Image

from recontrast_jax import reports

# The oracle for colours: matplotlib's own colour map, as imshow would use it.
JET = matplotlib.colormaps["jet"]


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


def _jet_bytes(fraction):
    return np.asarray(JET(fraction, bytes=True))[..., :3]


def test_colorize_ends_are_jets_ends_and_values_clip():
    rgb = reports.colorize(np.array([[-5.0, 0.0, 10.0, 15.0]]), vmin=0.0, vmax=10.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    low, high = _jet_bytes(0.0), _jet_bytes(1.0)
    np.testing.assert_array_equal(rgb[0], [low, low, high, high])
    assert low[2] > 100 and low[:2].max() == 0  # dark blue
    assert high[0] > 100 and high[1:].max() == 0  # dark red


def test_colorize_matches_imshow_colours():
    values = np.linspace(-2.0, 3.0, 501).reshape(1, -1)
    got = reports.colorize(values, vmin=-1.0, vmax=2.0)
    expected = JET(Normalize(-1.0, 2.0, clip=True)(values), bytes=True)[..., :3]
    np.testing.assert_array_equal(got, expected)


def test_colorize_nan_and_empty_range_show_vmin():
    low = _jet_bytes(0.0)
    np.testing.assert_array_equal(
        reports.colorize(np.array([[np.nan]]), 0.0, 1.0)[0, 0], low
    )
    flat = reports.colorize(np.array([[0.0, 3.0]]), vmin=1.0, vmax=1.0)
    np.testing.assert_array_equal(flat[0], [low, low])


def test_overlay_is_weighted_mean():
    image = np.full((2, 3), 100, np.uint8)
    heat = np.full((2, 3, 3), [200, 0, 50], np.uint8)
    got = reports.overlay(image, heat, alpha=0.25)
    np.testing.assert_array_equal(got[0, 0], [125, 75, 88])  # 0.75*100 + 0.25*heat


def _panel_inputs(h=40, w=30):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[10:20, 5:12] = 255
    amap = np.zeros((h, w))
    amap[:, w // 2 :] = 1.0
    return image, mask, amap


def _drawn_panel(monkeypatch, *args, **kwargs):
    """The panel and the figure heatmap_panel rendered for it."""
    figures = []
    render = reports._render
    monkeypatch.setattr(
        reports, "_render", lambda fig: figures.append(fig) or render(fig)
    )
    panel = reports.heatmap_panel(*args, **kwargs)
    (fig,) = figures
    return panel, fig


def test_heatmap_panel_shows_named_tiles_score_and_scale(monkeypatch):
    image, mask, amap = _panel_inputs()
    panel, fig = _drawn_panel(
        monkeypatch, image, mask, amap, 0.75, vmin=0.0, vmax=2.0, title="x.png"
    )
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[-1] == 3
    assert panel.shape[:2] == tuple(int(v) for v in fig.bbox.size[::-1])
    tiles = fig.axes[:4]
    assert [ax.get_title() for ax in tiles] == list(reports.TILE_NAMES)
    shown = [np.asarray(ax.images[0].get_array()) for ax in tiles]
    np.testing.assert_array_equal(shown[0], image)
    np.testing.assert_array_equal(shown[1], np.repeat(mask[..., None], 3, axis=-1))
    np.testing.assert_array_equal(
        shown[2][:, 0], np.broadcast_to(_jet_bytes(0.0), (40, 3))
    )
    np.testing.assert_array_equal(
        shown[2][:, -1], np.broadcast_to(_jet_bytes(0.5), (40, 3))
    )
    np.testing.assert_allclose(
        shown[3].astype(float), (image.astype(float) + shown[2]) / 2, atol=0.5
    )
    assert [t.get_text() for t in fig.texts] == ["x.png  score 0.7500"]
    colour_bar = fig.axes[4]
    assert colour_bar.get_ylim() == (0.0, 2.0)


def test_heatmap_panel_pixels_show_mask_and_map_colours():
    image, mask, amap = _panel_inputs()
    image[:] = 128  # grey, so the pure colours below come only from the tiles
    panel = reports.heatmap_panel(image, mask, amap, 0.5, vmin=0.0, vmax=1.0)
    pixels = panel.reshape(-1, 3)

    def count(colour):
        return int((pixels == colour).all(axis=-1).sum())

    # The map's halves are vmin and vmax; tiles are enlarged, never smaller.
    assert count(_jet_bytes(0.0)) >= 40 * 15
    assert count(_jet_bytes(1.0)) >= 40 * 15
    assert count([128, 128, 128]) >= 40 * 30
    assert count([255, 255, 255]) >= 10 * 7 + 40 * 30  # mask and background


def test_heatmap_panel_mask_name_and_missing_mask(monkeypatch):
    image, _, amap = _panel_inputs()
    _, fig = _drawn_panel(
        monkeypatch,
        image[..., 0],
        None,
        amap,
        1.0,
        0.0,
        1.0,
        mask_name="predicted mask",
    )
    assert fig.axes[1].get_title() == "predicted mask"
    assert not np.asarray(fig.axes[1].images[0].get_array()).any()  # black
    assert [t.get_text() for t in fig.texts] == ["score 1.0000"]


def test_heatmap_panel_rejects_size_mismatch():
    image = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="anomaly map"):
        reports.heatmap_panel(image, None, np.zeros((4, 4)), 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="ground-truth mask"):
        reports.heatmap_panel(image, np.zeros((4, 4)), np.zeros((8, 8)), 0.0, 0.0, 1.0)


def test_heatmap_panel_draws_nan_map_and_score():
    panel = reports.heatmap_panel(
        np.zeros((8, 8), np.uint8), None, np.full((8, 8), np.nan), np.nan, 1.0, 1.0
    )
    assert panel.dtype == np.uint8 and panel.shape[-1] == 3


def test_plots_from_threads_match_sequential_plots():
    # Figures hold no shared state, so parallel workers draw the same pixels.
    image, mask, amap = _panel_inputs()
    scores = np.random.default_rng(2).normal(size=50)

    def draw(i):
        panel = reports.heatmap_panel(image, mask, amap * i, float(i), 0.0, 4.0)
        return panel, reports.score_histogram(
            scores + i, [], {"t": float(i)}, size=(320, 200)
        )

    expected = [draw(i) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(draw, range(2)))
    for (panel, hist), (want_panel, want_hist) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(panel, want_panel)
        np.testing.assert_array_equal(hist, want_hist)


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


def _separated_scores():
    rng = np.random.default_rng(3)
    return rng.uniform(0.0, 1.0, 300), rng.uniform(3.0, 4.0, 70)


def _bar_heights(ax):
    return [np.array([bar.get_height() for bar in bars]) for bars in ax.containers]


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_histogram_counts_match_numpy_with_shared_bins():
    normal, anomalous = _separated_scores()
    fig = reports.histogram_figure(normal, anomalous, {"t": 2.0}, bins=20)
    (ax,) = fig.axes
    x_range = _expected_range([*normal, *anomalous, 2.0])
    normal_counts, anomalous_counts = _bar_heights(ax)
    np.testing.assert_array_equal(
        normal_counts, np.histogram(normal, bins=20, range=x_range)[0]
    )
    np.testing.assert_array_equal(
        anomalous_counts, np.histogram(anomalous, bins=20, range=x_range)[0]
    )
    assert normal_counts.sum() == 300 and anomalous_counts.sum() == 70
    for bars in ax.containers:
        assert bars[0].get_x() == pytest.approx(x_range[0])
        assert bars[-1].get_x() + bars[-1].get_width() == pytest.approx(x_range[1])
    assert ax.get_xlim() == pytest.approx(x_range)
    assert _legend_texts(ax)[:2] == ["normal (n=300)", "anomalous (n=70)"]


def test_threshold_lines_are_at_their_values_and_named_in_the_legend():
    normal, anomalous = _separated_scores()
    thresholds = {"quantile 0.99": 2.6, "f1": 1.25, "far": 9.0, "unset": float("nan")}
    fig = reports.histogram_figure(normal, anomalous, thresholds)
    (ax,) = fig.axes
    xs = [tuple(line.get_xdata()) for line in ax.lines]
    assert xs == [(2.6, 2.6), (1.25, 1.25), (9.0, 9.0)]
    assert all(line.get_linestyle() == "--" for line in ax.lines)
    assert len({line.get_color() for line in ax.lines}) == 3
    assert _legend_texts(ax)[2:] == ["quantile 0.99: 2.6", "f1: 1.25", "far: 9"]
    # A threshold beyond every score is still inside the plot.
    assert ax.get_xlim()[1] > 9.0


def test_score_histogram_is_the_rendered_figure():
    normal, anomalous = _separated_scores()
    args = (normal, anomalous, {"t": 2.0}, "bottle", 30, (500, 300))
    image = reports.score_histogram(*args)
    assert image.dtype == np.uint8 and image.shape == (300, 500, 3)
    canvas = FigureCanvasAgg(reports.histogram_figure(*args))
    canvas.draw()
    np.testing.assert_array_equal(image, np.asarray(canvas.buffer_rgba())[..., :3])
    assert reports.histogram_figure(*args).axes[0].get_title() == "bottle"


def test_histogram_without_anomalous_scores_or_any_values():
    normal, _ = _separated_scores()
    (ax,) = reports.histogram_figure(normal, [], {"max": float(normal.max())}).axes
    normal_counts, anomalous_counts = _bar_heights(ax)
    assert normal_counts.sum() == 300 and not anomalous_counts.any()
    (ax,) = reports.histogram_figure(None, [], {}).axes
    assert ax.get_xlim() == (0.0, 1.0) and not ax.lines
    assert reports.score_histogram([], [], {}, size=(400, 300)).shape == (300, 400, 3)


def test_histogram_of_one_distinct_value():
    (ax,) = reports.histogram_figure([2.0, 2.0, 2.0], [], {}, bins=5).axes
    assert ax.get_xlim() == (1.5, 2.5)
    np.testing.assert_array_equal(_bar_heights(ax)[0], [0, 0, 3, 0, 0])


def test_histogram_range_matches_documented_rule():
    assert reports.histogram_range([1.0, 3.0], [5.0], {"t": 9.0, "x": np.inf}) == (
        pytest.approx(_expected_range([1.0, 9.0]))
    )
    assert reports.histogram_range([], None, {}) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("normal", "anomalous", "kwargs", "message"),
    [
        ([0.1, float("nan")], [], {}, "normal scores contain 1 non-finite"),
        ([0.1], [np.inf, -np.inf], {}, "anomalous scores contain 2 non-finite"),
        ([0.1], [], {"bins": 0}, "bins"),
        ([0.1], [], {"size": (100, 400)}, "too small"),
    ],
)
def test_histogram_rejects_bad_input(normal, anomalous, kwargs, message):
    with pytest.raises(ValueError, match=message):
        reports.score_histogram(normal, anomalous, {}, **kwargs)
    with pytest.raises(ValueError, match=message):
        reports.histogram_figure(normal, anomalous, {}, **kwargs)


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
