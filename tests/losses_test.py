"""Tests of the hard-mining global cosine loss against direct numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recontrast_jax import losses


def numpy_global_cosine(target, recon):
    """mean_b(1 - cos(flat(target_b), flat(recon_b))) in float64."""
    t = target.reshape(target.shape[0], -1).astype(np.float64)
    r = recon.reshape(recon.shape[0], -1).astype(np.float64)
    cos = (t * r).sum(1) / np.sqrt((t * t).sum(1) * (r * r).sum(1))
    return np.mean(1 - cos)


def numpy_point_distance(target, recon):
    t, r = target.astype(np.float64), recon.astype(np.float64)
    cos = (t * r).sum(-1) / np.sqrt((t * t).sum(-1) * (r * r).sum(-1))
    return 1 - cos


def random_levels(seed, shapes):
    rng = np.random.default_rng(seed)
    targets = [rng.normal(size=s).astype(np.float32) for s in shapes]
    # Reconstructions correlated with the targets, so distances vary per point.
    recons = [
        (
            t
            + rng.normal(size=t.shape) * rng.uniform(0.1, 2.0, size=t.shape[:3] + (1,))
        ).astype(np.float32)
        for t in targets
    ]
    return targets, recons


SHAPES = [(2, 8, 8, 4), (2, 4, 4, 6), (2, 2, 2, 8)]


@pytest.mark.parametrize("alpha", [-3.0, 0.0, 1.0])
def test_loss_value_is_unmasked_sum_over_levels(alpha):
    targets, recons = random_levels(0, SHAPES)
    value = losses.global_cosine_hard_mining(targets, recons, alpha)
    expected = sum(
        numpy_global_cosine(t, r) for t, r in zip(targets, recons, strict=True)
    )
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_gradient_is_zero_below_threshold_and_unchanged_elsewhere():
    targets, recons = random_levels(1, SHAPES)
    alpha = 0.5
    masked_grads = jax.grad(
        lambda r: losses.global_cosine_hard_mining(targets, r, alpha)
    )(recons)
    plain_grads = jax.grad(
        lambda r: sum(
            jnp.mean(
                1
                - losses.cosine_similarity(
                    t.reshape(t.shape[0], -1), x.reshape(x.shape[0], -1)
                )
            )
            for t, x in zip(targets, r, strict=True)
        )
    )(recons)
    for t, r, g_mask, g_plain in zip(
        targets, recons, masked_grads, plain_grads, strict=True
    ):
        dist = numpy_point_distance(t, r)
        threshold = dist.mean() + alpha * dist.reshape(-1).std(ddof=1)
        easy = dist < threshold
        assert easy.any() and (~easy).any()
        g_mask, g_plain = np.asarray(g_mask), np.asarray(g_plain)
        assert np.all(g_mask[easy] == 0.0)
        np.testing.assert_array_equal(g_mask[~easy], g_plain[~easy])
        assert np.abs(g_plain[~easy]).max() > 0


def test_factor_scales_easy_gradients():
    targets, recons = random_levels(2, SHAPES[:1])
    g0 = jax.grad(lambda r: losses.global_cosine_hard_mining(targets, r, 1.0, 0.0))(
        recons
    )
    g1 = jax.grad(lambda r: losses.global_cosine_hard_mining(targets, r, 1.0, 1.0))(
        recons
    )
    g_half = jax.grad(lambda r: losses.global_cosine_hard_mining(targets, r, 1.0, 0.5))(
        recons
    )
    easy = np.asarray(g0[0]) == 0
    np.testing.assert_allclose(
        np.asarray(g_half[0])[easy], 0.5 * np.asarray(g1[0])[easy], rtol=1e-6
    )


def test_target_receives_no_gradient():
    targets, recons = random_levels(3, SHAPES)
    grads = jax.grad(lambda t: losses.global_cosine_hard_mining(t, recons, -3.0))(
        targets
    )
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_recontrast_loss_averages_both_directions():
    targets, recons = random_levels(4, SHAPES + SHAPES)
    value = losses.recontrast_loss(targets, recons, 1.0)
    first = sum(
        numpy_global_cosine(t, r) for t, r in zip(targets[:3], recons[:3], strict=True)
    )
    second = sum(
        numpy_global_cosine(t, r) for t, r in zip(targets[3:], recons[3:], strict=True)
    )
    np.testing.assert_allclose(float(value), first / 2 + second / 2, rtol=1e-5)


def test_alpha_schedule_matches_reference_formula():
    total = 2000
    for step in [0, 1, 50, 199, 200, 201, 1999]:
        expected = min(-3 + 4 * step / (0.1 * total), 1)
        np.testing.assert_allclose(
            float(losses.alpha_schedule(step, total, 0.1)), expected, rtol=1e-6
        )
