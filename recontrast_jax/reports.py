"""Host-side reports: atomic result files, heatmap images, histograms, galleries.

Everything here runs on the host with numpy and PIL only (no matplotlib), so the
command-line tools and notebooks can write results without extra dependencies.
Files are written atomically (temporary file in the same directory, fsync,
``os.replace``) so a crash or a failing step never leaves a truncated result or
destroys the previous one.
"""

from __future__ import annotations

import functools
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Read once at import (os.umask can only be queried by setting it) so that new
# result files get the usual permissions instead of mkstemp's private 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# Matplotlib's 'jet' segment data: (x, value) breakpoints per channel.
_JET_SEGMENTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": (
        (0.0, 0.0),
        (0.125, 0.0),
        (0.375, 1.0),
        (0.64, 1.0),
        (0.91, 0.0),
        (1.0, 0.0),
    ),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
# Matplotlib samples colour maps into a 256-entry table; doing the same gives
# the same colours pixel for pixel.
_LUT_SIZE = 256

TILE_NAMES = ("image", "ground truth", "anomaly map", "overlay")
_GAP = 4  # pixels between tiles
_LINE_HEIGHT = 14  # caption line height; the default PIL font is about 11 px tall
_GAP_COLOUR = 255


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
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


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


def _jet_lut() -> np.ndarray:
    """(256, 3) uint8 table of the jet colour map, built like matplotlib's."""
    grid = np.linspace(0.0, 1.0, _LUT_SIZE)
    channels = []
    for name in ("red", "green", "blue"):
        xs, ys = zip(*_JET_SEGMENTS[name], strict=True)
        channels.append(np.interp(grid, xs, ys))
    # matplotlib converts its float table to bytes by truncation (x * 255).
    return (np.stack(channels, axis=-1) * 255).astype(np.uint8)


