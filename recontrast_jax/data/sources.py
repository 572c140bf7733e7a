"""Every dataset source as the same `CategoryFiles`: the one input to the pipelines.

Sources (`config.data.source`):
  - 'embedded': the generated default dataset (MVTec layout, see `synthetic.py`);
  - 'folder': any MVTec-layout folder (`folder.scan_category`);
  - 'medical_folder': a `train/NORMAL`, `test/<CLASS>` folder (APTOS, ISIC2018,
    OCT2017 as the ReContrast preparation scripts write them);
  - 'tfds': a TFDS builder of this package (`mvtec_ad`, `visa`, `btad`, `aptos2019`,
    `oct2017`, `isic2018`, `cifar10_one_class`), prepared on first use from
    `config.data.tfds_manual_dir`. Its encoded images are kept in memory and
    decoded by the same PIL code as files, so every source is preprocessed alike.
"""

from __future__ import annotations

import functools
import importlib
import os

import ml_collections

from recontrast_jax import console
from recontrast_jax.data import folder, synthetic

SOURCES = ("embedded", "folder", "medical_folder", "tfds")

# Module that registers each TFDS builder of this package.
TFDS_MODULES = {
    "mvtec_ad": "recontrast_jax.data.mvtec_ad",
    "visa": "recontrast_jax.data.visa",
    "btad": "recontrast_jax.data.btad",
    "aptos2019": "recontrast_jax.data.aptos",
    "oct2017": "recontrast_jax.data.oct2017",
    "isic2018": "recontrast_jax.data.isic2018",
    "cifar10_one_class": "recontrast_jax.data.cifar10_one_class",
}


def category_names(config: ml_collections.ConfigDict) -> list[str]:
    """The categories to run: the config's list, else every one the source has."""
    names = category_list(config.data.categories)
    if names:
        return names
    source = config.data.source
    if source == "embedded":
        return list(synthetic.CATEGORIES)
    if source == "folder":
        return folder.list_categories(_root(config))
    if source == "medical_folder":
        return [os.path.basename(os.path.normpath(_root(config)))]
    if source == "tfds":
        raise folder.DatasetError(
            "config.data.categories must name the TFDS builder configs to run "
            "(e.g. 'bottle' for mvtec_ad/bottle; any name for builders without configs)."
        )
    raise _unknown_source(source)


def category_list(value) -> list[str]:
    """Categories from a tuple or a comma-separated command-line string."""
    items = [value] if isinstance(value, str) else list(value)
    return [name.strip() for item in items for name in item.split(",") if name.strip()]


def category_files(
    config: ml_collections.ConfigDict, category: str
) -> folder.CategoryFiles:
    """The training and test samples of `category` from the configured source."""
    source = config.data.source
    if source == "embedded":
        root = synthetic.ensure_embedded_dataset(config.data.root or None)
        say_once(f"embedded dataset: {root}")
        return folder.scan_category(root, category)
    if source == "folder":
        return folder.scan_category(_root(config), category)
    if source == "medical_folder":
        return folder.scan_classification_folder(_root(config), category)
    if source == "tfds":
        return tfds_category_files(
            config.data.tfds_name,
            category,
            config.data.tfds_data_dir or None,
            config.data.tfds_manual_dir or None,
        )
    raise _unknown_source(source)


@functools.cache
def say_once(message: str) -> None:
    """A console line shown once per process, however often it is reached."""
    console.say(message)


def data_description(config: ml_collections.ConfigDict) -> str:
    """Where the run's images come from, in words (results.md, the console)."""
    data = config.data
    if data.source == "embedded":
        return f"the embedded dataset in {data.root or synthetic.default_cache_dir()}"
    if data.source == "tfds":
        return f"the TFDS builder {data.tfds_name}"
    return f"the {data.source.replace('_', ' ')} {data.root}"


def _root(config: ml_collections.ConfigDict) -> str:
    if not config.data.root:
        raise folder.DatasetError(
            f"config.data.root is empty: set it to the dataset folder for source "
            f"{config.data.source!r}, e.g. --config.data.root=/data/mvtec_anomaly_detection"
        )
    return config.data.root


def _unknown_source(source: str) -> ValueError:
    return ValueError(f"Unknown config.data.source {source!r}; use one of {SOURCES}.")


def tfds_category_files(
    name: str, category: str, data_dir: str | None, manual_dir: str | None
) -> folder.CategoryFiles:
    """Reads a TFDS split pair (train/test) into in-memory samples.

    Prepares the dataset first when needed, from `manual_dir` (the builders
    need a manual download; their instructions say what to put there).
    """
    import tensorflow_datasets as tfds

    if name not in TFDS_MODULES:
        raise folder.DatasetError(
            f"Unknown TFDS dataset {name!r}; known: {sorted(TFDS_MODULES)}"
        )
    importlib.import_module(TFDS_MODULES[name])
    # Builders without configs (the medical sets) ignore the category name.
    has_configs = bool(tfds.builder_cls(name).BUILDER_CONFIGS)
    full_name = f"{name}/{category}" if has_configs else name
    builder = tfds.builder(full_name, data_dir=data_dir)
    if not builder.is_prepared():
        _prepare(builder, full_name, manual_dir)
    return folder.CategoryFiles(
        root=f"tfds:{full_name}",
        category=category or name,
        train=tuple(_tfds_samples(builder, full_name, "train")),
        test=tuple(_tfds_samples(builder, full_name, "test")),
    )


def _prepare(builder, full_name: str, manual_dir: str | None) -> None:
    import tensorflow_datasets as tfds

    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=config)
    except AssertionError as e:  # TFDS's way of saying the manual dir is missing
        raise folder.DatasetError(
            f"TFDS dataset {full_name} is not prepared and cannot be built: set "
            f"config.data.tfds_manual_dir to the downloaded files.\n{e}"
        ) from e


def _tfds_samples(builder, full_name: str, split: str):
    import tensorflow_datasets as tfds

    features = builder.info.features
    decoders = {
        k: tfds.decode.SkipDecoding() for k in ("image", "mask") if k in features
    }
    dataset = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    for example in dataset.as_numpy_iterator():
        label = int(example["label"])
        file_name = example["file_name"].decode()
        yield folder.Sample(
            path=f"tfds:{full_name}:{file_name}",
            mask_path=None,
            label=label,
            defect_type=example["defect_type"].decode(),
            image_bytes=bytes(example["image"]),
            # Good images have all-zero masks: nothing to decode.
            mask_bytes=bytes(example["mask"]) if label and "mask" in example else None,
        )
