"""TensorFlow Datasets builder for MVTec AD (manual download).

Importing this module registers the builder, after which
``tfds.builder('mvtec_ad/bottle', data_dir=...)`` works. One config per
category; splits ``train`` (good images only) and ``test``.

The manual directory may hold the extracted dataset
(``<manual_dir>/<category>/...`` or
``<manual_dir>/mvtec_anomaly_detection/<category>/...``) or the original
``mvtec_anomaly_detection.tar.xz``. The archive's sha256 is checked and it is
extracted once into ``<download_dir>/extracted/``.
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from etils import epath

from recontrast_jax.data import categories, folder, tfds_common
from recontrast_jax.data.folder import DatasetError

CATEGORIES = categories.MVTEC_CATEGORIES
ARCHIVE_NAME = "mvtec_anomaly_detection.tar.xz"
# From anomalib's DOWNLOAD_INFO for the official archive.
ARCHIVE_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
_FOLDER_NAME = "mvtec_anomaly_detection"

_DESCRIPTION = """\
MVTec AD: 5354 high-resolution images of 15 object and texture categories for
unsupervised anomaly detection. The training split holds defect-free images
only; the test split holds defect-free images and images with more than 70
kinds of defects, with pixel-precise ground-truth masks. Licence: CC BY-NC-SA
4.0 (non-commercial use only).

Images are stored as the original PNG bytes (grid, screw and zipper are
grayscale and decode to three equal channels). `mask` is 0/255 and all zero for
defect-free images.
"""

_CITATION = """\
@article{bergmann2021mvtec,
  title={The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset
         for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Batzner, Kilian and Fauser, Michael and
          Sattlegger, David and Steger, Carsten},
  journal={International Journal of Computer Vision},
  volume={129},
  number={4},
  pages={1038--1059},
  year={2021}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
MVTec AD must be downloaded by hand:

1. Go to https://www.mvtec.com/company/research/datasets/mvtec-ad , accept the
   licence (CC BY-NC-SA 4.0, non-commercial use only) and download
   `{ARCHIVE_NAME}` (about 4.9 GB).
2. Put into the manual directory (default `<data_dir>/downloads/manual/`, or
   `tfds build --manual_dir DIR`) either
   * the archive itself: `<manual_dir>/{ARCHIVE_NAME}`
     (its sha256 must be {ARCHIVE_SHA256}; it is checked, then extracted once
     under `<data_dir>/downloads/extracted/`), or
   * the extracted folders: `<manual_dir>/<category>/train/good/*.png` or
     `<manual_dir>/{_FOLDER_NAME}/<category>/train/good/*.png`.
"""


class MvtecAd(tfds.core.GeneratorBasedBuilder):
    """MVTec AD, one config per category."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=c, description=f"MVTec AD category {c}.")
        for c in CATEGORIES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds_common.anomaly_features(),
            supervised_keys=("image", "label"),
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
            citation=_CITATION,
            license="CC BY-NC-SA 4.0",
        )

    def _dataset_root(self, dl_manager: tfds.download.DownloadManager, category: str):
        """The folder holding ``<category>/`` (subclasses: other archives)."""
        return find_dataset_root(
            dl_manager.manual_dir, category, dl_manager.download_dir / "extracted"
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        category = self.builder_config.name
        root = self._dataset_root(dl_manager, category)
        files = folder.scan_category(root, category)
        category_dir = epath.Path(root) / category
        return {
            "train": self._generate_examples(files.train, category_dir),
            "test": self._generate_examples(files.test, category_dir),
        }

    def _generate_examples(self, samples, category_dir: epath.Path):
        for sample in samples:
            file_name = epath.Path(sample.path).relative_to(category_dir).as_posix()
            yield file_name, example_from_sample(sample, file_name)


def example_from_sample(sample: folder.Sample, file_name: str) -> dict:
    """Builds one example; image and mask files are passed as paths, not decoded."""
    if sample.mask_path is None:
        mask = tfds_common.zero_mask(tfds_common.image_size(sample.path))
    else:
        tfds_common.check_same_size(sample.path, sample.mask_path)
        mask = epath.Path(sample.mask_path)
    return {
        "image": epath.Path(sample.path),
        "mask": mask,
        "label": sample.label,
        "defect_type": sample.defect_type,
        "file_name": file_name,
    }


def _root_holding(candidates: list[epath.Path], category: str) -> epath.Path | None:
    """Returns the first candidate that has a ``<category>`` sub-folder."""
    for candidate in candidates:
        if (candidate / category).is_dir():
            return candidate
    return None


def find_dataset_root(
    manual_dir: epath.PathLike, category: str, extract_root: epath.PathLike
) -> epath.Path:
    """MVTec AD's `find_category_root`: its folder, archive and checked sha256."""
    return find_category_root(
        manual_dir, category, extract_root, _FOLDER_NAME, ARCHIVE_NAME,
        ARCHIVE_SHA256, "MVTec AD category",
    )  # fmt: skip


def find_category_root(
    manual_dir: epath.PathLike,
    category: str,
    extract_root: epath.PathLike,
    folder_name: str,
    archive_name: str,
    archive_sha256: str | None,
    what: str,
) -> epath.Path:
    """Finds (extracting the archive if needed) the folder holding ``<category>/``.

    Args:
      manual_dir: The manual download directory.
      category: The category (or product) name.
      extract_root: Where the archive is extracted if no extracted copy exists.
      folder_name: The dataset's top folder, inside the manual dir or archive.
      archive_name: The distributed archive (tar or zip).
      archive_sha256: Its published digest, checked before extracting (None:
        none is published).
      what: Names the category in errors.

    Returns:
      A folder whose ``<category>`` sub-folder is the category.

    Raises:
      DatasetError: If neither an extracted copy of the category nor the archive
        is found (naming the places searched), or the archive's sha256 is wrong.
    """
    manual_dir = epath.Path(manual_dir)
    candidates = [manual_dir, manual_dir / folder_name]
    root = _root_holding(candidates, category)
    if root is not None:
        return root
    archive = manual_dir / archive_name
    if not archive.is_file():
        tried = ", ".join(str(c / category) for c in candidates)
        raise DatasetError(
            f"{what} {category!r} not found: none of {tried} is a "
            f"folder and there is no archive {archive}"
        )
    extracted = epath.Path(extract_root) / folder_name
    if not extracted.exists():
        if archive_sha256 is not None:
            tfds_common.verify_sha256(archive, archive_sha256)
        tfds_common.extract_archive_once(archive, extracted)
    candidates = [extracted, extracted / folder_name]
    root = _root_holding(candidates, category)
    if root is None:
        raise DatasetError(
            f"archive {archive} (extracted to {extracted}) holds no folder {category!r}"
        )
    return root
