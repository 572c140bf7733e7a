"""Reader for any dataset stored in the MVTec AD folder layout.

The layout (MVTec AD, and VisA after the official ``prepare_visa.py``)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   (MVTec)
    <root>/<category>/ground_truth/<defect>/<stem>.png        (VisA prepared)

Masks are paired with test images by file stem, never by sorted position, so a
missing or extra mask is reported instead of silently shifting every pairing.
Every problem with the data raises :class:`DatasetError` whose message names the
offending path and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
# Folders of normal images: MVTec's and VisA's `good`, BTAD's `ok` (its
# anomalies are `ko`, with masks in `ground_truth/ko`).
NORMAL_FOLDERS = (GOOD, "ok")
_MASK_SUFFIXES = ("_mask.png", ".png")


class DatasetError(ValueError):
    """A dataset folder or file is missing, empty, unpaired or unreadable."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image of a split.

    Attributes:
      path: Image file path.
      mask_path: Ground-truth mask path, or None for good images.
      label: 0 for good images, 1 for defective ones.
      defect_type: Name of the folder under ``test/`` ("good" or "ok" for
        normal images).
      image_bytes: The encoded image itself, for sources that are not files
        (TFDS); ``path`` then only names it.
      mask_bytes: The encoded mask, likewise (None: no mask, or ``mask_path``).
    """

    path: str
    mask_path: str | None
    label: int
    defect_type: str
    image_bytes: bytes | None = dataclasses.field(default=None, repr=False)
    mask_bytes: bytes | None = dataclasses.field(default=None, repr=False)

    @property
    def has_mask(self) -> bool:
        return self.mask_path is not None or self.mask_bytes is not None


@dataclasses.dataclass(frozen=True)
class CategoryFiles:
    """All files of one category, in a deterministic order.

    Attributes:
      root: Dataset root folder.
      category: Category name (sub-folder of ``root``).
      train: Training samples (``train/good``, BTAD's ``train/ok``), sorted by
        file name.
      test: Test samples: the normal folder first, then every defect type in sorted
        order, each sorted by file name.
    """

    root: str
    category: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]


def is_image_file(name: str) -> bool:
    """Returns True if ``name`` has an image extension (case-insensitive)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_categories(root: str | os.PathLike) -> list[str]:
    """Lists the categories of a dataset root.

    Args:
      root: Folder holding one sub-folder per category.

    Returns:
      Sorted names of the sub-folders that contain ``train/good`` (or BTAD's
      ``train/ok``).

    Raises:
      DatasetError: If ``root`` is missing or holds no category.
    """
    root = os.fspath(root)
    _require_dir(root, "dataset root")
    categories = sorted(
        name
        for name in os.listdir(root)
        if _normal_folder(os.path.join(root, name, "train")) is not None
    )
    if not categories:
        raise DatasetError(
            f"no category found in {root}: expected sub-folders with train/good "
            "(MVTec layout <root>/<category>/train/good/*.png; BTAD: train/ok)"
        )
    return categories


def scan_category(root: str | os.PathLike, category: str) -> CategoryFiles:
    """Lists the training and test files of one category.

    Args:
      root: Dataset root folder.
      category: Category sub-folder name.

    Returns:
      The category's samples in a deterministic order (see :class:`CategoryFiles`).

    Raises:
      DatasetError: If a required folder is missing, ``train/good`` holds no
        image, or a defect image has no mask.
    """
    root = os.fspath(root)
    _require_dir(root, "dataset root")
    category_dir = os.path.join(root, category)
    _require_dir(category_dir, f"category folder of {category!r}")
    normal = _normal_folder(os.path.join(category_dir, "train")) or GOOD
    train_dir = os.path.join(category_dir, "train", normal)
    _require_dir(train_dir, "training folder")
    train_paths = _list_images(train_dir)
    if not train_paths:
        raise DatasetError(f"no training images in {train_dir}")
    train = tuple(Sample(p, None, 0, normal) for p in train_paths)
    return CategoryFiles(root, category, train, _scan_test(category_dir))


def _normal_folder(parent: str) -> str | None:
    """The first of `NORMAL_FOLDERS` that is a folder inside `parent`."""
    for name in NORMAL_FOLDERS:
        if os.path.isdir(os.path.join(parent, name)):
            return name
    return None


def _scan_test(category_dir: str) -> tuple[Sample, ...]:
    """Lists the normal test folder then every ``test/<defect>`` with its masks."""
    test_dir = os.path.join(category_dir, "test")
    _require_dir(test_dir, "test folder")
    normal = _normal_folder(test_dir)
    defect_types = sorted(
        name
        for name in os.listdir(test_dir)
        if name != normal and os.path.isdir(os.path.join(test_dir, name))
    )
    samples = []
    if normal is not None:
        normal_dir = os.path.join(test_dir, normal)
        samples += [Sample(p, None, 0, normal) for p in _list_images(normal_dir)]
    for defect in defect_types:
        gt_dir = os.path.join(category_dir, "ground_truth", defect)
        for path in _list_images(os.path.join(test_dir, defect)):
            samples.append(Sample(path, _find_mask(path, gt_dir), 1, defect))
    if not samples:
        raise DatasetError(f"no test images in {test_dir}")
    return tuple(samples)


def _find_mask(image_path: str, gt_dir: str) -> str:
    """Returns the mask of ``image_path``: ``<stem>_mask.png`` or ``<stem>.png``."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    tried = [os.path.join(gt_dir, stem + suffix) for suffix in _MASK_SUFFIXES]
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise DatasetError(
        f"defect image {image_path} has no ground-truth mask; tried "
        + " and ".join(tried)
    )


NORMAL_CLASS = "NORMAL"


def scan_classification_folder(root: str | os.PathLike, name: str) -> CategoryFiles:
    """Lists a medical-style folder: ``train/NORMAL``, ``test/<CLASS>/``.

    The layout the ReContrast preparation scripts write for APTOS, ISIC2018 and
    OCT2017: normal training images in ``train/NORMAL``; test images in one
    folder per class, ``NORMAL`` normal (label 0) and every other class (e.g.
    ``ABNORMAL``, or OCT's ``CNV``, ``DME``, ``DRUSEN``) anomalous (label 1).
    There are no masks.

    Args:
      root: The dataset folder (holding ``train/`` and ``test/``).
      name: The category name to report (e.g. 'oct2017').

    Raises:
      DatasetError: If a folder is missing or empty.
    """
    root = os.fspath(root)
    train_dir = os.path.join(root, "train", NORMAL_CLASS)
    _require_dir(train_dir, "training folder")
    train = tuple(Sample(p, None, 0, NORMAL_CLASS) for p in _list_images(train_dir))
    if not train:
        raise DatasetError(f"no training images in {train_dir}")
    test_dir = os.path.join(root, "test")
    _require_dir(test_dir, "test folder")
    classes = sorted(
        (c for c in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, c))),
        key=lambda c: (c != NORMAL_CLASS, c),
    )
    test = tuple(
        Sample(p, None, int(c != NORMAL_CLASS), c)
        for c in classes
        for p in _list_images(os.path.join(test_dir, c))
    )
    if not test:
        raise DatasetError(f"no test images in the class folders of {test_dir}")
    return CategoryFiles(root=root, category=name, train=train, test=test)


def _list_images(folder: str) -> list[str]:
    """Sorted image files directly inside ``folder``."""
    return [
        os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if is_image_file(name) and os.path.isfile(os.path.join(folder, name))
    ]


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        problem = "is not a folder" if os.path.exists(path) else "does not exist"
        raise DatasetError(f"{what} {path} {problem}")


def _open_decoded(
    path: str | os.PathLike, mode: str, data: bytes | None = None
) -> np.ndarray:
    """Opens an image (a file, or ``data`` named ``path``), decodes and converts it."""
    path = os.fspath(path)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            # Image.open is lazy: load() forces the full decode so a truncated or
            # corrupt file fails here, inside the try, instead of later.
            image.load()
            return np.asarray(image.convert(mode))
    except FileNotFoundError as e:
        raise DatasetError(f"image file {path} does not exist") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL reports unreadable data as OSError (incl. UnidentifiedImageError),
        # ValueError or SyntaxError depending on the plugin.
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Loads an image as RGB, exactly like ``PIL.Image.open(path).convert('RGB')``.

    Args:
      path: Image file.

    Returns:
      uint8 array of shape (H, W, 3).

    Raises:
      DatasetError: If the file is missing, corrupt or truncated.
    """
    return _open_decoded(path, "RGB")


def load_sample_image(sample: Sample) -> np.ndarray:
    """The RGB image of a sample, from its bytes or its file (``load_rgb``)."""
    return _open_decoded(sample.path, "RGB", sample.image_bytes)


def load_sample_mask(sample: Sample) -> np.ndarray | None:
    """The sample's mask as uint8 (H, W), or None if it has none."""
    if sample.mask_bytes is not None:
        return _open_decoded(f"{sample.path} (mask)", "L", sample.mask_bytes)
    return None if sample.mask_path is None else load_mask(sample.mask_path)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Loads a ground-truth mask as 8-bit grayscale (``convert('L')``).

    Args:
      path: Mask file.

    Returns:
      uint8 array of shape (H, W).

    Raises:
      DatasetError: If the file is missing, corrupt or truncated.
    """
    return _open_decoded(path, "L")
