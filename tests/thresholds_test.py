"""Thresholds from normal scores, against direct numpy computations."""

import numpy as np
import pytest
import scipy.stats

from recontrast_jax import default_config, thresholds


def calibration(seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.gamma(2.0, 1.0, size=200)
    maps = rng.gamma(1.5, 0.2, size=(20, 16, 16))
    return (
        {
            "normal": thresholds.summarize_normal_scores(scores, maps, "held-out"),
            "f1_optimal_on_test": {"image": 2.5, "pixel": 0.7},
        },
        scores,
        maps,
    )


def test_holdout_split_is_disjoint_deterministic_and_sized():
    samples = list(range(50))
    train, held = thresholds.holdout_split(samples, 0.1, seed=7)
    assert len(held) == 5 and len(train) == 45
    assert set(train) | set(held) == set(samples) and not set(train) & set(held)
    assert thresholds.holdout_split(samples, 0.1, seed=7) == (train, held)
    assert thresholds.holdout_split(samples, 0.0, seed=7) == (tuple(samples), ())
    assert len(thresholds.holdout_split(list(range(4)), 0.1, seed=0)[1]) == 1


def test_rules_match_numpy():
    cal, scores, maps = calibration()
    cfg = default_config.get_config().threshold
    cfg.rule, cfg.quantile = "quantile", 0.95
    chosen = thresholds.choose(cal, cfg)
    np.testing.assert_allclose(chosen["image"], np.quantile(scores, 0.95))
    np.testing.assert_allclose(chosen["pixel"], np.quantile(maps, 0.95), rtol=1e-9)
    assert "0.95 quantile" in chosen["rule"] and "200 held-out" in chosen["rule"]
    cfg.rule, cfg.k = "mean_std", 2.0
    chosen = thresholds.choose(cal, cfg)
    np.testing.assert_allclose(chosen["image"], scores.mean() + 2 * scores.std(ddof=1))
    np.testing.assert_allclose(chosen["pixel"], maps.mean() + 2 * maps.std())
    cfg.rule, cfg.image_value, cfg.pixel_value = "fixed", 3.0, 0.5
    assert thresholds.choose(cal, cfg)["image"] == 3.0
    cfg.rule = "f1_optimal_on_test"
    chosen = thresholds.choose(cal, cfg)
    assert chosen["image"] == 2.5 and "test set" in chosen["rule"]
    cfg.rule = "nope"
    with pytest.raises(ValueError, match="quantile"):
        thresholds.choose(cal, cfg)


def small_calibration(scores):
    maps = np.random.default_rng(1).gamma(1.5, 0.2, size=(len(scores), 16, 16))
    return {"normal": thresholds.summarize_normal_scores(scores, maps, "held-out")}


def test_quantile_of_a_small_calibration_set_is_a_normal_fit_with_a_note():
    cfg = default_config.get_config().threshold  # 0.99 quantile
    scores = np.array([1.0, 1.2, 0.9, 1.1, 1.05, 0.95])
    chosen = thresholds.choose(small_calibration(scores), cfg)
    z = scipy.stats.norm.ppf(0.99)
    np.testing.assert_allclose(chosen["image"], scores.mean() + z * scores.std(ddof=1))
    assert chosen["image"] > scores.max()  # the empirical quantile is ~ the max
    assert "normal fit" in chosen["rule"] and "6 held-out" in chosen["rule"]
    assert "6 calibration images are too few" in chosen["note"]
    assert "needs 100" in chosen["note"]
    # A far outlier: the fit stays at least the largest score.
    outlier = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 50.0])
    assert thresholds.choose(small_calibration(outlier), cfg)["image"] == 50.0


def test_quantile_with_enough_calibration_images_is_empirical():
    cfg = default_config.get_config().threshold
    scores = np.random.default_rng(3).gamma(2.0, 1.0, size=100)
    chosen = thresholds.choose(small_calibration(scores), cfg)
    np.testing.assert_allclose(chosen["image"], np.quantile(scores, 0.99))
    assert "note" not in chosen
    assert thresholds.images_for_quantile(0.99) == 100
    assert thresholds.images_for_quantile(0.95) == 20


def test_pixel_quantile_interpolates_between_stored_quantiles():
    cal, _, maps = calibration(1)
    cfg = default_config.get_config().threshold
    for q in (0.9, 0.975, 0.995):
        cfg.quantile = q
        np.testing.assert_allclose(
            thresholds.choose(cal, cfg)["pixel"], np.quantile(maps, q), rtol=2e-3
        )


def test_normalized_scores_put_the_threshold_at_one_half():
    out = thresholds.normalize([0.0, 1.0, 2.0, 4.0, 10.0], 2.0)
    np.testing.assert_allclose(out, [0.0, 0.25, 0.5, 1.0, 1.0])


def test_f1_optimal_needs_both_classes():
    assert thresholds.f1_optimal_on_test(np.zeros(5), np.arange(5.0)) == {}
    found = thresholds.f1_optimal_on_test(
        np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    )
    assert 0.2 < found["image"] <= 0.8
