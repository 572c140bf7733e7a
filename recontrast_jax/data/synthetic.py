"""The embedded default dataset: real textures with drawn defects, MVTec layout.

Normal images are random crops of three texture photographs that ship inside
scikit-image (``skimage.data.brick``, ``grass`` and ``gravel``; 512x512 grayscale),
flipped/rotated, resized with PIL bilinear and given a faint category tint so they
look like product photographs. Defective test images add one drawn defect
(scratch, stain, hole, cut or a pasted foreign patch) whose ground-truth mask is
exactly the defect's shape: every pixel outside the mask equals the undamaged
image (see :func:`render_sample`, which returns both).

Everything is derived from fixed seeds, so two generations are identical. The
dataset is generated on first use into a cache folder, in a temporary sibling
folder that is renamed into place only when complete; a marker file written last
records the parameters, so an interrupted run is never mistaken for a dataset.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from recontrast_jax import console
from recontrast_jax.data.folder import DatasetError

CATEGORIES = ("brick", "grass", "gravel")
DEFECT_TYPES = ("scratch", "stain", "hole", "cut", "foreign_patch")
MARKER_NAME = "embedded_dataset.json"
FORMAT_VERSION = 1

_CATEGORY_SEEDS = {"brick": 1101, "grass": 2202, "gravel": 3303}
# Faint per-channel gains: warm clay, green, cool grey.
_TINTS = {
    "brick": (1.0, 0.9, 0.82),
    "grass": (0.87, 1.0, 0.84),
    "gravel": (0.92, 0.95, 1.0),
}
_KINDS = ("train", "good") + DEFECT_TYPES


def default_cache_dir() -> pathlib.Path:
    """Where the embedded dataset lives by default.

    Returns:
      ``$RECONTRAST_JAX_DATA`` if set, else ``~/.cache/recontrast_jax/embedded_v1``.
    """
    env = os.environ.get("RECONTRAST_JAX_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "recontrast_jax" / "embedded_v1"


# --------------------------------------------------------------------------
# Normal images.
# --------------------------------------------------------------------------


@functools.cache
def _texture(category: str) -> np.ndarray:
    """The 512x512 uint8 grayscale texture photograph of a category."""
    import skimage.data  # Deferred: only needed when generating.

    texture = getattr(skimage.data, category)()
    texture.setflags(write=False)
    return texture


def _textured_crop(category: str, rng: np.random.Generator, size: int, side_range):
    """Random crop of a texture, flipped/rotated, resized to ``size``, as float32."""
    texture = _texture(category)
    side = int(rng.integers(side_range[0], side_range[1] + 1))
    top, left = (int(v) for v in rng.integers(0, texture.shape[0] - side + 1, 2))
    crop = np.rot90(texture[top : top + side, left : left + side], int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize(
        (size, size), Image.BILINEAR
    )
    return np.asarray(resized, np.float32)


def _tinted(gray: np.ndarray, tint, gain: float = 1.0) -> np.ndarray:
    """Grayscale float image times a per-channel tint, as float32 RGB."""
    return gray[..., None] * (np.asarray(tint, np.float32) * np.float32(gain))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _base_image(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A normal image: tinted random crop of the category's texture (uint8 RGB)."""
    gray = _textured_crop(category, rng, size, (192, 320))
    return _to_uint8(_tinted(gray, _TINTS[category], rng.uniform(0.94, 1.06)))


# --------------------------------------------------------------------------
# Defects. Each returns (float RGB image, bool shape); pixels outside the shape
# are never touched, which is what makes the masks exact.
# --------------------------------------------------------------------------


