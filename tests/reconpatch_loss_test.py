"""Tests for the ReConPatch pseudo-labels and relaxed contrastive loss.

Oracles: neighbourhoods and contextual similarities worked out by hand on toy
point sets, a naive set-based transcription of Eqs. 2-5, numpy for Eq. 1 and a
double-loop numpy transcription of Eq. 7 (also used for finite differences).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recontrast_jax.methods import reconpatch_loss as rl


def _on_a_line(xs):
    """Points (x, 0) in 2-D."""
    return jnp.asarray([[x, 0.0] for x in xs], jnp.float32)


# Points 0, 10, 11, 20, 21.5 on a line; the neighbourhoods below are read off
# the distance table by hand (k=4 excludes the single farthest point).
LINE = _on_a_line([0.0, 10.0, 11.0, 20.0, 21.5])
LINE_N4 = [{0, 1, 2, 3}, {0, 1, 2, 3}, {1, 2, 3, 4}, {1, 2, 3, 4}, {1, 2, 3, 4}]
# Eqs. 2-5 with k=4 (reciprocal sets of size k//2 = 2: R(0)={0}, R(1)=R(2)={1,2},
# R(3)=R(4)={3,4}), computed by hand.
LINE_CONTEXTUAL_K4 = [
    [1.0, 0.75, 0.625, 0.375, 0.0],
    [0.75, 0.875, 0.875, 0.8125, 0.625],
    [0.625, 0.875, 0.875, 0.9375, 0.75],
    [0.375, 0.8125, 0.9375, 1.0, 1.0],
    [0.0, 0.625, 0.75, 1.0, 1.0],
]
TWO_CLUSTERS = jnp.asarray(
    [[0, 0], [0, 1], [1, 0], [10, 10], [10, 11], [11, 10]], jnp.float32
)


def _mask_from_sets(sets):
    mask = np.zeros((len(sets), len(sets)))
    for i, members in enumerate(sets):
        mask[i, list(members)] = 1.0
    return mask


def test_knn_mask_on_a_line():
    np.testing.assert_array_equal(rl.knn_mask(LINE, 4), _mask_from_sets(LINE_N4))


def test_knn_mask_two_clusters_and_exact_count():
    mask = np.asarray(rl.knn_mask(TWO_CLUSTERS, 3))
    cluster = [{0, 1, 2}] * 3 + [{3, 4, 5}] * 3
    np.testing.assert_array_equal(mask, _mask_from_sets(cluster))
    # Exactly k per row even with many ties (points 3, 4, 5 from point 0 are all far).
    assert (np.asarray(rl.knn_mask(TWO_CLUSTERS, 4)).sum(axis=1) == 4).all()


def test_knn_mask_keeps_self_with_duplicates():
    z = jnp.asarray([[1.0, 2.0], [1.0, 2.0], [5.0, 5.0]])
    np.testing.assert_array_equal(rl.knn_mask(z, 1), np.eye(3))


def test_knn_mask_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be in"):
        rl.knn_mask(LINE, 6)


def test_contextual_similarity_by_hand_on_a_line():
    np.testing.assert_allclose(
        rl.contextual_similarity(LINE, k=4), LINE_CONTEXTUAL_K4, atol=1e-6
    )


def test_contextual_similarity_two_clusters_is_block_diagonal():
    # k=3: each cluster is every member's neighbourhood, so overlaps are 3/3 = 1
    # inside a cluster and 0 across; the k//2 = 1 reciprocal set is the point itself.
    block = np.kron(np.eye(2), np.ones((3, 3)))
    np.testing.assert_allclose(
        rl.contextual_similarity(TWO_CLUSTERS, k=3), block, atol=1e-6
    )


def _naive_contextual(z, k):
    """Eqs. 2-5 with Python sets (distinct distances assumed)."""
    n = len(z)
    dist = np.linalg.norm(z[:, None] - z[None], axis=-1)

    def neighbours(i, size):
        return set(np.argsort(dist[i])[:size].tolist())

    nk = [neighbours(i, k) for i in range(n)]
    nh = [neighbours(i, k // 2) for i in range(n)]
    w_tilde = np.zeros((n, n))
    for i in range(n):
        for j in nk[i]:
            w_tilde[i, j] = len(nk[i] & nk[j]) / len(nk[i])
    w_hat = np.zeros((n, n))
    for i in range(n):
        reciprocal = [j for j in nh[i] if i in nh[j]]
        for j in range(n):
            w_hat[i, j] = sum(w_tilde[m, j] for m in reciprocal) / len(reciprocal)
    return 0.5 * (w_hat + w_hat.T)


@pytest.mark.parametrize("k", [4, 5, 7])
def test_contextual_similarity_matches_naive_sets(k):
    z = np.random.default_rng(k).normal(size=(16, 3))
    got = rl.contextual_similarity(jnp.asarray(z, jnp.float32), k=k)
    np.testing.assert_allclose(got, _naive_contextual(z, k), atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_pairwise_similarity_matches_numpy(normalize):
    z = np.random.default_rng(0).normal(size=(9, 4))
    sigma = 0.7
    zz = z / np.linalg.norm(z, axis=1, keepdims=True) if normalize else z
    sq = ((zz[:, None, :] - zz[None, :, :]) ** 2).sum(-1)
    got = rl.pairwise_similarity(jnp.asarray(z, jnp.float32), sigma, normalize)
    np.testing.assert_allclose(got, np.exp(-sq / sigma), rtol=1e-5, atol=1e-6)


def test_reconpatch_labels_combine_both_terms():
    z = jnp.asarray(np.random.default_rng(1).normal(size=(10, 3)), jnp.float32)
    got = rl.reconpatch_labels(z, alpha=0.3, sigma=0.5, k=4)
    want = 0.3 * rl.pairwise_similarity(z, 0.5) + 0.7 * rl.contextual_similarity(z, 4)
    np.testing.assert_allclose(got, want, atol=1e-6)


def _numpy_loss(z, w, margin):
    """Eq. 7 written as a double loop (i == j left out), in float64."""
    n = len(z)
    dist = [[np.sqrt(((z[i] - z[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        row_mean = sum(dist[i]) / n
        for j in range(n):
            if i == j:
                continue
            delta = dist[i][j] / row_mean
            total += w[i, j] * delta**2 + (1 - w[i, j]) * max(margin - delta, 0) ** 2
    return total / n


def _random_case(seed, n=7, d=3):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    w = rng.uniform(size=(n, n))
    return z, 0.5 * (w + w.T)


@pytest.mark.parametrize("margin", [1.0, 1.5])
def test_loss_matches_numpy_double_loop(margin):
    z, w = _random_case(0)
    got = rl.relaxed_contrastive_loss(
        jnp.asarray(z, jnp.float32), jnp.asarray(w, jnp.float32), margin
    )
    np.testing.assert_allclose(got, _numpy_loss(z, w, margin), rtol=1e-5)


def test_loss_gradient_is_finite_with_duplicate_points():
    z, w = _random_case(1)
    z[1] = z[0]
    z[4] = z[0]
    grad = jax.grad(rl.relaxed_contrastive_loss)(
        jnp.asarray(z, jnp.float32), jnp.asarray(w, jnp.float32)
    )
    assert np.isfinite(np.asarray(grad)).all()


def test_loss_gradient_matches_finite_differences():
    z, w = _random_case(2, n=5, d=3)
    margin = 1.2
    grad = jax.grad(rl.relaxed_contrastive_loss)(
        jnp.asarray(z, jnp.float32), jnp.asarray(w, jnp.float32), margin
    )
    h = 1e-6
    numeric = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        plus, minus = z.copy(), z.copy()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = (
            _numpy_loss(plus, w, margin) - _numpy_loss(minus, w, margin)
        ) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_loss_has_no_gradient_into_weights():
    z, w = _random_case(3)
    grad_w = jax.grad(rl.relaxed_contrastive_loss, argnums=1)(
        jnp.asarray(z, jnp.float32), jnp.asarray(w, jnp.float32)
    )
    np.testing.assert_array_equal(grad_w, 0.0)


def test_loss_rejects_mismatched_weights():
    with pytest.raises(ValueError, match="weights must have shape"):
        rl.relaxed_contrastive_loss(jnp.zeros((4, 2)), jnp.zeros((3, 3)))
