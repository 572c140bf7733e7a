"""Tests for recontrast_jax.memory_bank against numpy/scipy oracles."""

import jax
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from recontrast_jax.methods import memory_bank


def _rng(seed=0):
    return np.random.default_rng(seed)


def _clustered(seed, n, dim, clusters=12, noise=0.3):
    """Tight Gaussian clusters; the first rows guarantee every cluster is used."""
    rng = _rng(seed)
    centers = rng.normal(scale=5.0, size=(clusters, dim))
    labels = rng.integers(0, clusters, size=n)
    labels[:clusters] = np.arange(clusters)
    points = centers[labels] + noise * rng.normal(size=(n, dim))
    return points.astype(np.float32), labels, centers


def _numpy_greedy(distances_to_all, initial_anchor, num_samples):
    """Naive greedy k-center: argmax, then min-update (float64)."""
    anchor = initial_anchor.copy()
    selected = []
    for _ in range(num_samples):
        chosen = int(np.argmax(anchor))
        selected.append(chosen)
        anchor = np.minimum(anchor, distances_to_all(chosen))
    return np.array(selected)


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbors_matches_cdist_with_many_chunks(k):
    rng = _rng(k)
    queries = rng.normal(size=(37, 8)).astype(np.float32)
    bank = rng.normal(size=(29, 8)).astype(np.float32)
    budget = 4 * 5  # five float32 values: forces bank and query chunking
    assert memory_bank.knn_chunk_sizes(37, 29, k, budget) == (1, 5)
    dist, idx = memory_bank.nearest_neighbors(queries, bank, k, budget)

    full = cdist(queries.astype(np.float64), bank.astype(np.float64))
    expected_idx = np.argsort(full, axis=1)[:, :k]
    expected_dist = np.take_along_axis(full, expected_idx, axis=1)
    assert dist.shape == (37, k) and idx.shape == (37, k)
    np.testing.assert_array_equal(np.asarray(idx), expected_idx)
    np.testing.assert_allclose(np.asarray(dist), expected_dist, rtol=1e-5, atol=1e-5)


def test_nearest_neighbors_query_chunking_only():
    rng = _rng(5)
    queries = rng.normal(size=(50, 6)).astype(np.float32)
    bank = rng.normal(size=(20, 6)).astype(np.float32)
    budget = 4 * 20 * 7  # 7 queries against the whole bank per block
    assert memory_bank.knn_chunk_sizes(50, 20, 2, budget) == (7, 20)
    dist, idx = memory_bank.nearest_neighbors(queries, bank, 2, budget)
    full = cdist(queries.astype(np.float64), bank.astype(np.float64))
    expected_idx = np.argsort(full, axis=1)[:, :2]
    np.testing.assert_array_equal(np.asarray(idx), expected_idx)
    np.testing.assert_allclose(
        np.asarray(dist), np.take_along_axis(full, expected_idx, 1), atol=1e-5
    )


@pytest.mark.parametrize("budget", [4 * 5, 4 * 12 * 12])  # bank blocks, one block
@pytest.mark.parametrize("k", [1, 2])
def test_nearest_neighbors_keep_the_lower_index_on_ties(budget, k):
    base = _rng(7).normal(size=(6, 4)).astype(np.float32)
    bank = np.concatenate([base, base])  # rows i and i + 6 are equal
    queries = base + _rng(8).normal(scale=0.3, size=base.shape).astype(np.float32)
    dist, idx = memory_bank.nearest_neighbors(queries, bank, k, budget)
    full = cdist(queries.astype(np.float64), bank.astype(np.float64))
    expected_idx = np.argsort(full, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(idx), expected_idx)
    np.testing.assert_allclose(
        np.asarray(dist), np.take_along_axis(full, expected_idx, 1), atol=1e-5
    )


def test_one_block_search_is_one_product_without_a_loop():
    """A bank that fits the budget leaves the ONNX runtimes one plain MatMul."""
    queries = np.zeros((30, 8), np.float32)
    bank = np.zeros((20, 8), np.float32)
    jaxpr = jax.make_jaxpr(
        lambda q, b: memory_bank.nearest_neighbors(q, b, 1, 4 * 30 * 20)
    )(queries, bank)
    text = str(jaxpr)
    assert "while" not in text and "scan" not in text
    assert text.count("dot_general") == 1


def test_nearest_neighbors_rejects_k_larger_than_bank():
    with pytest.raises(ValueError, match="bank size"):
        memory_bank.nearest_neighbors(np.zeros((2, 3)), np.zeros((2, 3)), k=3)


def test_exact_greedy_matches_naive_numpy_loop():
    features = _rng(1).normal(size=(120, 10)).astype(np.float32)
    got = np.asarray(memory_bank.exact_greedy_coreset(features, 0.1))

    f64 = features.astype(np.float64)
    full = cdist(f64, f64)
    expected = _numpy_greedy(lambda c: full[:, c], np.linalg.norm(full, axis=1), 12)
    np.testing.assert_array_equal(got, expected)


def test_approximate_greedy_matches_numpy_transcription():
    rng = _rng(2)
    features = rng.normal(size=(400, 24)).astype(np.float32)
    bound = 1.0 / np.sqrt(24)
    projection = rng.uniform(-bound, bound, size=(24, 128)).astype(np.float32)
    starts = rng.choice(400, 10, replace=False)
    got = np.asarray(
        memory_bank.approximate_greedy_coreset(
            features, 0.1, projection=projection, start_indices=starts
        )
    )

    projected = features.astype(np.float64) @ projection.astype(np.float64)
    anchor = cdist(projected, projected[starts]).mean(axis=1)
    expected = _numpy_greedy(
        lambda c: cdist(projected, projected[c : c + 1])[:, 0], anchor, 40
    )
    assert got.shape == (40,)
    np.testing.assert_array_equal(got, expected)