def _grid(size: int):
    """Pixel-centre coordinates (y, x), float32."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return coords[:, None], coords[None, :]


def _centre(rng: np.random.Generator, size: int):
    return rng.uniform(0.3, 0.7, 2) * size


def _scratch(base, rng, category):
    """A thin bright or dark polyline (a few segments that slowly bend)."""
    size = base.shape[0]
    y, x = _centre(rng, size)
    angle = rng.uniform(0, 2 * np.pi)
    num_segments = int(rng.integers(2, 5))
    segment = rng.uniform(0.16, 0.3) * size / num_segments
    points = [(x, y)]
    for _ in range(num_segments):
        angle += rng.normal(0, 0.4)
        x, y = x + segment * np.cos(angle), y + segment * np.sin(angle)
        points.append((x, y))
    canvas = Image.new("L", (size, size), 0)
    width = max(2, round(size / 48))
    ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
    shape = np.asarray(canvas) > 0
    bright = base[shape].mean() < 150  # Dark scratches vanish in dark gravel.
    level = rng.uniform(225, 250) if bright else rng.uniform(10, 35)
    out = base.astype(np.float32)
    out[shape] = level + rng.normal(0, 5, (int(shape.sum()), 1))
    return out, shape


def _stain(base, rng, category):
    """A dark brownish ellipse, strongest at the centre, fading towards its rim."""
    size = base.shape[0]
    yy, xx = _grid(size)
    cy, cx = _centre(rng, size)
    a = rng.uniform(0.07, 0.13) * size
    b = a * rng.uniform(0.55, 1.0)
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    r2 = (u / a) ** 2 + (v / b) ** 2
    shape = r2 < 1.0
    alpha = (0.4 + 0.45 * (1.0 - r2))[..., None]
    colour = np.asarray([70, 48, 28], np.float32) * rng.uniform(0.5, 1.0)
    out = base.astype(np.float32)
    blended = out * (1 - alpha) + colour * alpha
    out[shape] = blended[shape]
    return out, shape


def _hole(base, rng, category):
    """A dark disc, darker towards the centre, with a lighter rim."""
    size = base.shape[0]
    yy, xx = _grid(size)
    cy, cx = _centre(rng, size)
    radius = rng.uniform(0.05, 0.1) * size
    rim = max(1.5, 0.3 * radius)
    dist = np.sqrt((yy - cy) ** 2 + ((xx - cx) * rng.uniform(0.8, 1.0)) ** 2)
    shape = dist < radius + rim
    inner = dist < radius
    out = base.astype(np.float32)
    depth = 8.0 + 30.0 * (np.minimum(dist, radius) / radius) ** 2
    lighter = out * 0.35 + 215.0 * 0.65
    out[inner] = np.broadcast_to(depth[..., None], out.shape)[inner]
    rim_pixels = shape & ~inner
    out[rim_pixels] = lighter[rim_pixels]
    return out, shape


def _cut(base, rng, category):
    """A thin dark slit whose one side is displaced along it (offset edges)."""
    size = base.shape[0]
    yy, xx = _grid(size)
    cy, cx = _centre(rng, size)
    theta = rng.uniform(0, np.pi)
    tangent = np.array([np.sin(theta), np.cos(theta)], np.float32)  # (dy, dx)
    along = (yy - cy) * tangent[0] + (xx - cx) * tangent[1]
    across = -(yy - cy) * tangent[1] + (xx - cx) * tangent[0]
    half_length = rng.uniform(0.08, 0.14) * size
    on_cut = np.abs(along) <= half_length
    gap = on_cut & (np.abs(across) < max(1.0, 0.012 * size))
    side = on_cut & (across > 0) & (across < max(3.0, 0.05 * size)) & ~gap
    # The displaced side shows the texture shifted along the slit, and shadowed.
    shift = rng.choice([-1, 1]) * rng.uniform(0.025, 0.05) * size
    src_y = np.clip(np.round(yy - 0.5 + shift * tangent[0]), 0, size - 1).astype(int)
    src_x = np.clip(np.round(xx - 0.5 + shift * tangent[1]), 0, size - 1).astype(int)
    src_y, src_x = np.broadcast_arrays(src_y, src_x)
    out = base.astype(np.float32)
    shifted = out[src_y, src_x] * 0.75
    out[side] = shifted[side]
    out[gap] = rng.uniform(5, 25)
    return out, gap | side


def _foreign_patch(base, rng, category):
    """A blob of another category's texture, magnified and strongly tinted."""
    size = base.shape[0]
    yy, xx = _grid(size)
    cy, cx = _centre(rng, size)
    radius = rng.uniform(0.08, 0.13) * size
    angle = np.arctan2(yy - cy, xx - cx)
    boundary = np.ones_like(angle)
    for k in (2, 3, 5):
        boundary = boundary + rng.uniform(-0.18, 0.18) * np.cos(
            k * angle + rng.uniform(0, 2 * np.pi)
        )
    shape = np.hypot(yy - cy, xx - cx) < radius * boundary
    other = [c for c in CATEGORIES if c != category][int(rng.integers(2))]
    gray = _textured_crop(other, rng, size, (96, 160))
    tint = np.asarray(_TINTS[other], np.float32) ** 4
    patch = _tinted(gray, tint, rng.uniform(0.8, 1.1))
    out = base.astype(np.float32)
    out[shape] = patch[shape]
    return out, shape


_DEFECT_DRAWERS = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
    "cut": _cut,
    "foreign_patch": _foreign_patch,
}


class RenderedSample(NamedTuple):
    """One generated image.

    Attributes:
      image: uint8 RGB (size, size, 3) as written to disk.
      mask: bool (size, size) defect mask, or None for normal images.
      base: uint8 RGB image before the defect was drawn (equals ``image`` for
        normal images).
    """

    image: np.ndarray
    mask: np.ndarray | None
    base: np.ndarray


