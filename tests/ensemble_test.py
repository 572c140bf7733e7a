"""Ensembles of memory-bank models: modified z-scores from training-set scores."""

import numpy as np
import pytest
from patchcore_test import tiny_config
from scipy import stats

from recontrast_jax import evaluate, parallel, run, thresholds
from recontrast_jax.data import folder
from recontrast_jax.methods import patchcore

ARCHS = ("resnet_tiny", "densenet_tiny")


def scipy_zscore(values, reference):
    """(v - median) / (1.4826 MAD): scipy's MAD with scale='normal' is MAD / 0.67449."""
    median = np.median(reference)
    return (values - median) / stats.median_abs_deviation(reference, scale="normal")


def test_normalization_stats_and_zscore_match_scipy():
    rng = np.random.default_rng(0)
    result = evaluate.SplitResult(
        maps=rng.gamma(2.0, size=(5, 8, 8)).astype(np.float32),
        scores=rng.gamma(3.0, size=7).astype(np.float32),
        masks=None, labels=None, images=None,
    )  # fmt: skip
    stats_ = patchcore.normalization_stats(result)
    values = rng.normal(size=11).astype(np.float32)
    got = np.asarray(patchcore.zscore(values, stats_[0], stats_[1]))
    np.testing.assert_allclose(got, scipy_zscore(values, result.scores), rtol=2e-5)
    got = np.asarray(patchcore.zscore(values, stats_[2], stats_[3]))
    np.testing.assert_allclose(
        got, scipy_zscore(values, result.maps.ravel()), rtol=2e-5
    )


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    from recontrast_jax.data import synthetic

    data = synthetic.ensure_embedded_dataset(
        tmp_path_factory.mktemp("data"),
        image_size=48, num_train=6, num_test_good=3, num_test_per_defect=1,
    )  # fmt: skip
    config = tiny_config(data)
    config.patchcore.ensemble = ARCHS
    workdir = tmp_path_factory.mktemp("work")
    metrics = run.run(config, str(workdir))["categories"]["brick"]
    return config, workdir, metrics


def test_ensemble_is_the_mean_of_per_model_modified_z_scores(ensemble_run):
    config, workdir, _ = ensemble_run
    files = folder.scan_category(config.data.root, "brick")
    train_samples, _ = thresholds.holdout_split(
        files.train, config.data.holdout_fraction, config.seed
    )
    mesh = parallel.make_mesh()
    models = patchcore.restore(config, str(workdir), "brick", mesh)
    assert len(models) == 2
    score_parts, map_parts = [], []
    for arch, model in zip(ARCHS, models, strict=True):
        single = patchcore.compile_predict(config, mesh, archs=(arch,))
        on_train = evaluate.evaluate_split(single, [model], train_samples, config, mesh)
        on_test = evaluate.evaluate_split(single, [model], files.test, config, mesh)
        score_parts.append(scipy_zscore(on_test.scores, on_train.scores))
        map_parts.append(scipy_zscore(on_test.maps, on_train.maps.ravel()))
    combined = evaluate.evaluate_split(
        patchcore.compile_predict(config, mesh), models, files.test, config, mesh
    )
    np.testing.assert_allclose(
        combined.scores, np.mean(score_parts, 0), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        combined.maps, np.mean(map_parts, 0), rtol=1e-4, atol=1e-4
    )


def test_ensemble_keeps_one_checkpoint_per_backbone(ensemble_run):
    _, workdir, metrics = ensemble_run
    for arch in ARCHS:
        assert (workdir / "checkpoints" / "brick" / arch).is_dir()
    assert 0.0 <= metrics["image_auroc"] <= 1.0
