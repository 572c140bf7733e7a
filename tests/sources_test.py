"""Dataset sources: medical folders, in-memory samples, the medical end-to-end run."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from recontrast_jax import default_config, run
from recontrast_jax.data import folder, input_pipeline, sources


def write_image(path, seed, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def medical_folder(root, classes=("NORMAL", "ABNORMAL"), train=6, test_per_class=3):
    seed = 0
    for i in range(train):
        write_image(root / "train" / "NORMAL" / f"n{i:02d}.png", seed := seed + 1)
    for c in classes:
        for i in range(test_per_class):
            write_image(root / "test" / c / f"{c.lower()}{i}.jpeg", seed := seed + 1)
    return root


def test_medical_folder_labels_every_non_normal_class_anomalous(tmp_path):
    root = medical_folder(tmp_path / "OCT2017", ("CNV", "DME", "DRUSEN", "NORMAL"))
    files = folder.scan_classification_folder(root, "oct2017")
    assert len(files.train) == 6 and all(s.label == 0 for s in files.train)
    assert [s.defect_type for s in files.test[:3]] == ["NORMAL"] * 3  # normal first
    assert {s.defect_type: s.label for s in files.test} == {
        "NORMAL": 0, "CNV": 1, "DME": 1, "DRUSEN": 1
    }  # fmt: skip
    assert not any(s.has_mask for s in files.test)


def test_medical_folder_errors_name_the_folder(tmp_path):
    root = tmp_path / "APTOS"
    (root / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(folder.DatasetError, match=str(root / "train" / "NORMAL")):
        folder.scan_classification_folder(root, "aptos")
    write_image(root / "train" / "NORMAL" / "a.png", 1)
    with pytest.raises(folder.DatasetError, match=str(root / "test")):
        folder.scan_classification_folder(root, "aptos")


def test_eval_labels_come_from_masks_or_from_mask_less_samples(tmp_path):
    root = medical_folder(tmp_path / "med", train=1, test_per_class=2)
    files = folder.scan_classification_folder(root, "med")
    ds = input_pipeline.eval_dataset(
        files.test, batch_size=4, image_size=16, crop_size=16
    )
    (batch,) = list(input_pipeline.iterate_numpy(ds))
    np.testing.assert_array_equal(batch["label"], [s.label for s in files.test])
    assert not batch["mask"].any()


def test_samples_held_as_bytes_load_like_files(tmp_path):
    root = medical_folder(tmp_path / "med", train=3, test_per_class=2)
    files = folder.scan_classification_folder(root, "med")
    in_memory = [
        folder.Sample(
            f"mem:{i}",
            None,
            s.label,
            s.defect_type,
            image_bytes=open(s.path, "rb").read(),
        )
        for i, s in enumerate(files.test)
    ]
    from_files = input_pipeline.iterate_numpy(
        input_pipeline.eval_dataset(
            files.test, batch_size=4, image_size=20, crop_size=16
        )
    )
    from_bytes = input_pipeline.iterate_numpy(
        input_pipeline.eval_dataset(
            in_memory, batch_size=4, image_size=20, crop_size=16
        )
    )
    for a, b in zip(from_files, from_bytes, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_category_names_per_source(tmp_path):
    config = default_config.get_config()
    config.data.source = "medical_folder"
    config.data.root = str(tmp_path / "ISIC2018")
    assert sources.category_names(config) == ["ISIC2018"]
    config.data.source = "embedded"
    assert sources.category_names(config) == ["brick", "grass", "gravel"]
    config.data.source = "nope"
    with pytest.raises(ValueError, match="nope"):
        sources.category_names(config)


def test_medical_end_to_end_reports_image_metrics(tmp_path):
    root = medical_folder(tmp_path / "APTOS", train=6, test_per_class=3)
    config = default_config.medical_config("aptos")
    config.data.root = str(root)
    config.data.image_size = config.data.crop_size = 32
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.train.steps = 2
    config.train.batch_size = 4
    config.eval.batch_size = 4
    config.eval.every = 2
    config.report.num_heatmaps = 2
    workdir = tmp_path / "work"
    run.run(config, str(workdir))
    metrics = json.loads((workdir / "metrics.json").read_text())["categories"]["aptos"]
    assert {"image_auroc", "f1", "accuracy", "threshold"} <= set(metrics)
    assert "pixel_auroc" not in metrics and "aupro" not in metrics
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    table = (workdir / "results.md").read_text()
    assert "| aptos |" in table and "accuracy" in table


def test_tfds_source_feeds_the_pipeline_like_the_folder(tmp_path):
    from mvtec_ad_test import make_fake_mvtec

    root = tmp_path / "manual" / "mvtec_anomaly_detection"
    make_fake_mvtec(root)
    config = default_config.get_config()
    config.data.source = "tfds"
    config.data.tfds_name = "mvtec_ad"
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    config.data.tfds_manual_dir = str(tmp_path / "manual")
    from_tfds = sources.category_files(config, "bottle")  # prepares on first use
    from_folder = folder.scan_category(root, "bottle")
    assert len(from_tfds.train) == len(from_folder.train)

    def batches(samples):
        ds = input_pipeline.eval_dataset(
            samples, batch_size=8, image_size=20, crop_size=16
        )
        (batch,) = list(input_pipeline.iterate_numpy(ds))
        order = np.argsort([s.defect_type + os.path.basename(s.path) for s in samples])
        valid = batch["valid"]
        return {
            k: v[valid][order] for k, v in batch.items() if k not in ("valid", "index")
        }

    a, b = batches(from_tfds.test), batches(from_folder.test)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["label"].sum() > 0 and a["mask"].any()
