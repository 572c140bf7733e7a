"""TensorFlow Datasets builder for VisA (manual download, official 1cls split).

Importing this module registers the builder (``tfds.builder('visa/candle')``).
One config per object; splits ``train`` and ``test`` follow
``split_csv/1cls.csv`` of the raw release.

The manual directory may hold the extracted raw release
(``<manual_dir>/<object>/Data/...`` and ``<manual_dir>/split_csv/1cls.csv``,
optionally inside a ``VisA/`` or ``VisA_20220922/`` folder) or the archive
``VisA_20220922.tar``, which is then extracted once into
``<download_dir>/extracted/``.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from recontrast_jax.data import categories, tfds_common
from recontrast_jax.data.folder import DatasetError

OBJECTS = categories.VISA_OBJECTS
ARCHIVE_NAME = "VisA_20220922.tar"
SPLIT_CSV = "split_csv/1cls.csv"
_CSV_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}
# Defect types of the prepared VisA_pytorch layout (test/good, test/bad).
_DEFECT_TYPES = {0: "good", 1: "bad"}
_ROOT_FOLDERS = ("", "VisA", "VisA_20220922")

_DESCRIPTION = """\
VisA (Visual Anomaly): 10821 high-resolution colour images of 12 objects
(9621 normal, 1200 anomalous) with pixel-level masks, split with the official
one-class split `split_csv/1cls.csv`. Images are stored as the original JPEG
bytes. Masks are binarised as the official `prepare_visa.py` does (any non-zero
class id becomes 255) and are all zero for normal images. `defect_type` is
`good` or `bad` as in the prepared `VisA_pytorch/1cls` layout; `file_name` is
the path inside the object folder of the raw release.
"""

_CITATION = """\
@inproceedings{zou2022spot,
  title={SPot-the-Difference Self-supervised Pre-training for Anomaly Detection
         and Segmentation},
  author={Zou, Yang and Jeong, Jongheon and Pemula, Latha and Zhang, Dongqing
          and Dabeer, Onkar},
  booktitle={European Conference on Computer Vision},
  pages={392--408},
  year={2022}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
VisA must be downloaded by hand:

1. Download `{ARCHIVE_NAME}` (about 1.8 GB) from the link in the README of
   https://github.com/amazon-science/spot-diff (licence CC BY 4.0 according to
   that README). Its checksum is not verified by this builder: compare it with
   the one the dataset owner publishes, if any.
2. Put into the manual directory (default `<data_dir>/downloads/manual/`, or
   `tfds build --manual_dir DIR`) either
   * the archive itself: `<manual_dir>/{ARCHIVE_NAME}` (extracted once under
     `<data_dir>/downloads/extracted/`), or
   * the extracted raw release: `<manual_dir>/<object>/Data/Images/...` and
     `<manual_dir>/{SPLIT_CSV}` (a `VisA/` folder in between is accepted).
   Do not use the prepared `VisA_pytorch` layout: it has lost the split file.
"""


class Visa(tfds.core.GeneratorBasedBuilder):
    """VisA, one config per object, official 1cls split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=o, description=f"VisA object {o}.")
        for o in OBJECTS
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds_common.anomaly_features(),
            supervised_keys=("image", "label"),
            homepage="https://github.com/amazon-science/spot-diff",
            citation=_CITATION,
            license="CC BY 4.0",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = find_visa_root(
            dl_manager.manual_dir, dl_manager.download_dir / "extracted"
        )
        rows = read_split_rows(root / SPLIT_CSV, self.builder_config.name)
        return {
            split: self._generate_examples(root, rows[split])
            for split in ("train", "test")
        }

    def _generate_examples(self, root: epath.Path, rows: list[dict[str, str]]):
        for row in rows:
            example = _example(root, row)
            yield example["file_name"], example


def find_visa_root(
    manual_dir: epath.PathLike, extract_root: epath.PathLike
) -> epath.Path:
    """Finds (extracting the archive if needed) the folder holding ``split_csv/``.

    Args:
      manual_dir: The manual download directory.
      extract_root: Where the archive is extracted if no extracted copy exists.

    Returns:
      The VisA root: the folder holding ``split_csv/1cls.csv`` and the objects.

    Raises:
      DatasetError: If neither an extracted copy nor the archive is found.
    """
    manual_dir = epath.Path(manual_dir)
    root = _root_with_split_csv(manual_dir)
    if root is not None:
        return root
    archive = manual_dir / ARCHIVE_NAME
    if not archive.is_file():
        tried = ", ".join(str(manual_dir / f / SPLIT_CSV) for f in _ROOT_FOLDERS)
        raise DatasetError(
            f"VisA not found: none of {tried} exists and there is no archive {archive}"
        )
    extracted = tfds_common.extract_archive_once(
        archive, epath.Path(extract_root) / "VisA"
    )
    root = _root_with_split_csv(extracted)
    if root is None:
        raise DatasetError(
            f"archive {archive} (extracted to {extracted}) has no {SPLIT_CSV}"
        )
    return root