_JET_LUT = _jet_lut()


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Maps values to RGB with the 'jet' colour map (blue -> cyan -> yellow -> red).

    Args:
      values: (H, W) array.
      vmin: value shown as dark blue; smaller values are clipped.
      vmax: value shown as dark red; larger values are clipped.

    Returns:
      (H, W, 3) uint8 array. NaNs are shown as ``vmin``.
    """
    values = np.asarray(values, dtype=np.float64)
    if vmax > vmin:
        scaled = (values - vmin) / (vmax - vmin)
    else:
        scaled = np.zeros_like(values)  # matplotlib's Normalize does the same
    scaled = np.nan_to_num(np.clip(scaled, 0.0, 1.0), nan=0.0)
    index = np.minimum((scaled * _LUT_SIZE).astype(np.int64), _LUT_SIZE - 1)
    return _JET_LUT[index]


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


@functools.lru_cache(maxsize=1)
def _default_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _caption(text: str, width: int) -> np.ndarray:
    """One line of black text on white, clipped to ``width`` pixels."""
    canvas = Image.new("RGB", (max(width, 1), _LINE_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(canvas).text((2, 1), text, fill=(0, 0, 0), font=_default_font())
    return np.asarray(canvas)[:, :width]


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
    """Four tiles side by side: image | ground truth | anomaly map | overlay.

    Above the tiles is a caption strip: one line with the title and the score,
    and one line with the name of each tile. Tiles have the size of the image and
    are separated by a white gap of ``_GAP`` pixels.

    Args:
      image_uint8: (H, W), (H, W, 1) or (H, W, 3) uint8 image.
      gt_mask: (H, W) mask (values > 0 are anomalous) or None (black tile).
      amap: (H, W) anomaly map.
      score: image anomaly score written in the caption.
      vmin: anomaly value shown as dark blue.
      vmax: anomaly value shown as dark red.
      title: optional text before the score (e.g. the file name).
      mask_name: caption of the mask tile (e.g. 'predicted mask' in predictions).

    Returns:
      (2 * 14 + H, 4 * W + 3 * 4, 3) uint8 RGB array.
    """
    image = _as_rgb(image_uint8, "image")
    hw = image.shape[:2]
    amap = np.asarray(amap)
    if amap.shape != hw:
        raise ValueError(f"anomaly map {amap.shape} does not match image size {hw}")
    heat = colorize(amap, vmin, vmax)
    tiles = [image, _mask_tile(gt_mask, hw), heat, overlay(image, heat)]

    tile_h, tile_w = hw
    width = len(tiles) * tile_w + (len(tiles) - 1) * _GAP
    panel = np.full((2 * _LINE_HEIGHT + tile_h, width, 3), _GAP_COLOUR, dtype=np.uint8)
    headline = f"{title}  score {score:.4f}" if title else f"score {score:.4f}"
    panel[:_LINE_HEIGHT] = _caption(headline, width)
    names = (TILE_NAMES[0], mask_name, *TILE_NAMES[2:])
    for i, (name, tile) in enumerate(zip(names, tiles, strict=True)):
        left = i * (tile_w + _GAP)
        panel[_LINE_HEIGHT : 2 * _LINE_HEIGHT, left : left + tile_w] = _caption(
            name, tile_w
        )
        panel[2 * _LINE_HEIGHT :, left : left + tile_w] = tile
    return panel


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

# Plot area margins in pixels: the header holds the title and the legend, the
# bottom the x tick labels and axis name, the left the y tick labels.
HIST_MARGIN_LEFT = 52
HIST_MARGIN_RIGHT = 16
HIST_MARGIN_TOP = 2 * _LINE_HEIGHT + 8
HIST_MARGIN_BOTTOM = 2 * _LINE_HEIGHT + 6
# Fraction of the data span added on each side so extreme bars and threshold
# lines do not sit on the axes.
HIST_RANGE_PADDING = 0.05
_NORMAL_RGBA = (31, 90, 230, 128)
_ANOMALOUS_RGBA = (220, 30, 30, 150)
_THRESHOLD_COLOURS = ((0, 0, 0), (0, 120, 0), (130, 0, 170), (200, 110, 0))
_DASH_ON, _DASH_OFF = 6, 4
_AXIS_COLOUR = (0, 0, 0)
_TICK_LENGTH = 4


def _finite_scores(scores: Any, what: str) -> np.ndarray:
    """Flat float64 array of scores; non-finite scores are a bug upstream."""
    values = np.asarray(scores if scores is not None else [], dtype=np.float64)
    values = values.reshape(-1)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"{what} contain {bad} non-finite value(s) (NaN or inf)")
    return values


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
            np.asarray(
                [v for v in map(float, thresholds.values()) if math.isfinite(v)],
                dtype=np.float64,
            ),
        ]
    )
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    if high == low:
        return low - 0.5, high + 0.5
    pad = HIST_RANGE_PADDING * (high - low)
    return low - pad, high + pad


def _nice_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (1, 2 or 5 times a power of ten) in range."""
    span = high - low
    if not span > 0:
        return [low]
    raw_step = span / target
    magnitude = 10.0 ** math.floor(math.log10(raw_step))
    step = next(
        m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw_step
    )
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    # Rounding to the step's precision avoids labels like 0.30000000000000004.
    digits = max(0, -math.floor(math.log10(step)) + 1)
    return [round(i * step, digits) for i in range(first, last + 1)]


def _tick_label(value: float) -> str:
    text = f"{value:.3g}"
    return "0" if text == "-0" else text


class _Plot:
    """Maps data coordinates to pixel coordinates of the plot area."""

    def __init__(self, size: tuple[int, int], x_range: tuple[float, float], y_max):
        width, height = size
        self.left = HIST_MARGIN_LEFT
        self.right = width - HIST_MARGIN_RIGHT - 1
        self.top = HIST_MARGIN_TOP
        self.bottom = height - HIST_MARGIN_BOTTOM - 1
        self.x_low, self.x_high = x_range
        self.y_max = y_max

    def x(self, value: float) -> int:
        fraction = (value - self.x_low) / (self.x_high - self.x_low)
        return int(round(self.left + fraction * (self.right - self.left)))

    def y(self, count: float) -> int:
        return int(round(self.bottom - count / self.y_max * (self.bottom - self.top)))


