"""Host-side reports: atomic result files, heatmap panels, histograms, galleries.

Plots are drawn with matplotlib's object-oriented API (a ``Figure`` rendered by
the Agg canvas, never pyplot), so they need no display, touch no global state
and can be drawn from several threads or processes at once; the public plot
functions return uint8 RGB arrays for ``save_png``. Files are written atomically
(temporary file in the same directory, fsync, ``os.replace``) so a crash or a
failing step never leaves a truncated result or destroys the previous one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import html
import io
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import jax
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

if TYPE_CHECKING:  # for annotations only: evaluate imports TensorFlow's pipeline
    from recontrast_jax import evaluate

# Read once at import (os.umask can only be queried by setting it) so that new
# result files get the usual permissions instead of mkstemp's private 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

_JET = matplotlib.colormaps["jet"]
_DPI = 100  # figure sizes below are in pixels; 100 dpi keeps fonts small and fast
_FONT_SIZE = 9  # points

TILE_NAMES = ("image", "ground truth", "anomaly map", "overlay")
# Small images are enlarged by a whole factor up to this side, so pixels stay
# sharp and captions fit; larger ones are shrunk to at most _TILE_MAX.
_TILE_TARGET = 192
_TILE_MAX = 512
# Panel margins in pixels: the header holds the headline and the tile names,
# the right side the colour bar and its tick labels.
_PAD, _GAP, _HEADER = 6, 8, 44
_BAR_GAP, _BAR_WIDTH, _BAR_LABELS = 10, 12, 48


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically, creating parent directories.

    Args:
      path: destination file.
      data: the complete file content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException as e:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {path}: {os_reason(e)}") from e
        raise
    _fsync_directory(path.parent)


class WriteError(OSError):
    """A result file cannot be written (the old one, if any, is left whole)."""


def os_reason(error: BaseException) -> str:
    """'no space left on device' and the like, from an OS error or its text
    (orbax and TensorFlow wrap the OS error in their own types)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    text = str(error)
    if os.strerror(errno.ENOSPC) in text:
        return os.strerror(errno.ENOSPC).lower()
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


# `atomic_write_bytes`'s temporary names: '.<name>.<8 random chars>.tmp'.
_TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
STALE_TEMPORARY_SECONDS = 60.0  # no atomic write stays open this long


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Deletes the temporary files that killed atomic writes left; returns how many.

    Only this module's temporary names older than a minute are touched (a live
    writer's file is younger), and never under `checkpoints/` (Orbax's own).
    """
    removed = 0
    cutoff = time.time() - STALE_TEMPORARY_SECONDS
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if d != "checkpoints"]
        for name in names:
            path = os.path.join(root, name)
            if _TEMPORARY_NAME.match(name) and os.path.getmtime(path) < cutoff:
                os.unlink(path)
                removed += 1
    return removed


def _fsync_directory(directory: Path) -> None:
    """Makes the rename durable; not possible on every platform, hence best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes UTF-8 ``text`` to ``path`` atomically.

    Args:
      path: destination file.
      text: the complete file content.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    """Converts numpy values and paths, which json cannot serialise by itself."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as JSON (indent 2, sorted keys) to ``path`` atomically.

    The object is serialised completely before anything is written, so an
    unserialisable value raises and leaves any existing file untouched.

    Args:
      path: destination file.
      obj: JSON-compatible object; numpy scalars/arrays and paths are converted.
    """
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    atomic_write_text(path, text + "\n")


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Maps values to RGB with matplotlib's 'jet' (blue -> cyan -> yellow -> red).

    Used for the anomaly-map tiles, so heat maps look like matplotlib's imshow.

    Args:
      values: (H, W) array.
      vmin: value shown as dark blue; smaller values are clipped.
      vmax: value shown as dark red; larger values are clipped.

    Returns:
      (H, W, 3) uint8 array. NaNs, and everything if vmax <= vmin, are shown as
      ``vmin``.
    """
    values = np.asarray(values, dtype=np.float64)
    if vmax > vmin:
        scaled = (values - vmin) / (vmax - vmin)
    else:
        scaled = np.zeros_like(values)  # matplotlib's Normalize does the same
    scaled = np.nan_to_num(np.clip(scaled, 0.0, 1.0), nan=0.0)
    return _JET(scaled, bytes=True)[..., :3]


def _as_rgb(image: np.ndarray, what: str) -> np.ndarray:
    """Returns a (H, W, 3) uint8 view of a grey or RGB uint8 image."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise ValueError(
        f"{what} must be (H, W), (H, W, 1) or (H, W, 3), got {image.shape}"
    )


