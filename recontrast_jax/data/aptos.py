"""TFDS builder ``aptos2019``: APTOS 2019 fundus images as a one-class set.

Reproduces ReContrast's ``prepare_data/prepare_aptos.py``:

* Only ``train.csv`` (columns ``id_code,diagnosis``) is used; grade 0 is normal.
* The grade-0 ids, in CSV order, are shuffled by Python's ``random`` seeded
  with 1; the first 1000 are the training set, the remaining normals and every
  image of grades 1-4 form the test set (1000 train / 2662 test on the full
  data).
* Every image is fundus-cropped (:func:`fundus_crop`) and resized to 512x512
  with OpenCV ``INTER_LINEAR`` semantics (:func:`resize_bilinear`), then
  stored as PNG.

Importing this module registers the builder with TFDS.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.ndimage
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from recontrast_jax.data import tfds_common

REFERENCE_SEED = 1
REFERENCE_NUM_TRAIN = 1000
REFERENCE_IMAGE_SIZE = 512
REFERENCE_MARGIN = 5
# A pixel belongs to the fundus when its B+G+R sum exceeds this value.
BRIGHTNESS_THRESHOLD = 30

_CSV_NAME = "train.csv"
_IMAGE_DIR = "train_images"

_INSTRUCTIONS = """\
Download the APTOS 2019 Blindness Detection data from Kaggle
(https://www.kaggle.com/competitions/aptos2019-blindness-detection/data).
This needs a Kaggle account and accepting the competition rules; the data may
only be used under those rules (no redistribution). Extract the archive so that
the manual directory (by default `<data_dir>/downloads/manual/`, or the folder
passed with `--manual_dir`) contains:

    <manual_dir>/train.csv            (columns id_code,diagnosis)
    <manual_dir>/train_images/<id_code>.png

`test.csv` and `test_images/` are not used.
"""


class DatasetLayoutError(ValueError):
    """The manual directory does not have the expected files."""


def reference_split(
    normal_ids: Sequence[str], num_train: int = REFERENCE_NUM_TRAIN
) -> tuple[list[str], list[str]]:
    """Splits the grade-0 ids exactly like the reference preparation script.

    The reference calls ``random.seed(1)`` and ``random.shuffle`` on the list of
    normal images in CSV order. A private ``random.Random(1)`` produces the same
    permutation without touching the global random state.

    Args:
      normal_ids: Ids of the grade-0 images, in CSV order.
      num_train: How many shuffled normals go to the training set.

    Returns:
      (train normal ids, test normal ids).
    """
    shuffled = list(normal_ids)
    random.Random(REFERENCE_SEED).shuffle(shuffled)
    return shuffled[:num_train], shuffled[num_train:]


def read_grades(csv_path: epath.Path) -> list[tuple[str, int]]:
    """Reads ``train.csv`` into (id_code, diagnosis) pairs in file order.

    Args:
      csv_path: Path of the APTOS ``train.csv``.

    Returns:
      The rows as (id_code, integer grade).

    Raises:
      DatasetLayoutError: The file is missing, lacks the columns or has a bad
        grade.
    """
    if not csv_path.exists():
        raise DatasetLayoutError(f"{csv_path}: file not found (APTOS train.csv).")
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    if not rows or not {"id_code", "diagnosis"} <= set(rows[0]):
        raise DatasetLayoutError(
            f"{csv_path}: expected a header with columns id_code,diagnosis "
            "and at least one row."
        )
    grades = []
    for line_number, row in enumerate(rows, start=2):
        try:
            grade = int(float(row["diagnosis"]))
        except ValueError:
            raise DatasetLayoutError(
                f"{csv_path}, line {line_number}: diagnosis "
                f"{row['diagnosis']!r} is not an integer grade."
            ) from None
        if not 0 <= grade <= 4:
            raise DatasetLayoutError(
                f"{csv_path}, line {line_number}: diagnosis {grade} is not in 0..4."
            )
        grades.append((row["id_code"], grade))
    return grades


def largest_component_mask(mask: np.ndarray) -> np.ndarray:
    """Keeps the largest 8-connected component of a boolean mask.

    Ties go to the component met first in raster order, as in the reference
    (``max`` over skimage ``regionprops``, which are ordered the same way).

    Args:
      mask: (H, W) boolean mask.

    Returns:
      (H, W) boolean mask of the largest component.

    Raises:
      ValueError: The mask is empty.
    """
    labels, count = scipy.ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        raise ValueError("no pixel is brighter than the fundus threshold")
    areas = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(areas)) + 1)


def crop_with_zero_fill(
    image: np.ndarray, top: int, left: int, bottom: int, right: int
) -> np.ndarray:
    """Crops rows [top, bottom) and columns [left, right), zero outside the image.

    Args:
      image: (H, W, C) array.
      top: First row (may be negative).
      left: First column (may be negative).
      bottom: Row after the last one (may exceed H).
      right: Column after the last one (may exceed W).

    Returns:
      (bottom - top, right - left, C) array of the image's dtype.
    """
    height, width = image.shape[:2]
    crop = np.zeros((bottom - top, right - left) + image.shape[2:], image.dtype)
    src_top, src_bottom = max(top, 0), min(bottom, height)
    src_left, src_right = max(left, 0), min(right, width)
    if src_top < src_bottom and src_left < src_right:
        crop[src_top - top : src_bottom - top, src_left - left : src_right - left] = (
            image[src_top:src_bottom, src_left:src_right]
        )
    return crop


def _source_coordinates(in_size: int, out_size: int):
    """Returns (index0, index1, weight1) of OpenCV INTER_LINEAR along one axis.

    Output pixel ``d`` samples the source at ``(d + 0.5) * in/out - 0.5``
    (half-pixel centres), clamped to ``[0, in_size - 1]`` (edge replication).
    """
    scale = in_size / out_size
    coords = (np.arange(out_size) + 0.5) * scale - 0.5
    coords = np.clip(coords, 0.0, in_size - 1)
    index0 = np.floor(coords).astype(np.int64)
    index1 = np.minimum(index0 + 1, in_size - 1)
    return index0, index1, coords - index0


def resize_bilinear_float(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with OpenCV INTER_LINEAR geometry, in float64.

    No antialiasing: each output pixel interpolates its 2x2 source neighbours,
    also when shrinking (as ``cv2.resize(..., INTER_LINEAR)``).

    Args:
      image: (H, W) or (H, W, C) array.
      size: (out_height, out_width).

    Returns:
      float64 array of shape (out_height, out_width) + image.shape[2:].
    """
    image = np.asarray(image, np.float64)
    rows0, rows1, row_weight = _source_coordinates(image.shape[0], size[0])
    cols0, cols1, col_weight = _source_coordinates(image.shape[1], size[1])
    extra_dims = (1,) * (image.ndim - 2)
    row_weight = row_weight.reshape((-1, 1) + extra_dims)
    col_weight = col_weight.reshape((1, -1) + extra_dims)
    # Separable: interpolate rows first, then columns.
    rows = image[rows0] * (1.0 - row_weight) + image[rows1] * row_weight
    return rows[:, cols0] * (1.0 - col_weight) + rows[:, cols1] * col_weight


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes a uint8 image like ``cv2.resize(..., INTER_LINEAR)``.

    OpenCV uses 11-bit fixed-point weights for uint8, so its output can differ
    from this float computation by one grey level on some pixels.

    Args:
      image: (H, W) or (H, W, C) uint8 array.
      size: (out_height, out_width).

    Returns:
      uint8 array of shape (out_height, out_width) + image.shape[2:], rounded
      half up.
    """
    resized = resize_bilinear_float(image, size)
    return np.clip(np.floor(resized + 0.5), 0, 255).astype(np.uint8)


def fundus_crop(
    image: np.ndarray,
    size: int = REFERENCE_IMAGE_SIZE,
    margin: int = REFERENCE_MARGIN,
) -> np.ndarray:
    """Crops the fundus disc and resizes it, as the reference ``fundus_crop``.

    The crop is centred on the centroid of the largest 8-connected region of
    pixels whose channel sum exceeds 30. Its side is the larger side of that
    region's bounding box; the box corners are truncated toward zero (numpy
    ``astype(int16)`` in the reference), then widened by ``margin`` on each side.
    Parts outside the image are zero.

    Args:
      image: (H, W, 3) uint8 image.
      size: Output side in pixels.
      margin: Pixels added on each side of the box.

    Returns:
      (size, size, 3) uint8 image.

    Raises:
      ValueError: No pixel of the image is bright enough.
    """
    # uint8 sums are accumulated in a wider integer type by numpy.
    region = largest_component_mask(image.sum(axis=-1) > BRIGHTNESS_THRESHOLD)
    rows, cols = np.nonzero(region)
    side = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    centroid = np.array([rows.mean(), cols.mean()])
    top, left = np.trunc(centroid - side / 2).astype(int)
    bottom, right = np.trunc(centroid + side / 2).astype(int)
    crop = crop_with_zero_fill(
        image, top - margin, left - margin, bottom + margin, right + margin
    )
    return resize_bilinear(crop, (size, size))


def load_rgb(path: epath.Path) -> np.ndarray:
    """Reads an image file as an (H, W, 3) uint8 RGB array.

    Args:
      path: Image path.

    Returns:
      The decoded image.
    """
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        return np.asarray(image.convert("RGB"))


class Aptos2019(tfds.core.GeneratorBasedBuilder):
    """APTOS 2019 fundus images, ReContrast's one-class split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "ReContrast split: 1000 train normals, seed 1."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    # Subclasses (tests) may shrink these; the defaults are the reference's.
    NUM_TRAIN = REFERENCE_NUM_TRAIN
    IMAGE_SIZE = REFERENCE_IMAGE_SIZE

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "APTOS 2019 Blindness Detection fundus photographs, one-class "
                "split of ReContrast: normal = diagnosis 0. Images are "
                f"fundus-cropped and resized to {self.IMAGE_SIZE}x"
                f"{self.IMAGE_SIZE}."
            ),
            features=tfds_common.classification_features(),
            supervised_keys=("image", "label"),
            homepage="https://www.kaggle.com/competitions/aptos2019-blindness-detection",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = epath.Path(dl_manager.manual_dir)
        grades = read_grades(root / _CSV_NAME)
        image_dir = root / _IMAGE_DIR
        if not image_dir.is_dir():
            raise DatasetLayoutError(f"{image_dir}: folder not found.")
        grade_of = dict(grades)
        normal_ids = [id_code for id_code, grade in grades if grade == 0]
        train_ids, test_normal_ids = reference_split(normal_ids, self.NUM_TRAIN)
        abnormal_ids = [id_code for id_code, grade in grades if grade != 0]
        return {
            "train": self._generate_examples(image_dir, train_ids, grade_of),
            "test": self._generate_examples(
                image_dir, test_normal_ids + abnormal_ids, grade_of
            ),
        }

    def _generate_examples(
        self, image_dir: epath.Path, ids: list[str], grade_of: dict[str, int]
    ) -> Iterator[tuple[str, dict]]:
        for id_code in ids:
            path = image_dir / f"{id_code}.png"
            if not path.exists():
                raise DatasetLayoutError(
                    f"{path}: image listed in train.csv is missing."
                )
            try:
                image = fundus_crop(load_rgb(path), self.IMAGE_SIZE)
            except ValueError as error:
                raise DatasetLayoutError(f"{path}: {error}.") from None
            grade = grade_of[id_code]
            yield (
                id_code,
                {
                    "image": image,
                    "label": "normal" if grade == 0 else "abnormal",
                    "defect_type": f"grade_{grade}",
                    "file_name": path.name,
                },
            )