def _draw_bars(
    image: Image.Image,
    plot: _Plot,
    edges: np.ndarray,
    counts: np.ndarray,
    rgba: tuple[int, int, int, int],
) -> Image.Image:
    """Alpha-composites one histogram's bars, so overlapping bars stay visible."""
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for left_edge, right_edge, count in zip(edges[:-1], edges[1:], counts, strict=True):
        if count == 0:
            continue
        x0, x1 = plot.x(left_edge), plot.x(right_edge)
        draw.rectangle(
            (x0, plot.y(count), max(x0, x1 - 1), plot.bottom - 1),
            fill=rgba,
            outline=rgba[:3] + (255,),
        )
    return Image.alpha_composite(image, layer)


def _draw_axes(draw: ImageDraw.ImageDraw, plot: _Plot) -> None:
    """Axes with round tick values on x (scores) and y (counts)."""
    font = _default_font()
    draw.line((plot.left, plot.top, plot.left, plot.bottom), fill=_AXIS_COLOUR)
    draw.line((plot.left, plot.bottom, plot.right, plot.bottom), fill=_AXIS_COLOUR)
    for value in _nice_ticks(plot.x_low, plot.x_high):
        x = plot.x(value)
        draw.line((x, plot.bottom, x, plot.bottom + _TICK_LENGTH), fill=_AXIS_COLOUR)
        draw.text(
            (x, plot.bottom + _TICK_LENGTH + 1),
            _tick_label(value),
            fill=_AXIS_COLOUR,
            font=font,
            anchor="ma",
        )
    y_ticks = [v for v in _nice_ticks(0.0, plot.y_max, 5) if v == int(v)]
    for count in y_ticks:
        y = plot.y(count)
        draw.line((plot.left - _TICK_LENGTH, y, plot.left, y), fill=_AXIS_COLOUR)
        draw.text(
            (plot.left - _TICK_LENGTH - 2, y),
            str(int(count)),
            fill=_AXIS_COLOUR,
            font=font,
            anchor="rm",
        )
    draw.text(
        ((plot.left + plot.right) // 2, plot.bottom + _TICK_LENGTH + _LINE_HEIGHT + 2),
        "image anomaly score",
        fill=_AXIS_COLOUR,
        font=font,
        anchor="ma",
    )
    draw.text(
        (plot.left - 2, plot.top - 2),
        "count",
        fill=_AXIS_COLOUR,
        font=font,
        anchor="rd",
    )


def _draw_legend(
    draw: ImageDraw.ImageDraw, plot: _Plot, n_normal: int, n_anomalous: int
) -> None:
    """Colour swatches with group sizes, right-aligned in the second header line."""
    font = _default_font()
    entries = [
        (f"normal (n={n_normal})", _NORMAL_RGBA),
        (f"anomalous (n={n_anomalous})", _ANOMALOUS_RGBA),
    ]
    x = plot.right
    y = _LINE_HEIGHT + 3
    for text, rgba in reversed(entries):
        text_width = int(math.ceil(draw.textlength(text, font=font)))
        x -= text_width
        draw.text((x, y), text, fill=_AXIS_COLOUR, font=font)
        x -= 14
        # Same colour as a bar over white, so the swatch matches the plot.
        alpha = rgba[3] / 255.0
        colour = tuple(round(alpha * c + (1 - alpha) * 255) for c in rgba[:3])
        draw.rectangle((x, y + 1, x + 10, y + 10), fill=colour, outline=rgba[:3])
        x -= 12


def _draw_dashed_vertical(
    draw: ImageDraw.ImageDraw, x: int, top: int, bottom: int, colour
) -> None:
    for y in range(top, bottom, _DASH_ON + _DASH_OFF):
        draw.line((x, y, x, min(y + _DASH_ON - 1, bottom)), fill=colour, width=1)


def _draw_thresholds(
    draw: ImageDraw.ImageDraw, plot: _Plot, thresholds: Mapping[str, float]
) -> None:
    """Dashed vertical lines, each labelled '<name>: <value>' near the top."""
    font = _default_font()
    finite = [(n, float(v)) for n, v in thresholds.items() if math.isfinite(float(v))]
    for i, (name, value) in enumerate(finite):
        colour = _THRESHOLD_COLOURS[i % len(_THRESHOLD_COLOURS)]
        x = plot.x(value)
        _draw_dashed_vertical(draw, x, plot.top, plot.bottom - 1, colour)
        label = f"{name}: {value:.4g}"
        text_width = int(math.ceil(draw.textlength(label, font=font)))
        y = plot.top + 2 + i * _LINE_HEIGHT
        # Right of the line if it fits, otherwise left, never over the line.
        text_x = x + 4 if x + 4 + text_width <= plot.right else x - 4 - text_width
        box = (text_x - 1, y - 1, text_x + text_width + 1, y + _LINE_HEIGHT - 3)
        draw.rectangle(box, fill=(255, 255, 255))
        draw.text((text_x, y), label, fill=colour, font=font)


def score_histogram(
    normal_scores: Any,
    anomalous_scores: Any,
    thresholds: Mapping[str, float],
    title: str = "",
    bins: int = 30,
    size: tuple[int, int] = (640, 400),
) -> np.ndarray:
    """Overlaid histograms of normal and anomalous image scores with thresholds.

    Both groups share ``bins`` equal bins over ``histogram_range`` (all scores
    and thresholds, padded). Normal scores are drawn in semi-transparent blue,
    anomalous ones in semi-transparent red (overlaps look purple). Every finite
    threshold is a vertical dashed line labelled '<name>: <value>'.

    Args:
      normal_scores: 1-D scores of normal images.
      anomalous_scores: 1-D scores of anomalous images; may be empty (normal-only
        data).
      thresholds: name -> score threshold, e.g. {'quantile 0.99': 3.21}.
      title: text in the top-left corner.
      bins: number of bins.
      size: (width, height) of the image in pixels.

    Returns:
      (height, width, 3) uint8 RGB array.
    """
    width, height = size
    min_width = HIST_MARGIN_LEFT + HIST_MARGIN_RIGHT + 40
    min_height = HIST_MARGIN_TOP + HIST_MARGIN_BOTTOM + 40
    if width < min_width or height < min_height:
        raise ValueError(
            f"histogram size {size} too small; need at least ({min_width}, {min_height})"
        )
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    normal = _finite_scores(normal_scores, "normal scores")
    anomalous = _finite_scores(anomalous_scores, "anomalous scores")
    x_range = histogram_range(normal, anomalous, thresholds)
    edges = np.linspace(x_range[0], x_range[1], bins + 1)
    normal_counts, _ = np.histogram(normal, bins=edges)
    anomalous_counts, _ = np.histogram(anomalous, bins=edges)
    tallest = max(int(normal_counts.max()), int(anomalous_counts.max()), 1)
    # Headroom above the tallest bar for the stacked threshold labels.
    plot = _Plot(size, x_range, tallest * 1.15 + 0.1 * len(thresholds) * tallest)

    image = Image.new("RGBA", size, (255, 255, 255, 255))
    image = _draw_bars(image, plot, edges, normal_counts, _NORMAL_RGBA)
    image = _draw_bars(image, plot, edges, anomalous_counts, _ANOMALOUS_RGBA)
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    _draw_thresholds(draw, plot, thresholds)
    _draw_axes(draw, plot)
    if title:
        draw.text((4, 3), title, fill=_AXIS_COLOUR, font=_default_font())
    _draw_legend(draw, plot, normal.size, anomalous.size)
    return np.asarray(image, dtype=np.uint8).copy()


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
