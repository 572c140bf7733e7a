"""TFDS builder ``oct2017``: retinal OCT scans (Kermany et al.) as a one-class set.

ReContrast's split: the training set is ``train/NORMAL`` (26315 images); the
test set is all of ``test/`` (1000 images, 250 per class), NORMAL normal and
CNV, DME, DRUSEN abnormal. The original JPEG bytes are stored unchanged.

Importing this module registers the builder with TFDS.
"""

from __future__ import annotations

from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from recontrast_jax.data import tfds_common

CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
NORMAL_CLASS = "NORMAL"
_IMAGE_SUFFIXES = (".jpeg", ".jpg")
# Parent folders in which the archives ship the train/test folders.
_ROOT_CANDIDATES = ("", "OCT2017", "CellData/OCT")

_INSTRUCTIONS = """\
Download "Large Dataset of Labeled Optical Coherence Tomography (OCT) and Chest
X-Ray Images" (Kermany, Zhang, Goldbaum), Mendeley Data, v3,
doi:10.17632/rscbjbr9sj.3 (https://data.mendeley.com/datasets/rscbjbr9sj/3),
licence CC BY 4.0. Extract the OCT part (`ZhangLabData.zip` ->
`CellData/OCT`, or the Kaggle copy `OCT2017/`) so that the manual directory (by
default `<data_dir>/downloads/manual/`, or the folder passed with
`--manual_dir`) contains

    <manual_dir>/{train,test}/{CNV,DME,DRUSEN,NORMAL}/*.jpeg

(`<manual_dir>/OCT2017/...` or `<manual_dir>/CellData/OCT/...` also work).
"""


class DatasetLayoutError(ValueError):
    """The manual directory does not have the expected files."""


def find_root(manual_dir: epath.Path) -> epath.Path:
    """Finds the folder holding ``train/`` and ``test/``.

    Args:
      manual_dir: The manual download directory.

    Returns:
      ``manual_dir`` itself, or its ``OCT2017`` or ``CellData/OCT`` sub-folder.

    Raises:
      DatasetLayoutError: None of them has both ``train`` and ``test``.
    """
    for relative in _ROOT_CANDIDATES:
        root = manual_dir / relative if relative else manual_dir
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    tried = ", ".join(str(manual_dir / relative) for relative in _ROOT_CANDIDATES)
    raise DatasetLayoutError(
        f"{manual_dir}: no folder with train/ and test/ sub-folders (tried {tried})."
    )


def list_images(class_dir: epath.Path) -> list[epath.Path]:
    """Lists the JPEG files of one class folder, sorted by name.

    Args:
      class_dir: e.g. ``<root>/test/CNV``.

    Returns:
      The image paths.

    Raises:
      DatasetLayoutError: The folder is missing or holds no JPEG file.
    """
    if not class_dir.is_dir():
        raise DatasetLayoutError(f"{class_dir}: folder not found.")
    images = sorted(
        path for path in class_dir.iterdir() if path.suffix.lower() in _IMAGE_SUFFIXES
    )
    if not images:
        raise DatasetLayoutError(f"{class_dir}: folder holds no .jpeg image.")
    return images


class Oct2017(tfds.core.GeneratorBasedBuilder):
    """OCT2017 retinal scans, ReContrast's one-class split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train = train/NORMAL, test = test/*."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Retinal OCT scans of Kermany et al. (2018), one-class split of "
                "ReContrast: train = train/NORMAL; test = test/* with NORMAL "
                "normal and CNV, DME, DRUSEN abnormal. Original JPEG bytes; "
                "the grey scans decode to 3 equal channels."
            ),
            features=tfds_common.classification_features(),
            supervised_keys=("image", "label"),
            homepage="https://data.mendeley.com/datasets/rscbjbr9sj/3",
            citation="""@article{kermany2018identifying,
  title={Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning},
  author={Kermany, Daniel S. and Goldbaum, Michael and others},
  journal={Cell}, volume={172}, number={5}, pages={1122--1131}, year={2018}}""",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = find_root(epath.Path(dl_manager.manual_dir))
        train = [
            (NORMAL_CLASS, path) for path in list_images(root / "train" / NORMAL_CLASS)
        ]
        test = [
            (name, path)
            for name in CLASSES
            for path in list_images(root / "test" / name)
        ]
        return {
            "train": self._generate_examples(train),
            "test": self._generate_examples(test),
        }

    def _generate_examples(
        self, items: list[tuple[str, epath.Path]]
    ) -> Iterator[tuple[str, dict]]:
        for class_name, path in items:
            yield (
                f"{class_name}/{path.name}",
                {
                    # The bytes are stored as they are: no decoding, no re-encoding.
                    "image": path.read_bytes(),
                    "label": "normal" if class_name == NORMAL_CLASS else "abnormal",
                    "defect_type": class_name,
                    "file_name": path.name,
                },
            )