def overlay(
    image_uint8: np.ndarray, heat_rgb: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """Blends a heat map over an image: ``(1 - alpha) * image + alpha * heat``.

    Args:
      image_uint8: (H, W), (H, W, 1) or (H, W, 3) uint8 image.
      heat_rgb: (H, W, 3) uint8 colour map of the same size.
      alpha: weight of the heat map in [0, 1].

    Returns:
      (H, W, 3) uint8 array.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = _as_rgb(image_uint8, "image")
    heat = _as_rgb(heat_rgb, "heat map")
    if image.shape != heat.shape:
        raise ValueError(
            f"image {image.shape} and heat map {heat.shape} differ in size"
        )
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * heat.astype(np.float64)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _mask_tile(gt_mask: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    """White-on-black RGB tile of a mask (any value > 0 is anomalous)."""
    if gt_mask is None:
        return np.zeros((*hw, 3), dtype=np.uint8)
    mask = np.asarray(gt_mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape != hw:
        raise ValueError(
            f"ground-truth mask {mask.shape} does not match image size {hw}"
        )
    return np.repeat(np.where(mask > 0, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)


def _render(fig: Figure) -> np.ndarray:
    """Draws a figure off-screen into a (height, width, 3) uint8 RGB array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _tile_size(hw: tuple[int, int]) -> tuple[int, int]:
    """On-screen (height, width) of a tile in pixels (see _TILE_TARGET)."""
    longest = max(hw)
    factor = (
        _TILE_MAX / longest if longest > _TILE_MAX else max(1, _TILE_TARGET // longest)
    )
    return max(1, round(hw[0] * factor)), max(1, round(hw[1] * factor))


def _panel_figure(
    tiles: Sequence[np.ndarray],
    names: Sequence[str],
    headline: str,
    vmin: float,
    vmax: float,
) -> Figure:
    """Tiles in a row under their names and a headline, with a vmin..vmax bar."""
    tile_h, tile_w = _tile_size(tiles[0].shape[:2])
    row_w = len(tiles) * tile_w + (len(tiles) - 1) * _GAP
    width = _PAD + row_w + _BAR_GAP + _BAR_WIDTH + _BAR_LABELS
    height = _HEADER + tile_h + _PAD
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)

    def box(left: float, w: float) -> tuple[float, float, float, float]:
        """Figure fractions of a tile-high box ``w`` pixels wide at ``left``."""
        return left / width, _PAD / height, w / width, tile_h / height

    # Enlarged tiles keep square pixels; only shrunk ones need smoothing.
    smooth = tile_h < tiles[0].shape[0]
    for i, (tile, name) in enumerate(zip(tiles, names, strict=True)):
        ax = fig.add_axes(box(_PAD + i * (tile_w + _GAP), tile_w))
        ax.imshow(tile, interpolation="antialiased" if smooth else "nearest")
        ax.set_axis_off()
        ax.set_title(name, fontsize=_FONT_SIZE, pad=3, y=1.0)  # y: no auto layout
    fig.text(_PAD / width, 1 - 4 / height, headline, fontsize=_FONT_SIZE + 1, va="top")
    bar = fig.add_axes(box(_PAD + row_w + _BAR_GAP, _BAR_WIDTH))
    fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap=_JET), cax=bar)
    bar.tick_params(labelsize=_FONT_SIZE - 1)
    return fig


