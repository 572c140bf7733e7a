"""TensorFlow Datasets builder for BTAD, the beanTech Anomaly Detection dataset.

Importing this module registers the builder, after which
``tfds.builder('btad/01', data_dir=...)`` works. One config per product (`01`,
`02`, `03`); splits ``train`` (normal images only) and ``test``.

BTAD's layout is MVTec's with other folder names: ``<product>/train/ok``,
``test/ok`` (normal), ``test/ko`` (anomalous) and ``ground_truth/ko`` (one
mask per anomalous image, same stem, PNG). Products 01 and 03 are BMP images
(1600x1600 and 800x600), product 02 PNG (600x600). The folder reader
(`folder.scan_category`) reads the same layout directly.

The manual directory may hold the extracted products
(``<manual_dir>/<product>/...`` or ``<manual_dir>/BTech_Dataset_transformed/
<product>/...``) or the distributed ``BTech_Dataset_transformed.zip``, which is
extracted once into ``<download_dir>/extracted/``. No checksum of the zip is
published, so none is checked.
"""

from __future__ import annotations

import uuid
import zipfile

import tensorflow_datasets as tfds
from etils import epath

from recontrast_jax.data import categories, folder, mvtec_ad, tfds_common
from recontrast_jax.data.folder import DatasetError

PRODUCTS = categories.BTAD_PRODUCTS
ARCHIVE_NAME = "BTech_Dataset_transformed.zip"
_FOLDER_NAME = "BTech_Dataset_transformed"

_DESCRIPTION = """\
BTAD (beanTech Anomaly Detection): 2830 real-world images of three industrial
products, defect-free training images and a test set of normal and defective
images with pixel-level masks. Licence: CC BY-SA 4.0.

Images are stored as the original BMP/PNG bytes; `mask` is 0/255 and all zero
for normal images; `defect_type` is `ok` or `ko`.
"""

_CITATION = """\
@inproceedings{mishra2021vt,
  title={VT-ADL: A Vision Transformer Network for Image Anomaly Detection and
         Localization},
  author={Mishra, Pankaj and Verk, Riccardo and Fornasier, Daniele and
          Piciarelli, Claudio and Foresti, Gian Luca},
  booktitle={ISIE},
  year={2021}
}
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
BTAD must be downloaded by hand:

1. Download `{ARCHIVE_NAME}` from the dataset's page (linked from the VT-ADL
   paper; licence CC BY-SA 4.0).
2. Put into the manual directory (default `<data_dir>/downloads/manual/`, or
   `tfds build --manual_dir DIR`) either the zip itself,
   `<manual_dir>/{ARCHIVE_NAME}` (extracted once under
   `<data_dir>/downloads/extracted/`), or the extracted products:
   `<manual_dir>/<product>/train/ok/*` or
   `<manual_dir>/{_FOLDER_NAME}/<product>/train/ok/*`.
"""


class Btad(tfds.core.GeneratorBasedBuilder):
    """BTAD, one config per product."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=p, description=f"BTAD product {p}.")
        for p in PRODUCTS
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds_common.anomaly_features(),
            supervised_keys=("image", "label"),
            homepage="https://github.com/pankajmishra000/VT-ADL",
            citation=_CITATION,
            license="CC BY-SA 4.0",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        product = self.builder_config.name
        root = find_dataset_root(
            dl_manager.manual_dir, product, dl_manager.download_dir / "extracted"
        )
        files = folder.scan_category(root, product)
        product_dir = epath.Path(root) / product
        return {
            "train": self._generate_examples(files.train, product_dir),
            "test": self._generate_examples(files.test, product_dir),
        }

    def _generate_examples(self, samples, product_dir: epath.Path):
        for sample in samples:
            file_name = epath.Path(sample.path).relative_to(product_dir).as_posix()
            yield file_name, mvtec_ad.example_from_sample(sample, file_name)


def find_dataset_root(
    manual_dir: epath.PathLike, product: str, extract_root: epath.PathLike
) -> epath.Path:
    """The folder holding ``<product>/``, extracting the zip once if needed.

    Raises:
      DatasetError: naming the places searched when neither the product folder
        nor the zip is there, or when the zip cannot be read.
    """
    manual_dir = epath.Path(manual_dir)
    candidates = [manual_dir, manual_dir / _FOLDER_NAME]
    for candidate in candidates:
        if (candidate / product).is_dir():
            return candidate
    archive = manual_dir / ARCHIVE_NAME
    if not archive.is_file():
        tried = ", ".join(str(c / product) for c in candidates)
        raise DatasetError(
            f"BTAD product {product!r} not found: none of {tried} is a folder "
            f"and there is no archive {archive}"
        )
    extracted = extract_zip_once(archive, epath.Path(extract_root) / _FOLDER_NAME)
    for candidate in (extracted, extracted / _FOLDER_NAME):
        if (candidate / product).is_dir():
            return candidate
    raise DatasetError(f"archive {archive} holds no folder {product!r}")


def extract_zip_once(archive: epath.Path, destination: epath.Path) -> epath.Path:
    """Extracts a zip into ``destination`` once, via a renamed temporary folder."""
    if destination.exists():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.parent / f"{destination.name}.partial-{uuid.uuid4().hex}"
    try:
        with zipfile.ZipFile(archive) as zipped:
            # zipfile drops absolute paths and '..' parts: nothing lands outside.
            zipped.extractall(partial)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        if partial.exists():
            partial.rmtree()
        raise DatasetError(
            f"cannot extract archive {archive}: {type(e).__name__}: {e}"
        ) from e
    partial.rename(destination)
    return destination
