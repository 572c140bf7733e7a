"""Memory-bank methods: kNN scores against brute force, end to end, all modes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from recontrast_jax import (
    checkpointing,
    default_config,
    evaluate,
    export,
    parallel,
    predict,
    run,
)
from recontrast_jax.data import folder, input_pipeline
from recontrast_jax.methods import patchcore


def tiny_config(root, method="patchcore"):
    config = default_config.get_config()
    config.method = method
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.data.root = str(root)
    config.data.categories = ("brick",)
    config.data.image_size = config.data.crop_size = 32
    config.eval.batch_size = 4
    config.patchcore.pretrain_dim = 48
    config.patchcore.target_dim = 40
    config.patchcore.coreset_ratio = 0.25
    config.reconpatch.feature_dim = 24
    config.reconpatch.projection_dim = 8
    config.reconpatch.epochs = 3
    config.reconpatch.batch_size = 32
    config.reconpatch.lr = 1e-3
    config.checkpoint.every = 2
    config.report.num_heatmaps = 2
    return config


def frozen_features(model, samples, settings):
    dataset = input_pipeline.eval_dataset(
        samples, batch_size=4, image_size=32, crop_size=32
    )
    out = [
        np.asarray(
            patchcore.frozen_patch_features(model["encoder"], b["image"], settings)
        )[b["valid"]]
        for b in input_pipeline.iterate_numpy(dataset)
    ]
    return np.concatenate(out)


@pytest.mark.parametrize("with_head", [False, True])
def test_scores_equal_brute_force_nearest_neighbours(tiny_dataset, with_head):
    config = tiny_config(tiny_dataset)
    files = folder.scan_category(tiny_dataset, "brick")
    settings = patchcore.feature_settings(config, "resnet_tiny")
    model = {
        "encoder": patchcore.encoder_variables(config, "resnet_tiny", jax.random.key(0))
    }
    rng = np.random.default_rng(0)
    head = {"f": {"kernel": rng.normal(size=(40, 24)).astype(np.float32),
                  "bias": rng.normal(size=24).astype(np.float32)}}  # fmt: skip
    project = (
        (lambda p: p @ head["f"]["kernel"] + head["f"]["bias"])
        if with_head
        else (lambda p: p)
    )
    train_features = project(frozen_features(model, files.train, settings))
    bank = train_features.reshape(-1, train_features.shape[-1])[::3]
    model.update(bank=jnp.asarray(bank), head=head if with_head else {})
    mesh = parallel.make_mesh()
    result = evaluate.evaluate_split(
        patchcore.compile_predict(config, mesh),
        parallel.replicate(mesh, [model]),
        files.test,
        config,
        mesh,
    )
    test = project(frozen_features(model, files.test, settings))
    expected = np.stack([cdist(t, bank).min(axis=1).max() for t in test])
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-4)
    assert result.maps.shape == (len(files.test), 32, 32)


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """One ReConPatch run on the tiny dataset, shared by the mode tests."""
    from recontrast_jax.data import synthetic

    root = tmp_path_factory.mktemp("data")
    data = synthetic.ensure_embedded_dataset(
        root, image_size=48, num_train=6, num_test_good=3, num_test_per_defect=1
    )
    config = tiny_config(data, method="reconpatch")
    workdir = tmp_path_factory.mktemp("work")
    summary = run.run(config, str(workdir))
    return config, workdir, summary["categories"]["brick"]


def test_reconpatch_end_to_end_checkpoint_holds_bank(fitted_run):
    config, workdir, metrics = fitted_run
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["aupro"] <= 1.0
    # 5 training images (one of 6 held out) x a 4x4 grid of layer2 patches.
    assert metrics["train_patches"] == 5 * 16
    # 80 patches, batch 32: 2 steps per epoch, 3 epochs.
    assert metrics["train_steps"] == 6
    ckpt = checkpointing.manager(str(workdir / "checkpoints" / "brick"))
    model = checkpointing.restore_as_saved(ckpt)["model"]
    assert model["bank"].shape == (int(80 * 0.25), 24)
    assert model["head"]["f"]["kernel"].shape == (40, 24)
    assert (workdir / "heatmaps" / "brick" / "index.html").exists()
    assert (workdir / "calibration" / "brick.json").exists()


def test_evaluate_mode_reproduces_the_training_run(fitted_run):
    config, workdir, metrics = fitted_run
    again = run.run(config, str(workdir), fit=False)["categories"]["brick"]
    for name in ("image_auroc", "pixel_auroc", "aupro"):
        assert again[name] == metrics[name]


def test_rerun_restores_instead_of_refitting(fitted_run):
    config, workdir, metrics = fitted_run
    again = run.run(config, str(workdir))["categories"]["brick"]
    assert again["restored"] == 1.0 and again["image_auroc"] == metrics["image_auroc"]


def test_predict_and_export_agree_with_evaluation(fitted_run, tmp_path):
    config, workdir, _ = fitted_run
    config = config.copy_and_resolve_references()
    good = [s for s in folder.scan_category(config.data.root, "brick").test
            if s.label == 0]  # fmt: skip
    (tmp_path / "in").mkdir()
    for i, sample in enumerate(good):
        (tmp_path / "in" / f"{i}.png").write_bytes(open(sample.path, "rb").read())
    config.predict.input = str(tmp_path / "in")
    output = predict.predict(config, str(workdir))[0]
    rows = open(output + "/predictions.csv").read().splitlines()[1:]
    scored = predict.score_samples(config, str(workdir), "brick", good)
    csv_scores = [float(r.split(",")[1]) for r in sorted(rows)]
    np.testing.assert_allclose(csv_scores, scored.scores, rtol=1e-6)

    config.export.directory = str(tmp_path / "export")
    export.export_categories(config, str(workdir))
    exported, metadata = export.load_exported(config.export.directory)
    assert metadata["method"] == "reconpatch"
    images = np.stack(
        [export.preprocess_for_export(folder.load_rgb(s.path), 32) for s in good]
    )
    maps, scores = exported(images)
    np.testing.assert_allclose(scores, scored.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps, scored.maps, rtol=1e-5, atol=1e-5)


def test_patchcore_end_to_end(tmp_path, tiny_dataset):
    config = tiny_config(tiny_dataset)
    workdir = tmp_path / "work"
    run.run(config, str(workdir))
    metrics = json.loads((workdir / "metrics.json").read_text())["categories"]["brick"]
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["aupro"] <= 1.0
    ckpt = checkpointing.manager(str(workdir / "checkpoints" / "brick"))
    model = checkpointing.restore_as_saved(ckpt)["model"]
    # 25% of the 80 patches of the 5 training images; PatchCore has no head.
    assert model["bank"].shape == (20, 40)
    assert not model.get("head")