def _root_with_split_csv(folder: epath.Path) -> epath.Path | None:
    for name in _ROOT_FOLDERS:
        candidate = folder / name if name else folder
        if (candidate / SPLIT_CSV).is_file():
            return candidate
    return None


def read_split_rows(
    csv_path: epath.PathLike, object_name: str
) -> dict[str, list[dict[str, str]]]:
    """Reads the rows of one object from ``1cls.csv``, grouped by split.

    Args:
      csv_path: The split file (header ``object,split,label,image,mask``).
      object_name: VisA object whose rows to keep.

    Returns:
      ``{"train": rows, "test": rows}`` in file order; each row is a dict of the
      CSV columns.

    Raises:
      DatasetError: On a wrong header, unknown split/label, an image outside
        the object folder, an anomaly without mask, or no training row for the object (naming the file and line).
    """
    csv_path = epath.Path(csv_path)
    reader = csv.DictReader(io.StringIO(csv_path.read_text()))
    if tuple(reader.fieldnames or ()) != _CSV_COLUMNS:
        raise DatasetError(
            f"{csv_path} has header {reader.fieldnames}, expected {list(_CSV_COLUMNS)}"
        )
    rows = {"train": [], "test": []}
    for row in reader:
        if row["object"] != object_name:
            continue
        where = f"{csv_path} line {reader.line_num}"
        if row["split"] not in rows:
            raise DatasetError(f"{where}: unknown split {row['split']!r}")
        if row["label"] not in _LABELS:
            raise DatasetError(f"{where}: unknown label {row['label']!r}")
        if not row["image"].startswith(object_name + "/"):
            raise DatasetError(
                f"{where}: image {row['image']} is not inside {object_name}/"
            )
        if row["label"] == "anomaly" and not row["mask"]:
            raise DatasetError(f"{where}: anomaly image {row['image']} has no mask")
        rows[row["split"]].append(row)
    if not rows["train"]:
        raise DatasetError(f"{csv_path} has no training row for object {object_name!r}")
    return rows


def binarised_mask(path: epath.PathLike) -> np.ndarray:
    """Loads a VisA class-id mask and binarises it like ``prepare_visa.py``.

    The raw values (palette indices or gray levels, not converted colours) are
    compared with zero, so every defect class becomes 255.

    Args:
      path: Mask PNG of the raw release.

    Returns:
      uint8 array of shape (H, W, 1) with values 0 and 255.

    Raises:
      DatasetError: If the file is missing or unreadable.
    """
    path = epath.Path(path)
    try:
        with path.open("rb") as f, Image.open(f) as image:
            values = np.asarray(image)
    except FileNotFoundError as e:
        raise DatasetError(f"mask file {path} does not exist") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read mask {path}: {type(e).__name__}: {e}") from e
    if values.ndim == 3:  # A colour mask: a pixel is defective if any channel is.
        values = values.any(axis=-1)
    return np.where(values != 0, 255, 0).astype(np.uint8)[..., None]


def _example(root: epath.Path, row: dict[str, str]) -> dict:
    """Builds one example from a CSV row; the image bytes are stored unchanged."""
    image_path = root / row["image"]
    if not image_path.is_file():
        raise DatasetError(f"image {image_path} listed in {SPLIT_CSV} does not exist")
    image_wh = tfds_common.image_size(image_path)
    label = _LABELS[row["label"]]
    if row["mask"]:
        mask = binarised_mask(root / row["mask"])
        if mask.shape[1::-1] != image_wh:
            raise DatasetError(
                f"mask {root / row['mask']} has size {mask.shape[1::-1]} (width, "
                f"height) but its image {image_path} has size {image_wh}"
            )
    else:
        mask = tfds_common.zero_mask(image_wh)
    return {
        "image": image_path,
        "mask": mask,
        "label": label,
        "defect_type": _DEFECT_TYPES[label],
        # Path inside the object folder, e.g. "Data/Images/Anomaly/000.JPG".
        "file_name": row["image"].split("/", 1)[1],
    }