def heatmap_panel(
    image_uint8: np.ndarray,
    gt_mask: np.ndarray | None,
    amap: np.ndarray,
    score: float,
    vmin: float,
    vmax: float,
    title: str = "",
    mask_name: str = "ground truth",
) -> np.ndarray:
    """One picture of an image's result: image | mask | anomaly map | overlay.

    A headline gives the title and the score, each tile is named, and a colour
    bar shows the anomaly-map scale vmin..vmax (pass the same vmin/vmax for all
    panels of a set so they can be compared). Small images are enlarged by a
    whole factor, large ones shrunk, so the panel's size depends on the image's.

    Args:
      image_uint8: (H, W), (H, W, 1) or (H, W, 3) uint8 image.
      gt_mask: (H, W) mask (values > 0 are anomalous) or None (black tile).
      amap: (H, W) anomaly map.
      score: image anomaly score written in the headline.
      vmin: anomaly value shown as dark blue.
      vmax: anomaly value shown as dark red.
      title: optional text before the score (e.g. the file name).
      mask_name: name of the mask tile (e.g. 'predicted mask' in predictions).

    Returns:
      (height, width, 3) uint8 RGB array.
    """
    image = _as_rgb(image_uint8, "image")
    hw = image.shape[:2]
    amap = np.asarray(amap)
    if amap.shape != hw:
        raise ValueError(f"anomaly map {amap.shape} does not match image size {hw}")
    heat = colorize(amap, vmin, vmax)
    tiles = [image, _mask_tile(gt_mask, hw), heat, overlay(image, heat)]
    names = (TILE_NAMES[0], mask_name, *TILE_NAMES[2:])
    headline = f"{title}  score {score:.4f}" if title else f"score {score:.4f}"
    return _render(_panel_figure(tiles, names, headline, vmin, vmax))


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Saves a uint8 (H, W), (H, W, 3) or (H, W, 4) array as PNG, atomically.

    Args:
      path: destination file.
      array: uint8 image.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or not (
        array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
    ):
        raise ValueError(
            f"cannot save {path} as PNG: need uint8 (H, W), (H, W, 3) or (H, W, 4), "
            f"got {array.dtype} {array.shape}"
        )
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _is_missing(value: float | None) -> bool:
    return value is None or (
        isinstance(value, float | np.floating) and math.isnan(value)
    )


def _percent(value: float | None) -> str:
    return "-" if _is_missing(value) else f"{float(value) * 100:.2f}"


def results_markdown(
    rows: Mapping[str, Mapping[str, float]], metric_names: Sequence[str], title: str
) -> str:
    """Markdown table of per-category metrics with a final mean row.

    Values are fractions shown in percent with 2 decimals. A metric that is
    missing (absent, None or NaN) is shown as '-'; the mean of a metric is over
    the categories that have it ('-' if none has it).

    Args:
      rows: category name -> {metric name: value in [0, 1]}, in display order.
      metric_names: the metric columns, in display order.
      title: heading above the table (omitted if empty).

    Returns:
      Markdown text ending with a newline.
    """
    lines = [f"## {title}", ""] if title else []
    lines.append("| category | " + " | ".join(metric_names) + " |")
    lines.append("|---|" + "---:|" * len(metric_names))
    for category, metrics in rows.items():
        cells = [_percent(metrics.get(name)) for name in metric_names]
        lines.append(f"| {category.replace('|', '/')} | " + " | ".join(cells) + " |")
    means = []
    for name in metric_names:
        present = [
            float(m[name]) for m in rows.values() if not _is_missing(m.get(name))
        ]
        means.append(_percent(float(np.mean(present)) if present else None))
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Score histogram
# ---------------------------------------------------------------------------

