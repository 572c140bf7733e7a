"""Helpers shared by the MVTec AD and VisA TensorFlow Datasets builders.

Both builders emit the same features (see :func:`anomaly_features`), read
manually downloaded data, and may have to unpack an archive first. Images are
stored as the source file's bytes, never re-encoded, so decoding a stored image
gives exactly what decoding the original file gives.
"""

from __future__ import annotations

import tarfile
import uuid
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from recontrast_jax.data.folder import DatasetError
from recontrast_jax.pretrained import sha256_of

LABEL_NAMES = ("good", "anomaly")


def classification_features(image_shape=(None, None, 3)) -> tfds.features.FeaturesDict:
    """Features of the image-level (medical, CIFAR-10) builders: no masks."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=image_shape),
            "label": tfds.features.ClassLabel(names=["normal", "abnormal"]),
            "defect_type": tfds.features.Text(),
            "file_name": tfds.features.Text(),
        }
    )


def anomaly_features() -> tfds.features.FeaturesDict:
    """Returns the feature spec shared by the anomaly-detection builders.

    Returns:
      Features ``image`` (RGB, source bytes), ``mask`` (H x W x 1, 0/255),
      ``label`` (good/anomaly), ``defect_type`` and ``file_name``.
    """
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(),
            "mask": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
            "defect_type": tfds.features.Text(),
            "file_name": tfds.features.Text(),
        }
    )


@tfds.decode.make_decoder()
def _decode_image_like_pil(serialized_image, feature):
    """Decodes PNG/JPEG bytes to RGB uint8 exactly as PIL does (see caller)."""
    del feature  # The shape is always (H, W, 3) for the "image" feature.
    import tensorflow as tf  # Imported lazily: TFDS itself imports it lazily.

    def decode_jpeg():
        return tf.io.decode_jpeg(
            serialized_image, channels=3, dct_method="INTEGER_ACCURATE"
        )

    def decode_other():
        return tf.io.decode_image(serialized_image, channels=3, expand_animations=False)

    image = tf.cond(tf.io.is_jpeg(serialized_image), decode_jpeg, decode_other)
    image.set_shape((None, None, 3))
    return image


def pil_exact_decoders() -> dict:
    """Returns ``decoders`` for ``as_dataset`` that decode images exactly like PIL.

    TFDS decodes JPEG with TensorFlow's default ``dct_method`` (INTEGER_FAST),
    which differs from PIL (and so from the PyTorch reference) by a few grey
    levels on VisA's JPEG images. ``INTEGER_ACCURATE`` matches PIL's
    ``Image.open(f).convert('RGB')`` exactly; PNG decoding matches either way.

    Returns:
      ``{"image": decoder}``, to pass as ``builder.as_dataset(..., decoders=...)``
      or ``tfds.load(..., decoders=...)``.
    """
    return {"image": _decode_image_like_pil()}


def image_size(path: epath.PathLike) -> tuple[int, int]:
    """Returns ``(width, height)`` of an image file, reading only its header.

    Args:
      path: Image file.

    Returns:
      The image size as PIL reports it.

    Raises:
      DatasetError: If the file is missing or not a readable image.
    """
    path = epath.Path(path)
    try:
        with path.open("rb") as f, Image.open(f) as image:
            return image.size
    except FileNotFoundError as e:
        raise DatasetError(f"image file {path} does not exist") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def zero_mask(size: tuple[int, int]) -> np.ndarray:
    """Returns an all-zero ``(height, width, 1)`` uint8 mask for ``(width, height)``."""
    width, height = size
    return np.zeros((height, width, 1), dtype=np.uint8)


def check_same_size(image_path: epath.PathLike, mask_path: epath.PathLike) -> None:
    """Raises DatasetError if an image and its mask differ in size.

    Args:
      image_path: Image file.
      mask_path: Its ground-truth mask.

    Raises:
      DatasetError: Naming both files and both sizes on a mismatch.
    """
    image_wh, mask_wh = image_size(image_path), image_size(mask_path)
    if image_wh != mask_wh:
        raise DatasetError(
            f"mask {mask_path} has size {mask_wh} (width, height) but its image "
            f"{image_path} has size {image_wh}"
        )


def verify_sha256(path: epath.PathLike, expected: str) -> None:
    """Raises DatasetError if the sha256 of ``path`` is not ``expected``.

    Args:
      path: File to check.
      expected: Expected hex digest.

    Raises:
      DatasetError: Naming the file and both digests.
    """
    actual = sha256_of(path)
    if actual != expected.lower():
        raise DatasetError(
            f"archive {path} has sha256 {actual}, expected {expected}: the file "
            "is incomplete, corrupt or a different version; download it again"
        )


def extract_archive_once(
    archive: epath.PathLike, destination: epath.PathLike
) -> epath.Path:
    """Extracts a tar (any compression) or zip archive into ``destination`` once.

    Extraction goes to a temporary sibling folder that is renamed at the end, so
    an interrupted extraction never leaves a half-filled ``destination`` that a
    later run would mistake for a complete one.

    Args:
      archive: The ``.tar``/``.tar.xz``/``.tar.gz`` or ``.zip`` file.
      destination: Folder to create; reused as is if it already exists.

    Returns:
      ``destination``.

    Raises:
      DatasetError: If the archive is not a readable tar or zip file.
    """
    archive, destination = epath.Path(archive), epath.Path(destination)
    if destination.exists():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.parent / f"{destination.name}.partial-{uuid.uuid4().hex}"
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                # zipfile drops absolute paths and '..' parts: nothing lands outside.
                zipped.extractall(partial)
        else:
            with tarfile.open(archive, mode="r:*") as tar:
                # The "data" filter refuses absolute paths, links leaving the
                # folder and device files, so an archive cannot write elsewhere.
                tar.extractall(partial, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        if partial.exists():
            partial.rmtree()
        raise DatasetError(
            f"cannot extract archive {archive}: {type(e).__name__}: {e}"
        ) from e
    partial.rename(destination)
    return destination
