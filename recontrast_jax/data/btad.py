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

import tensorflow_datasets as tfds
from etils import epath

from recontrast_jax.data import categories, mvtec_ad, tfds_common

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


class Btad(mvtec_ad.MvtecAd):
    """BTAD, one config per product: MVTec AD's builder on BTAD's folders."""

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

    def _dataset_root(self, dl_manager: tfds.download.DownloadManager, category: str):
        return find_dataset_root(
            dl_manager.manual_dir, category, dl_manager.download_dir / "extracted"
        )


def find_dataset_root(
    manual_dir: epath.PathLike, product: str, extract_root: epath.PathLike
) -> epath.Path:
    """The folder holding ``<product>/``, extracting the zip once if needed."""
    return mvtec_ad.find_category_root(
        manual_dir, product, extract_root, _FOLDER_NAME, ARCHIVE_NAME,
        archive_sha256=None, what="BTAD product",
    )  # fmt: skip