# Fraction of the data span added on each side so extreme bars and threshold
# lines do not sit on the axes.
HIST_RANGE_PADDING = 0.05
_HIST_MIN_SIZE = (160, 120)  # (width, height) in pixels; smaller is unreadable
_GROUP_COLOURS = {"normal": "tab:blue", "anomalous": "tab:red"}
_THRESHOLD_COLOURS = ("black", "tab:green", "tab:purple", "tab:orange")


def _finite_scores(scores: Any, what: str) -> np.ndarray:
    """Flat float64 array of scores; non-finite scores are a bug upstream."""
    values = np.asarray(scores if scores is not None else [], dtype=np.float64)
    values = values.reshape(-1)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"{what} contain {bad} non-finite value(s) (NaN or inf)")
    return values


def _finite_thresholds(thresholds: Mapping[str, float]) -> list[tuple[str, float]]:
    """(name, value) of the thresholds that can be drawn; NaN means 'not set'."""
    pairs = [(str(name), float(value)) for name, value in thresholds.items()]
    return [(name, value) for name, value in pairs if math.isfinite(value)]


def histogram_range(
    normal_scores: Any, anomalous_scores: Any, thresholds: Mapping[str, float]
) -> tuple[float, float]:
    """Shared x range of ``score_histogram``: all scores and finite thresholds.

    The span from the smallest to the largest value is widened by
    ``HIST_RANGE_PADDING`` of itself on each side; a zero span becomes +-0.5 and
    no values at all give (0, 1).

    Args:
      normal_scores: image scores of normal images.
      anomalous_scores: image scores of anomalous images (may be empty).
      thresholds: name -> threshold value; non-finite values are ignored.

    Returns:
      (low, high) with low < high.
    """
    values = np.concatenate(
        [
            _finite_scores(normal_scores, "normal scores"),
            _finite_scores(anomalous_scores, "anomalous scores"),
            np.asarray([v for _, v in _finite_thresholds(thresholds)], np.float64),
        ]
    )
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    if high == low:
        return low - 0.5, high + 0.5
    pad = HIST_RANGE_PADDING * (high - low)
    return low - pad, high + pad


def histogram_figure(
    normal_scores: Any,
    anomalous_scores: Any,
    thresholds: Mapping[str, float],
    title: str = "",
    bins: int = 30,
    size: tuple[int, int] = (640, 400),
) -> Figure:
    """The figure of ``score_histogram``, for notebooks and for inspecting it.

    Arguments as for ``score_histogram``. The axes hold one bar container per
    group (normal first) and one dashed line per finite threshold.
    """
    width, height = size
    if width < _HIST_MIN_SIZE[0] or height < _HIST_MIN_SIZE[1]:
        raise ValueError(
            f"histogram size {size} too small; need at least {_HIST_MIN_SIZE}"
        )
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    groups = {
        "normal": _finite_scores(normal_scores, "normal scores"),
        "anomalous": _finite_scores(anomalous_scores, "anomalous scores"),
    }
    x_range = histogram_range(groups["normal"], groups["anomalous"], thresholds)
    edges = np.linspace(*x_range, bins + 1)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    for name, scores in groups.items():
        colour = _GROUP_COLOURS[name]
        # Semi-transparent so overlapping bins of both groups stay visible.
        ax.hist(
            scores,
            bins=edges,
            color=colour,
            alpha=0.5,
            label=f"{name} (n={scores.size})",
        )
    for i, (name, value) in enumerate(_finite_thresholds(thresholds)):
        colour = _THRESHOLD_COLOURS[i % len(_THRESHOLD_COLOURS)]
        ax.axvline(value, color=colour, linestyle="--", label=f"{name}: {value:.4g}")
    ax.set_xlim(x_range)
    ax.margins(y=0.2)  # headroom for the legend
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("image anomaly score", fontsize=_FONT_SIZE)
    ax.set_ylabel("count", fontsize=_FONT_SIZE)
    ax.tick_params(labelsize=_FONT_SIZE - 1)
    ax.set_title(title, fontsize=_FONT_SIZE + 1)
    ax.legend(fontsize=_FONT_SIZE - 1)
    return fig


