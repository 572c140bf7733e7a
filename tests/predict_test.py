"""Evaluate, predict and export modes on a trained tiny model."""

import contextlib
import csv
import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from recontrast_jax import checkpointing, default_config, export, predict, run
from recontrast_jax.data import folder


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
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        summary = run.run(config, workdir)
    return config, workdir, summary, data, console.getvalue()


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
    config, workdir, summary, *_ = trained
    evaluation = run.run(config, workdir, fit=False)
    for key, value in summary["categories"]["grass"].items():
        if not key.endswith(("_seconds", "_per_second")):
            assert evaluation["categories"]["grass"][key] == value, key


def test_evaluate_without_checkpoint_fails_clearly(trained, tmp_path):
    config, *_ = trained
    with pytest.raises(checkpointing.NoCheckpointError, match="train first"):
        run.run(config, str(tmp_path / "empty"), fit=False)


def test_predict_writes_csv_overlays_and_gallery(trained, tmp_path):
    config, workdir, _, data, _ = trained
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
    config, workdir, _, data, _ = trained
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
    images = np.stack(
        [
            export.preprocess_for_export(folder.load_rgb(tmp_path / "in" / n), 40)
            for n in names
        ]
    )
    _, scores = exported(images)
    np.testing.assert_allclose(scores, [predicted[n] for n in names], atol=1e-5)


def test_training_console_names_the_category_at_every_stage(trained):
    *_, data, console = trained
    text = console.replace("\r", "\n")
    workdir = trained[1]
    assert text.startswith(
        f"recontrast: 1 category of the folder {data} on 1 CPU device; "
        f"results in {workdir}\n"
    )
    assert "grass train" in text and "compiling the train step" in text
    assert "grass held-out normals" in text and "grass test" in text
    assert "the first batch compiles" in text
    assert "grass: image threshold " in text
    # 6 training images hold out 1: the note says the quantile is a fit.
    assert "grass: note: 1 calibration images are too few" in text
    assert "grass: image_auroc=" in text


def test_evaluate_says_what_it_restored(trained, capsys):
    config, workdir, *_ = trained
    run.run(config, workdir, fit=False)
    assert "grass: restored step 2, evaluating" in capsys.readouterr().err


def test_results_md_names_the_data_and_the_flagged_shares(trained):
    config, workdir, summary, data, _ = trained
    text = open(os.path.join(workdir, "results.md")).read()
    assert f"Data: the folder {data}." in text
    assert "backbone resnet_tiny (random init)" in text
    assert "anomalous_flagged" in text and "normal_flagged" in text
    folder_config = config.copy_and_resolve_references()
    folder_config.data.source, folder_config.data.root = "embedded", ""
    assert "Data: the embedded dataset in " in run.results_notes(folder_config)[0]


def test_flagged_shares_count_scores_at_or_above_the_threshold():
    result = evaluate_split_result(
        scores=[0.1, 0.5, 0.9, 0.2, 0.7, 0.5], labels=[0, 0, 0, 1, 1, 1]
    )
    rates = run.flagged_rates(result, 0.5)
    assert rates == {"anomalous_flagged": 2 / 3, "normal_flagged": 2 / 3}
    assert run.flagged_rates(evaluate_split_result([1.0], [0]), 0.5) == {
        "normal_flagged": 1.0
    }


def evaluate_split_result(scores, labels):
    from recontrast_jax import evaluate

    n = len(scores)
    return evaluate.SplitResult(
        maps=np.zeros((n, 2, 2), np.float32), scores=np.asarray(scores),
        masks=np.zeros((n, 2, 2), bool), labels=np.asarray(labels),
        images=np.zeros((n, 2, 2, 3), np.uint8),
    )  # fmt: skip


def test_stale_temporaries_of_a_killed_write_are_removed(trained):
    config, workdir, *_ = trained
    old = time.time() - 3600
    stale = [
        os.path.join(workdir, ".metrics.json.k3j_9x2a.tmp"),
        os.path.join(workdir, "heatmaps", "grass", ".panel.png.ab12cd34.tmp"),
    ]
    fresh = os.path.join(workdir, ".results.md.zz99yy88.tmp")  # a live writer's
    orbax = os.path.join(workdir, "checkpoints", ".state.ab12cd34.tmp")
    unrelated = os.path.join(workdir, "mine.tmp")
    for path in stale + [fresh, orbax, unrelated]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
        if path != fresh:
            os.utime(path, (old, old))
    run.run(config, workdir, fit=False)
    assert not any(os.path.exists(p) for p in stale)
    assert all(os.path.exists(p) for p in (fresh, orbax, unrelated))
    for path in (fresh, orbax, unrelated):
        os.remove(path)


def test_predict_scores_the_readable_images_and_lists_the_others(
    trained, tmp_path, capsys
):
    config, workdir, _, data, _ = trained
    names = mixed_folder(tmp_path / "in", data)
    config = config.copy_and_resolve_references()
    config.predict.input = str(tmp_path / "in")
    config.predict.output = str(tmp_path / "clean")
    predict.predict(config, workdir)
    with open(tmp_path / "clean" / "predictions.csv") as f:
        clean = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
    png = (tmp_path / "in" / "hole.png").read_bytes()
    (tmp_path / "in" / "sub" / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "in" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    config.predict.output = str(tmp_path / "out")
    capsys.readouterr()
    predict.predict(config, workdir)
    err = capsys.readouterr().err
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
    assert sorted(rows) == names
    for name in names:
        np.testing.assert_allclose(rows[name], clean[name], rtol=1e-6)
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert sorted(s["path"] for s in summary["skipped"]) == [
        "garbage.jpg",
        "sub/truncated.png",
    ]
    assert all("cannot read image" in s["error"] for s in summary["skipped"])
    assert err.count("warning: skipping cannot read image") == 2
    assert "grass: 4 images scored" in err and "2 unreadable skipped" in err
    assert "too few" in summary["thresholds"]["note"]
    assert "grass: note: " in err


def test_predict_with_no_readable_image_is_one_error(trained, tmp_path):
    config, workdir, *_ = trained
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"broken")
    config = config.copy_and_resolve_references()
    config.predict.input = str(tmp_path / "in")
    with pytest.raises(folder.DatasetError, match="none of the 1 images"):
        predict.predict(config, workdir)


def test_inference_restores_the_weights_without_the_optimiser_state(trained):
    import jax

    from recontrast_jax import parallel
    from recontrast_jax.methods import recontrast

    config, workdir, *_ = trained
    mesh = parallel.make_mesh()
    ckpt = checkpointing.existing_manager(recontrast.checkpoint_dir(workdir, "grass"))
    full = checkpointing.restore(ckpt, recontrast.fresh_state(config, mesh, ""))
    state = recontrast.restore(config, workdir, "grass", mesh)
    assert state.opt_state is None and int(state.step) == int(full.step) == 2
    assert jax.tree.leaves(full.opt_state)  # it was saved, and is not read
    for name in ("params", "batch_stats", "frozen"):
        expected, actual = getattr(full, name), getattr(state, name)
        assert jax.tree.structure(expected) == jax.tree.structure(actual)
        for e, a in zip(
            jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
