"""TFDS builder ``isic2018``: ISIC 2018 Task 3 dermoscopy as a one-class set.

Reproduces ReContrast's ``prepare_data/prepare_isic2018.py``: normal = NV
(melanocytic nevus). The training set is the Task 3 Training images with
NV == 1 (6705); the test set is the whole Task 3 Validation set (193 images,
123 NV normal, 70 of the other six classes abnormal). The original JPEG bytes
are stored unchanged.

Importing this module registers the builder with TFDS.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from recontrast_jax.data import tfds_common

DIAGNOSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
NORMAL_CLASS = "NV"

_INSTRUCTIONS = """\
Download the ISIC 2018 Challenge Task 3 (lesion diagnosis) data from
https://challenge.isic-archive.com/data/#2018 (licence CC BY-NC 4.0; the
training images are the HAM10000 set). Four zips are needed: Training Input,
Training Ground Truth, Validation Input and Validation Ground Truth. Extract
them into the manual directory (by default `<data_dir>/downloads/manual/`, or
the folder passed with `--manual_dir`):

    <manual_dir>/ISIC2018_Task3_Training_Input/*.jpg
    <manual_dir>/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
    <manual_dir>/ISIC2018_Task3_Validation_Input/*.jpg
    <manual_dir>/ISIC2018_Task3_Validation_GroundTruth/ISIC2018_Task3_Validation_GroundTruth.csv
"""


class DatasetLayoutError(ValueError):
    """The manual directory does not have the expected files."""


def read_diagnoses(csv_path: epath.Path) -> list[tuple[str, str]]:
    """Reads a Task 3 ground-truth CSV into (image id, diagnosis) pairs.

    Args:
      csv_path: CSV with columns image,MEL,NV,BCC,AKIEC,BKL,DF,VASC (one-hot
        0.0/1.0 values).

    Returns:
      The rows in file order, each with the name of its column equal to 1.

    Raises:
      DatasetLayoutError: The file is missing, lacks columns or a row is not
        one-hot.
    """
    if not csv_path.exists():
        raise DatasetLayoutError(f"{csv_path}: ground-truth CSV not found.")
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    expected = {"image", *DIAGNOSES}
    if not rows or not expected <= set(rows[0]):
        raise DatasetLayoutError(
            f"{csv_path}: expected a header with columns image,"
            f"{','.join(DIAGNOSES)} and at least one row."
        )
    result = []
    for line_number, row in enumerate(rows, start=2):
        try:
            positive = [name for name in DIAGNOSES if float(row[name]) == 1.0]
        except ValueError:
            raise DatasetLayoutError(
                f"{csv_path}, line {line_number}: a diagnosis value is not a number."
            ) from None
        if len(positive) != 1:
            raise DatasetLayoutError(
                f"{csv_path}, line {line_number}: expected exactly one diagnosis "
                f"equal to 1, got {positive or 'none'}."
            )
        result.append((row["image"], positive[0]))
    return result


def load_subset(root: epath.Path, subset: str) -> list[tuple[str, epath.Path]]:
    """Lists (diagnosis, image path) for the Training or Validation subset.

    Args:
      root: The manual directory.
      subset: "Training" or "Validation".

    Returns:
      One pair per CSV row, in CSV order.

    Raises:
      DatasetLayoutError: The CSV or an image it lists is missing.
    """
    stem = f"ISIC2018_Task3_{subset}_GroundTruth"
    diagnoses = read_diagnoses(root / stem / f"{stem}.csv")
    image_dir = root / f"ISIC2018_Task3_{subset}_Input"
    items = []
    for image_id, diagnosis in diagnoses:
        path = image_dir / f"{image_id}.jpg"
        if not path.exists():
            raise DatasetLayoutError(f"{path}: image listed in {stem}.csv is missing.")
        items.append((diagnosis, path))
    return items


class Isic2018(tfds.core.GeneratorBasedBuilder):
    """ISIC 2018 Task 3, ReContrast's one-class split (NV normal)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train = Training NV, test = Validation."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "ISIC 2018 Task 3 dermoscopic images, one-class split of "
                "ReContrast: train = Training images with NV; test = the whole "
                "Validation set, NV normal and MEL, BCC, AKIEC, BKL, DF, VASC "
                "abnormal. Original JPEG bytes."
            ),
            features=tfds_common.classification_features(),
            supervised_keys=("image", "label"),
            homepage="https://challenge.isic-archive.com/data/#2018",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = epath.Path(dl_manager.manual_dir)
        train = [
            item for item in load_subset(root, "Training") if item[0] == NORMAL_CLASS
        ]
        return {
            "train": self._generate_examples(train),
            "test": self._generate_examples(load_subset(root, "Validation")),
        }

    def _generate_examples(
        self, items: list[tuple[str, epath.Path]]
    ) -> Iterator[tuple[str, dict]]:
        for diagnosis, path in items:
            yield (
                path.stem,
                {
                    # The bytes are stored as they are: no decoding, no re-encoding.
                    "image": path.read_bytes(),
                    "label": "normal" if diagnosis == NORMAL_CLASS else "abnormal",
                    "defect_type": diagnosis,
                    "file_name": path.name,
                },
            )