def score_histogram(
    normal_scores: Any,
    anomalous_scores: Any,
    thresholds: Mapping[str, float],
    title: str = "",
    bins: int = 30,
    size: tuple[int, int] = (640, 400),
) -> np.ndarray:
    """Overlaid histograms of normal and anomalous image scores with thresholds.

    Shows how well the scores separate the groups and where each threshold cuts.
    Both groups share ``bins`` equal bins over ``histogram_range`` (all scores
    and thresholds, padded): normal in semi-transparent blue, anomalous in red.
    Every finite threshold is a dashed vertical line whose legend entry gives
    '<name>: <value>'.

    Args:
      normal_scores: scores of normal images (flattened; may be empty).
      anomalous_scores: scores of anomalous images; may be empty (normal-only
        data).
      thresholds: name -> score threshold, e.g. {'quantile 0.99': 3.21}.
      title: title above the plot.
      bins: number of bins.
      size: (width, height) of the image in pixels.

    Returns:
      (height, width, 3) uint8 RGB array.

    Raises:
      ValueError: a score is NaN or infinite, ``bins`` < 1 or ``size`` too small.
    """
    return _render(
        histogram_figure(normal_scores, anomalous_scores, thresholds, title, bins, size)
    )


# ---------------------------------------------------------------------------
# HTML gallery
# ---------------------------------------------------------------------------