def test_approximate_greedy_random_projection_and_starts_follow_key():
    features = _rng(3).normal(size=(300, 32)).astype(np.float32)
    key = jax.random.PRNGKey(7)
    got = np.asarray(memory_bank.approximate_greedy_coreset(features, 0.05, key))

    projection_key, start_key = jax.random.split(key)
    projection = np.asarray(memory_bank.coreset_projection(projection_key, 32))
    starts = np.asarray(memory_bank.coreset_start_indices(start_key, 300))
    # Weight range of torch.nn.Linear's default init, and distinct start points.
    assert projection.shape == (32, 128)
    assert np.abs(projection).max() <= 1.0 / np.sqrt(32)
    assert np.abs(projection).max() > 0.9 / np.sqrt(32)
    assert len(set(starts.tolist())) == 10

    projected = features.astype(np.float64) @ projection.astype(np.float64)
    anchor = cdist(projected, projected[starts]).mean(axis=1)
    expected = _numpy_greedy(
        lambda c: cdist(projected, projected[c : c + 1])[:, 0], anchor, 15
    )
    np.testing.assert_array_equal(got, expected)


def test_no_projection_when_dimension_is_already_128():
    assert memory_bank.coreset_projection(jax.random.PRNGKey(0), 128) is None
    features = _rng(4).normal(size=(200, 128)).astype(np.float32)
    starts = np.arange(10)
    got = np.asarray(
        memory_bank.approximate_greedy_coreset(features, 0.05, start_indices=starts)
    )
    f64 = features.astype(np.float64)
    anchor = cdist(f64, f64[starts]).mean(axis=1)
    expected = _numpy_greedy(lambda c: cdist(f64, f64[c : c + 1])[:, 0], anchor, 10)
    np.testing.assert_array_equal(got, expected)


def _coverage_radius(features, indices):
    return cdist(features, features[indices]).min(axis=1).max()


def test_approximate_coreset_covers_clustered_data_like_exact_greedy():
    features, labels, centers = _clustered(5, 600, 32)
    ratio = 0.05
    exact = np.asarray(memory_bank.exact_greedy_coreset(features, ratio))
    exact_radius = _coverage_radius(features, exact)
    center_gap = cdist(centers, centers)[np.triu_indices(len(centers), 1)].min()
    for seed in range(2):
        approx = np.asarray(
            memory_bank.approximate_greedy_coreset(
                features, ratio, jax.random.PRNGKey(seed)
            )
        )
        assert len(set(approx.tolist())) == len(approx) == 30
        # Every cluster is hit, and the covering radius is close to exact
        # greedy's (itself a 2-approximation of the optimal k-center radius).
        assert set(labels[approx].tolist()) == set(range(len(centers)))
        approx_radius = _coverage_radius(features, approx)
        assert approx_radius <= 1.2 * exact_radius
        assert approx_radius < 0.25 * center_gap


def test_coreset_ratio_is_validated():
    with pytest.raises(ValueError, match="ratio"):
        memory_bank.exact_greedy_coreset(np.zeros((4, 2)), 1.5)


def _numpy_reweight(query, bank, anchor, b):
    """anomalib's weight: 1 - softmax(dist to b nearest of anchor)[anchor]."""
    bank64 = bank.astype(np.float64)
    support = np.argsort(cdist(bank64[anchor : anchor + 1], bank64)[0])[:b]
    assert support[0] == anchor
    dist = np.linalg.norm(bank64[support] - query.astype(np.float64), axis=1)
    soft = np.exp(dist) / np.exp(dist).sum()
    return 1.0 - soft[0]


def _reweight_inputs():
    rng = _rng(6)
    bank = rng.normal(size=(40, 12)).astype(np.float32)
    queries = rng.normal(size=(3, 16, 12)).astype(np.float32)
    full = cdist(queries.reshape(-1, 12).astype(np.float64), bank.astype(np.float64))
    nn_idx = full.argmin(axis=1).reshape(3, 16)
    scores = full.min(axis=1).reshape(3, 16)
    return bank, queries, nn_idx, scores


def test_reweighted_image_score_matches_numpy_for_argmax_patch():
    bank, queries, nn_idx, scores = _reweight_inputs()
    got = np.asarray(
        memory_bank.reweighted_image_score(scores, nn_idx, bank, queries, b=9)
    )
    expected = []
    for i in range(3):
        t = int(np.argmax(scores[i]))
        weight = _numpy_reweight(queries[i, t], bank, nn_idx[i, t], 9)
        expected.append(weight * scores[i, t])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Unbatched input gives the same value as a scalar.
    single = memory_bank.reweighted_image_score(
        scores[1], nn_idx[1], bank, queries[1], b=9
    )
    np.testing.assert_allclose(float(single), expected[1], rtol=1e-5)


def test_reweighted_image_score_per_patch_matches_numpy():
    bank, queries, nn_idx, scores = _reweight_inputs()
    got = np.asarray(
        memory_bank.reweighted_image_score(
            scores, nn_idx, bank, queries, b=5, per_patch=True, memory_budget_bytes=64
        )
    )
    expected = [
        max(
            _numpy_reweight(queries[i, t], bank, nn_idx[i, t], 5) * scores[i, t]
            for t in range(16)
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_reweighting_with_one_neighbour_is_plain_max():
    bank, queries, nn_idx, scores = _reweight_inputs()
    got = memory_bank.reweighted_image_score(scores, nn_idx, bank, queries, b=1)
    np.testing.assert_allclose(np.asarray(got), scores.max(axis=1), rtol=1e-6)
