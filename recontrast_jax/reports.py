"""Host-side reports: atomic result files, heatmap images and markdown tables.

Everything here runs on the host with numpy and PIL only (no matplotlib), so the
command-line tools and notebooks can write results without extra dependencies.
Files are written atomically (temporary file in the same directory, fsync,
``os.replace``) so a crash or a failing step never leaves a truncated result or
destroys the previous one.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    for i, (name, tile) in enumerate(zip(TILE_NAMES, tiles, strict=True)):
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
