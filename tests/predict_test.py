"""Evaluate, predict and export modes on a trained tiny model."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from recontrast_jax import checkpointing, default_config, export, predict, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from recontrast_jax.data import synthetic

    tmp = tmp_path_factory.mktemp("trained")
    data = synthetic.ensure_embedded_dataset(
        tmp / "data", image_size=48, num_train=6, num_test_good=3, num_test_per_defect=1
    )
    config = default_config.get_config()
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.data.root = str(data)
    config.data.categories = ("grass",)
    config.data.image_size = 40
    config.data.crop_size = 32
    config.train.steps = 2
    config.train.batch_size = 4
    config.eval.batch_size = 4
    config.eval.every = 2
    config.report.num_heatmaps = 2
    workdir = str(tmp / "work")
    summary = run.run(config, workdir)
    return config, workdir, summary, data


def mixed_folder(root, data):
    """PNG, JPEG, grayscale and RGBA images of several sizes, in nested folders."""
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.open(data / "grass" / "test" / "hole" / "000.png").save(root / "hole.png")
    Image.open(data / "grass" / "test" / "good" / "000.png").convert("RGB").save(
        root / "sub" / "good.jpg"
    )
    Image.fromarray(rng.integers(0, 255, (30, 50), dtype=np.uint8)).save(
        root / "sub" / "gray.png"
    )
    Image.fromarray(rng.integers(0, 255, (70, 60, 4), dtype=np.uint8)).save(
        root / "sub" / "deeper" / "rgba.png"
    )
    (root / "notes.txt").write_text("not an image")
    return ["hole.png", "sub/deeper/rgba.png", "sub/good.jpg", "sub/gray.png"]


def test_evaluate_mode_reproduces_the_final_metrics(trained):
    config, workdir, summary, _ = trained
    evaluation = run.run(config, workdir, fit=False)
    for key, value in summary["categories"]["grass"].items():
        if not key.endswith(("_seconds", "_per_second")):
            assert evaluation["categories"]["grass"][key] == value, key


def test_evaluate_without_checkpoint_fails_clearly(trained, tmp_path):
    config, *_ = trained
    with pytest.raises(checkpointing.NoCheckpointError, match="train first"):
        run.run(config, str(tmp_path / "empty"), fit=False)


def test_predict_writes_csv_overlays_and_gallery(trained, tmp_path):
    config, workdir, _, data = trained
    expected = mixed_folder(tmp_path / "in", data)
    config = config.copy_and_resolve_references()
    config.predict.input = str(tmp_path / "in")
    (output,) = predict.predict(config, workdir)
    with open(os.path.join(output, "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == expected
    summary = json.load(open(os.path.join(output, "summary.json")))
    threshold = summary["thresholds"]["image"]
    assert "quantile" in summary["thresholds"]["rule"]
    for row in rows:
        score = float(row["score"])
        assert int(row["decision"]) == int(score >= threshold)
        np.testing.assert_allclose(
            float(row["normalized_score"]), min(0.5 * score / threshold, 1.0)
        )
    assert len(os.listdir(os.path.join(output, "heatmaps"))) == len(rows)
    html = open(os.path.join(output, "index.html")).read()
    assert html.count("<img") >= len(rows)


def test_export_scores_equal_predict_scores(trained, tmp_path):
    config, workdir, _, data = trained
    names = mixed_folder(tmp_path / "in", data)
    config = config.copy_and_resolve_references()
    config.predict.input = str(tmp_path / "in")
    config.predict.output = str(tmp_path / "pred")
    predict.predict(config, workdir)
    with open(tmp_path / "pred" / "predictions.csv") as f:
        predicted = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
    config.export.directory = str(tmp_path / "export")
    (directory,) = export.export_categories(config, workdir)
    exported, metadata = export.load_exported(directory)
    assert metadata["thresholds"]["rule"].startswith("0.99 quantile")
    from recontrast_jax.data import folder

    images = np.stack(
        [
            export.preprocess_for_export(folder.load_rgb(tmp_path / "in" / n), 40)
            for n in names
        ]
    )
    _, scores = exported(images)
    np.testing.assert_allclose(scores, [predicted[n] for n in names], atol=1e-5)
