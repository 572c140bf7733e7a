"""BTAD: the folder reader, the TFDS builder and the configs, on a generated tree.

The tree has BTAD's layout (`<product>/train/ok`, `test/ok`, `test/ko`,
`ground_truth/ko`), BMP images for products 01 and 03 and PNG for 02, in
three image shapes (small stand-ins for 1600x1600, 600x600 and 800x600). No
image is committed. Oracles: the files written here, their bytes, PIL.
"""

import importlib.util
import json
import os
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from recontrast_jax import run
from recontrast_jax.data import btad, folder
from recontrast_jax.data.folder import DatasetError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
# product -> (extension, (width, height))
LAYOUT = {"01": (".bmp", (40, 40)), "02": (".png", (30, 30)), "03": (".bmp", (40, 30))}
COUNTS = {"train/ok": 5, "test/ok": 2, "test/ko": 3}


def make_fake_btad(root):
    rng = np.random.default_rng(0)
    for product, (ext, (width, height)) in LAYOUT.items():
        base = root / product
        for split, count in COUNTS.items():
            (base / split).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(base / split / f"{i:04d}{ext}")
                if split == "test/ko":
                    (base / "ground_truth/ko").mkdir(parents=True, exist_ok=True)
                    mask = np.zeros((height, width), np.uint8)
                    mask[5 + i : 15 + i, 8:20] = 255
                    Image.fromarray(mask).save(
                        base / "ground_truth/ko" / f"{i:04d}.png"
                    )
    return root


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return make_fake_btad(tmp_path_factory.mktemp("btad"))


def test_folder_reader_reads_the_btad_layout(fake_root):
    assert folder.list_categories(fake_root) == ["01", "02", "03"]
    for product, (ext, _) in LAYOUT.items():
        files = folder.scan_category(fake_root, product)
        base = fake_root / product
        assert [s.path for s in files.train] == [
            str(base / "train/ok" / f"{i:04d}{ext}") for i in range(5)
        ]
        assert [(s.defect_type, s.label) for s in files.test] == [("ok", 0)] * 2 + [
            ("ko", 1)
        ] * 3
        assert [s.mask_path for s in files.test] == [None, None] + [
            str(base / "ground_truth/ko" / f"{i:04d}.png") for i in range(3)
        ]


def build(product, manual_dir, data_dir):
    builder = tfds.builder(f"btad/{product}", data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


@pytest.mark.parametrize("product", ["01", "02"])
def test_builder_stores_the_source_files(fake_root, tmp_path, product):
    builder = build(product, fake_root, tmp_path)
    decoders = {"image": tfds.decode.SkipDecoding()}
    base = fake_root / product
    for split, expected in (("train", 5), ("test", 5)):
        examples = list(
            builder.as_dataset(split=split, decoders=decoders).as_numpy_iterator()
        )
        assert len(examples) == expected
        for example in examples:
            name = example["file_name"].decode()
            assert example["image"] == (base / name).read_bytes()
            defect = example["defect_type"].decode()
            assert int(example["label"]) == int(defect == "ko")
            mask = example["mask"][..., 0]
            if defect == "ko":
                stem = os.path.splitext(os.path.basename(name))[0]
                truth = np.asarray(Image.open(base / "ground_truth/ko" / f"{stem}.png"))
                np.testing.assert_array_equal(mask, truth)
            else:
                assert not mask.any()


def test_builder_extracts_the_zip(fake_root, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / btad.ARCHIVE_NAME, "w") as zipped:
        for path in sorted((fake_root / "03").rglob("*")):
            if path.is_file():
                arcname = f"BTech_Dataset_transformed/{path.relative_to(fake_root)}"
                zipped.write(path, arcname)
    builder = build("03", manual, tmp_path / "data")
    assert builder.info.splits["test"].num_examples == 5


def test_missing_product_names_the_places_searched(tmp_path):
    with pytest.raises(DatasetError, match="BTAD product '02' not found"):
        btad.find_dataset_root(tmp_path, "02", tmp_path / "extracted")


def load_config(name, product):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(CONFIGS, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(product)


def shrink(config, root):
    config.data.root = str(root)
    config.data.image_size, config.data.crop_size = 36, 32
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.eval.batch_size = 4
    config.patchcore.pretrain_dim = config.patchcore.target_dim = 32
    config.reconpatch.feature_dim, config.reconpatch.projection_dim = 16, 8
    config.reconpatch.epochs, config.reconpatch.batch_size = 2, 32
    config.report.num_heatmaps = 0
    return config


@pytest.mark.parametrize("name", ["patchcore_btad", "reconpatch_btad"])
def test_btad_configs_run_end_to_end(fake_root, tmp_path, name):
    config = shrink(load_config(name, "03"), fake_root)
    assert (
        config.data.resize == "shorter_side" and config.data.mask_rule == "exactly_one"
    )
    if name == "reconpatch_btad":  # through the TFDS builder
        config.data.source = "tfds"
        config.data.tfds_manual_dir = str(fake_root)
        config.data.tfds_data_dir = str(tmp_path / "tfds")
    run.run(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.json") as f:
        metrics = json.load(f)["categories"]["03"]
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    with pytest.raises(ValueError, match="'04'"):
        load_config(name, "04")