def render_sample(
    category: str, kind: str, index: int, image_size: int = 128
) -> RenderedSample:
    """Renders one image of the embedded dataset.

    Every image has its own seed, derived from (category, kind, index), so any
    image can be rendered alone and the dataset does not depend on the order of
    generation or on how many images of other kinds are made.

    Args:
      category: One of :data:`CATEGORIES`.
      kind: "train", "good" (normal test image) or one of :data:`DEFECT_TYPES`.
      index: Image number within its folder.
      image_size: Side of the square image.

    Returns:
      The image, its defect mask (None for normal images) and the undamaged base.
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {_KINDS}")
    seed = [_CATEGORY_SEEDS[category], _KINDS.index(kind), int(index)]
    base = _base_image(category, np.random.default_rng(seed + [0]), image_size)
    if kind in ("train", "good"):
        return RenderedSample(base, None, base)
    draw = _DEFECT_DRAWERS[kind]
    image, shape = draw(base, np.random.default_rng(seed + [1]), category)
    image = np.where(shape[..., None], _to_uint8(image), base)
    return RenderedSample(image, shape, base)


# --------------------------------------------------------------------------
# Writing the dataset folder.
# --------------------------------------------------------------------------


def _file_name(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def _write_category(root: pathlib.Path, category: str, params: dict) -> None:
    """Writes one category's folders in MVTec layout."""
    size = params["image_size"]
    folders = [("train", root / category / "train" / "good", params["num_train"])]
    folders.append(("good", root / category / "test" / "good", params["num_test_good"]))
    for defect in DEFECT_TYPES:
        folder = root / category / "test" / defect
        folders.append((defect, folder, params["num_test_per_defect"]))
    for kind, folder, count in folders:
        folder.mkdir(parents=True)
        gt_folder = root / category / "ground_truth" / kind
        if kind in DEFECT_TYPES:
            gt_folder.mkdir(parents=True)
        for i in range(count):
            sample = render_sample(category, kind, i, size)
            name = _file_name(i, count)
            Image.fromarray(sample.image).save(folder / f"{name}.png")
            if sample.mask is not None:
                mask = sample.mask.astype(np.uint8) * 255
                Image.fromarray(mask, "L").save(gt_folder / f"{name}_mask.png")


def _marker_contents(**params) -> dict:
    return {
        "format": "recontrast_jax embedded dataset",
        "version": FORMAT_VERSION,
        "categories": list(CATEGORIES),
        "defect_types": list(DEFECT_TYPES),
        **params,
    }


def _is_complete(root: pathlib.Path, marker: dict) -> bool:
    try:
        return json.loads((root / MARKER_NAME).read_text()) == marker
    except (OSError, ValueError):
        return False


def _check_replaceable(root: pathlib.Path) -> None:
    """Refuses to replace a folder that is not (a remnant of) an embedded dataset."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DatasetError(f"embedded dataset root {root} exists and is not a folder")
    ours = set(CATEGORIES) | {MARKER_NAME}
    foreign = sorted(set(os.listdir(root)) - ours)
    if foreign:
        raise DatasetError(
            f"embedded dataset root {root} holds files that are not part of an "
            f"embedded dataset ({', '.join(foreign[:5])}); refusing to overwrite it. "
            "Pass another root or set $RECONTRAST_JAX_DATA."
        )


@contextlib.contextmanager
def _exclusive_lock(root: pathlib.Path):
    """Serialises generation between processes (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # Not POSIX: rely on the atomic rename alone.
        yield False
        return
    with open(root.parent / f".{root.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: pathlib.Path) -> None:
    """Deletes temporary folders of interrupted generations (call under the lock)."""
    for pattern in (f".{root.name}.tmp-*", f".{root.name}.old-*"):
        for leftover in root.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _install(tmp: pathlib.Path, root: pathlib.Path) -> None:
    """Moves the finished ``tmp`` into place, replacing a stale ``root``."""
    if root.exists():
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex}"
        os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, root)


def ensure_embedded_dataset(
    root: str | os.PathLike | None = None,
    *,
    image_size: int = 128,
    num_train: int = 60,
    num_test_good: int = 12,
    num_test_per_defect: int = 4,
) -> pathlib.Path:
    """Returns the embedded dataset's root, generating it first if needed.

    Safe against crashes (the folder appears only when complete) and against
    concurrent callers (generation holds a lock; a finished dataset is reused).
    A folder holding a dataset made with other parameters is replaced.

    Args:
      root: Dataset folder; default :func:`default_cache_dir`.
      image_size: Side of every image.
      num_train: Normal training images per category.
      num_test_good: Normal test images per category.
      num_test_per_defect: Test images per defect type and category.

    Returns:
      ``root``, holding ``<category>/train/good/000.png``, ``test/good``,
      ``test/<defect>`` and ``ground_truth/<defect>/<stem>_mask.png``.

    Raises:
      ValueError: On non-positive sizes or counts.
      DatasetError: If ``root`` exists and holds unrelated files.
    """
    params = dict(
        image_size=image_size,
        num_train=num_train,
        num_test_good=num_test_good,
        num_test_per_defect=num_test_per_defect,
    )
    for name, value in params.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    root = pathlib.Path(root).expanduser() if root else default_cache_dir()
    marker = _marker_contents(**params)
    if _is_complete(root, marker):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root) as locked:
        if _is_complete(root, marker):  # Another process finished meanwhile.
            return root
        _check_replaceable(root)
        if locked:
            _remove_leftovers(root)
        console.say(
            f"generating the embedded dataset in {root} (once; set "
            "$RECONTRAST_JAX_DATA or data.root to put it elsewhere)"
        )
        tmp = pathlib.Path(
            tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent)
        )
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not.
        try:
            for category in CATEGORIES:
                _write_category(tmp, category, params)
            # Written last: its presence means every image is on disk.
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
            _install(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root