GALLERY_HISTOGRAM = "histogram.png"
_LABEL_NAMES = {0: "normal", 1: "anomalous"}
_GALLERY_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { margin-bottom: 0.2em; }
.subtitle { color: #555; margin-top: 0; }
.histogram { max-width: 100%; border: 1px solid #ccc; background: #fff; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { margin: 0; padding: 6px; background: #fff; border: 2px solid #ddd;
        border-radius: 4px; max-width: 100%; }
.card.wrong { border-color: #d22; }
.card img { display: block; max-width: 100%; height: auto; }
.card figcaption { font-size: 0.9em; margin-top: 4px; }
.name { font-weight: bold; word-break: break-all; }
.empty { color: #777; font-style: italic; }
"""


def _validated_entries(
    directory: Path, entries: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Copies of the entries with float scores; missing keys raise with context."""
    checked = []
    for i, entry in enumerate(entries):
        missing = [k for k in ("image", "name", "score") if k not in entry]
        if missing:
            raise ValueError(
                f"gallery {directory}: entry {i} lacks key(s) {missing}; "
                "need 'image', 'name', 'score' (and 'label', optionally 'decision')"
            )
        score = float(entry["score"])
        if not math.isfinite(score):
            raise ValueError(
                f"gallery {directory}: entry {i} ({entry['name']!r}) has score {score}"
            )
        label = entry.get("label")
        decision = entry.get("decision")
        for key, value in (("label", label), ("decision", decision)):
            if value is not None and int(value) not in _LABEL_NAMES:
                raise ValueError(
                    f"gallery {directory}: entry {i} ({entry['name']!r}) has "
                    f"{key} {value!r}; expected 0, 1 or None"
                )
        checked.append(
            {
                "image": os.fspath(entry["image"]),
                "name": str(entry["name"]),
                "score": score,
                "label": None if label is None else int(label),
                "decision": None if decision is None else int(decision),
            }
        )
    return checked


def _card_html(entry: Mapping[str, Any]) -> str:
    """One figure: the panel image (linked to itself) and a caption."""
    src = html.escape(quote(entry["image"].replace(os.sep, "/")), quote=True)
    name = html.escape(entry["name"], quote=True)
    label, decision = entry["label"], entry["decision"]
    wrong = label is not None and decision is not None and label != decision
    details = [f'score <span class="score">{entry["score"]:.4f}</span>']
    details.append(
        f'label <span class="label">{_LABEL_NAMES.get(label, "unknown")}</span>'
    )
    if decision is not None:
        details.append(
            f'decision <span class="decision">{_LABEL_NAMES[decision]}</span>'
        )
    return (
        f'<figure class="card{" wrong" if wrong else ""}">'
        f'<a href="{src}"><img src="{src}" alt="{name}" loading="lazy"></a>'
        f'<figcaption><span class="name">{name}</span><br>'
        + " &middot; ".join(details)
        + "</figcaption></figure>"
    )


def _cards_html(entries: Sequence[Mapping[str, Any]]) -> str:
    if not entries:
        return '<p class="empty">No images.</p>'
    return '<div class="cards">\n' + "\n".join(map(_card_html, entries)) + "\n</div>"


def _by_score(entries, descending: bool, limit: int) -> list:
    # Ties broken by name so the page does not change between identical runs.
    ordered = sorted(entries, key=lambda e: e["name"])
    ordered.sort(key=lambda e: e["score"], reverse=descending)
    return ordered[:limit]


def write_gallery(
    directory: str | os.PathLike,
    entries: Sequence[Mapping[str, Any]],
    title: str,
    subtitle: str = "",
    per_section: int = 12,
) -> str:
    """Writes ``<directory>/index.html``, a static page of heat-map panels.

    The page shows the title and subtitle (e.g. the threshold rule), the score
    histogram if ``<directory>/histogram.png`` exists, then the sections "Most
    anomalous" (highest scores first) and "Least anomalous" (lowest first) and,
    if any label is known, "Worst mistakes": anomalous images with the lowest
    scores and normal images with the highest. Cards whose decision differs
    from their label have a red border. Plain HTML with inline CSS, no
    JavaScript and no external resources.

    Args:
      directory: folder of the page; image paths are relative to it.
      entries: dicts with 'image' (PNG path relative to ``directory``), 'name',
        'score' (float), 'label' (0 normal, 1 anomalous, None unknown) and
        optionally 'decision' (0/1).
      title: page heading.
      subtitle: line under the heading.
      per_section: most cards in each section (and in each half of "Worst
        mistakes").

    Returns:
      The path of the written index.html.
    """
    directory = Path(directory)
    if per_section < 1:
        raise ValueError(f"per_section must be >= 1, got {per_section}")
    checked = _validated_entries(directory, entries)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_GALLERY_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="subtitle">{html.escape(subtitle)}</p>')
    parts.append(f"<p>{len(checked)} images.</p>")
    if (directory / GALLERY_HISTOGRAM).is_file():
        parts.append(
            f'<img class="histogram" src="{GALLERY_HISTOGRAM}" '
            'alt="histogram of image scores">'
        )
    parts += [
        "<h2>Most anomalous</h2>",
        _cards_html(_by_score(checked, descending=True, limit=per_section)),
        "<h2>Least anomalous</h2>",
        _cards_html(_by_score(checked, descending=False, limit=per_section)),
    ]
    if any(e["label"] is not None for e in checked):
        anomalous = [e for e in checked if e["label"] == 1]
        normal = [e for e in checked if e["label"] == 0]
        parts += [
            "<h2>Worst mistakes</h2>",
            "<h3>Anomalous images with the lowest scores</h3>",
            _cards_html(_by_score(anomalous, descending=False, limit=per_section)),
            "<h3>Normal images with the highest scores</h3>",
            _cards_html(_by_score(normal, descending=True, limit=per_section)),
        ]
    parts.append("</body></html>")
    path = directory / "index.html"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return os.fspath(path)


# ----------------------------------------------------------------------------
# Everything a run writes, from typed results

# The columns of results.md, in this order (those a run has).
REPORTED_METRICS = (
    "image_auroc",
    "f1",
    "accuracy",
    "pixel_auroc",
    "aupro",
    "aupro_recontrast_per_image",
    "pixel_ap",
    "image_f1_max",
    "anomalous_flagged",  # at the chosen image threshold (run.flagged_rates)
    "normal_flagged",
)


@dataclasses.dataclass(frozen=True)
class CategoryReport:
    """What the pipeline hands over for one evaluated category.

    Attributes:
      category: the category's name.
      test: the scored test split.
      names: '<defect>/<file name>' of every test image, in test order.
      threshold: the chosen thresholds (`thresholds.choose`).
      step: the model's training step (0 when it has none).
    """

    category: str
    test: evaluate.SplitResult
    names: list[str]
    threshold: dict
    step: int


def select_heatmap_indices(result: evaluate.SplitResult, count: int) -> list[int]:
    """The highest-scored anomalous and the highest-scored normal images."""
    order = np.argsort(-result.scores, kind="stable")
    anomalous = [int(i) for i in order if result.labels[i]][
        : max(count - count // 3, 1)
    ]
    normal = [int(i) for i in order if not result.labels[i]][: count // 3]
    return sorted(anomalous + normal)


def panel_file_name(name: str) -> str:
    """A flat PNG file name for an image's relative name."""
    return os.path.splitext(name)[0].replace(os.sep, "_") + ".png"


def write_heatmaps(
    result: evaluate.SplitResult, directory: str, count: int, names: list[str]
) -> list[dict]:
    """Writes image | ground truth | map | overlay panels for some test images.

    All panels of a category share one colour scale (the test maps' range), so
    normal images do not look hot.

    Returns:
      Gallery entries (see `write_gallery`) of the panels written, each with
      its `panel` array.
    """
    if count <= 0 or len(result.scores) == 0:
        return []
    vmin, vmax = float(result.maps.min()), float(result.maps.max())
    entries = []
    for i in select_heatmap_indices(result, count):
        panel = heatmap_panel(
            result.images[i], result.masks[i], result.maps[i],
            float(result.scores[i]), vmin, vmax, title=names[i],
        )  # fmt: skip
        file_name = panel_file_name(names[i])
        save_png(os.path.join(directory, file_name), panel)
        entries.append(
            {"image": file_name, "name": names[i], "score": float(result.scores[i]),
             "label": int(result.labels[i]), "panel": panel}
        )  # fmt: skip
    return entries


def write_score_report(
    result: evaluate.SplitResult, directory: str, entries, threshold, title
) -> None:
    """The score histogram (normal vs anomalous, threshold drawn) and the gallery."""
    labels = result.labels.astype(bool)
    histogram = score_histogram(
        result.scores[~labels],
        result.scores[labels],
        {threshold["rule"].split(" of ")[0]: threshold["image"]},
        title=title,
    )
    save_png(os.path.join(directory, GALLERY_HISTOGRAM), histogram)
    for entry in entries:
        entry["decision"] = int(entry["score"] >= threshold["image"])
    write_gallery(
        directory,
        [{k: v for k, v in e.items() if k != "panel"} for e in entries],
        title,
        subtitle=f"threshold: {threshold['rule']}",
    )


def write_category(
    report: CategoryReport, workdir: str, num_heatmaps: int, writer: MetricWriter
) -> None:
    """Heatmap panels, histogram, gallery and TensorBoard images of a category."""
    directory = os.path.join(workdir, "heatmaps", report.category)
    entries = write_heatmaps(report.test, directory, num_heatmaps, report.names)
    write_score_report(
        report.test, directory, entries, report.threshold, report.category
    )
    writer.images(
        report.step, {f"heatmaps/{e['name']}": e["panel"] for e in entries[:4]}
    )


def summarize(results: Mapping[str, Mapping[str, float]]) -> dict:
    """Per-category metrics plus their mean over categories."""
    names = sorted({k for r in results.values() for k in r})
    mean = {
        k: float(np.mean([r[k] for r in results.values() if k in r])) for k in names
    }
    return {"categories": dict(results), "mean": mean}


def write_results(
    workdir: str,
    results: Mapping[str, Mapping[str, float]],
    title: str,
    notes: Sequence[str] = (),
) -> None:
    """Writes metrics.json and results.md (the table, then `notes`) atomically."""
    atomic_write_json(os.path.join(workdir, "metrics.json"), summarize(results))
    present = {k for r in results.values() for k in r}
    names = [k for k in REPORTED_METRICS if k in present] or sorted(present)
    text = results_markdown(results, names, title)
    if notes:
        text += "\n" + "\n\n".join(notes) + "\n"
    atomic_write_text(os.path.join(workdir, "results.md"), text)


def metrics_line(metrics: Mapping[str, float]) -> str:
    """The reported metrics present in `metrics`, as 'name=0.1234, ...'."""
    shown = [k for k in REPORTED_METRICS if k in metrics]
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in shown)


def write_csv(path: str, rows: list[dict]) -> None:
    """Rows of equal keys as a CSV file, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def prediction_colour_scale(
    chosen: dict, calibration: dict, maps: np.ndarray
) -> tuple[float, float]:
    """A fixed scale: normal pixels low, the pixel threshold at mid-scale."""
    normal = calibration.get("normal")
    low = float(normal["pixel_quantiles"]["0.5"]) if normal else float(np.median(maps))
    high = chosen["pixel"] + (chosen["pixel"] - low)
    if not np.isfinite(high) or high <= low:
        low, high = float(maps.min()), float(maps.max())
    return low, high


def write_predictions(
    output: str, category: str, rows: list[dict], result, chosen, calibration, count,
    skipped: Sequence[dict] = (),
) -> None:  # fmt: skip
    """predictions.csv, summary.json, the most anomalous panels and their gallery."""
    write_csv(os.path.join(output, "predictions.csv"), rows)
    atomic_write_json(
        os.path.join(output, "summary.json"),
        {"category": category, "thresholds": chosen, "images": len(rows),
         "anomalous": int(sum(r["decision"] for r in rows)),
         "skipped": list(skipped)},
    )  # fmt: skip
    vmin, vmax = prediction_colour_scale(chosen, calibration, result.maps)
    entries = []
    for i in np.argsort(-result.scores, kind="stable")[:count]:
        row = rows[i]
        panel = heatmap_panel(
            result.images[i], result.maps[i] >= chosen["pixel"], result.maps[i],
            row["score"], vmin, vmax, title=row["path"], mask_name="predicted mask",
        )  # fmt: skip
        name = panel_file_name(row["path"])
        save_png(os.path.join(output, "heatmaps", name), panel)
        entries.append(
            {"image": f"heatmaps/{name}", "name": row["path"], "score": row["score"],
             "label": None, "decision": row["decision"]}
        )  # fmt: skip
    write_gallery(
        output, entries, "Predictions", subtitle=f"threshold: {chosen['rule']}"
    )


class MetricWriter:
    """TensorBoard scalars and images (`flax.metrics.tensorboard`), process 0 only.

    A log that cannot be written (a full disk) raises `WriteError` naming the
    log folder, instead of TensorFlow's traceback.
    """

    def __init__(self, logdir: str):
        self._writer = None
        self._logdir = logdir
        if jax.process_index() == 0:
            # Imported here: it imports TensorFlow, which only a logging
            # process needs (accelerator hosts may run without it).
            from flax.metrics import tensorboard

            with self._writing():
                self._writer = tensorboard.SummaryWriter(logdir)

    @contextlib.contextmanager
    def _writing(self):
        import tensorflow as tf

        try:
            yield
        except (OSError, tf.errors.OpError) as e:
            self._writer = None  # closing it would try the write again
            raise WriteError(
                f"cannot write TensorBoard logs in {self._logdir}: {os_reason(e)}"
            ) from e

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is not None:
            with self._writing():
                for name, value in values.items():
                    self._writer.scalar(name, value, step)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        if self._writer is not None:
            with self._writing():
                for name, image in images.items():
                    self._writer.image(name, image, step)

    def close(self) -> None:
        if self._writer is not None:
            with self._writing():
                self._writer.close()
