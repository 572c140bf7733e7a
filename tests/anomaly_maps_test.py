"""Tests for recontrast_jax.anomaly_maps against scipy, numpy and closed forms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from recontrast_jax import anomaly_maps


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_cosine_similarity_matches_numpy_formula_including_zero_vector():
    a = _rng(1).normal(size=(3, 4, 5, 16)).astype(np.float32)
    b = _rng(2).normal(size=(3, 4, 5, 16)).astype(np.float32)
    a[0, 0, 0] = 0.0  # a zero vector must give 0, not NaN
    got = np.asarray(jax.jit(anomaly_maps.cosine_similarity)(a, b))

    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    expected = np.sum(a64 * b64, axis=-1) / np.maximum(norms, 1e-8)
    assert got.shape == (3, 4, 5)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got[0, 0, 0] == 0.0


def test_cosine_similarity_other_axis():
    a = _rng(3).normal(size=(6, 2, 3)).astype(np.float32)
    b = _rng(4).normal(size=(6, 2, 3)).astype(np.float32)
    got = np.asarray(jax.jit(anomaly_maps.cosine_similarity, static_argnums=2)(a, b, 0))
    expected = np.sum(a * b, 0) / (
        np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _align_corners_oracle(maps, out_hw):
    """scipy.ndimage.map_coordinates(order=1) at the align-corners coordinates."""
    in_h, in_w = maps.shape[1:]
    out_h, out_w = out_hw

    def coords(n_in, n_out):
        if n_out == 1 or n_in == 1:
            return np.zeros(n_out)
        return np.arange(n_out) * (n_in - 1) / (n_out - 1)

    yy, xx = np.meshgrid(coords(in_h, out_h), coords(in_w, out_w), indexing="ij")
    return np.stack(
        [
            scipy.ndimage.map_coordinates(m.astype(np.float64), [yy, xx], order=1)
            for m in maps
        ]
    )


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [
        ((16, 16), (256, 256)),  # ReContrast layer3 -> image
        ((7, 5), (23, 31)),  # non-square upsizing
        ((40, 33), (9, 12)),  # downsizing
        ((6, 8), (6, 8)),  # identity
        ((1, 4), (3, 1)),  # degenerate sizes
    ],
)
def test_align_corners_resize_matches_scipy_map_coordinates(in_hw, out_hw):
    maps = _rng(5).normal(size=(2, *in_hw)).astype(np.float32)
    resize = jax.jit(anomaly_maps.align_corners_resize, static_argnums=1)
    got = np.asarray(resize(maps, out_hw))
    assert got.shape == (2, *out_hw)
    np.testing.assert_allclose(got, _align_corners_oracle(maps, out_hw), atol=2e-6)


def _scipy_blur(maps, sigma=4.0):
    return np.stack(
        [scipy.ndimage.gaussian_filter(m.astype(np.float64), sigma) for m in maps]
    )


@pytest.mark.parametrize("hw", [(64, 64), (256, 256), (5, 5), (20, 13), (1, 3)])
def test_gaussian_blur_matches_scipy_gaussian_filter(hw):
    # Small maps (5x5 with radius 16) need the reflection to repeat several times.
    maps = _rng(6).uniform(0, 12, size=(2, *hw)).astype(np.float32)
    got = np.asarray(jax.jit(anomaly_maps.gaussian_blur)(maps))
    expected = _scipy_blur(maps)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_gaussian_blur_other_sigma_and_truncate():
    maps = _rng(7).normal(size=(1, 30, 21)).astype(np.float32)
    blur = jax.jit(anomaly_maps.gaussian_blur, static_argnums=(1, 2))
    got = np.asarray(blur(maps, 1.5, 2.0))
    expected = scipy.ndimage.gaussian_filter(
        maps[0].astype(np.float64), 1.5, truncate=2.0
    )
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)


def test_gaussian_blur_sigma_zero_is_identity():
    maps = _rng(8).normal(size=(2, 9, 7)).astype(np.float32)
    got = np.asarray(jax.jit(anomaly_maps.gaussian_blur, static_argnums=1)(maps, 0.0))
    np.testing.assert_array_equal(got, maps)


def _features(shapes, seed):
    rng = _rng(seed)
    return [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes]


def test_distance_maps_identical_features_give_zero():
    feats = _features([(2, 8, 8, 4), (2, 4, 4, 6), (2, 2, 2, 3)], seed=9)
    fn = jax.jit(anomaly_maps.distance_maps, static_argnums=2)
    got = np.asarray(fn(feats, feats, (16, 16)))
    assert got.shape == (2, 16, 16)
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_distance_maps_known_angles_give_closed_form_sum():
    # Level i: decoder vector at a constant angle theta_i from the encoder vector,
    # so each upsampled map is the constant 1 - cos(theta_i) and the sum is
    # sum_i (1 - cos(theta_i)); the sum (not the mean) is the reference rule.
    thetas = [0.3, 1.1, np.pi / 2, np.pi]
    sizes = [(8, 8), (4, 4), (2, 3), (1, 1)]
    encoders, decoders = [], []
    for theta, (h, w) in zip(thetas, sizes, strict=True):
        scale = _rng(10).uniform(0.5, 3.0, size=(2, h, w, 1))
        enc = np.concatenate([scale, np.zeros((2, h, w, 2))], axis=-1)
        dec = np.concatenate(
            [
                np.cos(theta) * scale * 2,
                np.sin(theta) * scale * 2,
                np.zeros((2, h, w, 1)),
            ],
            axis=-1,
        )
        encoders.append(jnp.asarray(enc, jnp.float32))
        decoders.append(jnp.asarray(dec, jnp.float32))
    fn = jax.jit(anomaly_maps.distance_maps, static_argnums=2)
    got = np.asarray(fn(encoders, decoders, (12, 10)))
    expected = sum(1.0 - np.cos(t) for t in thetas)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_distance_maps_rejects_mismatched_lists():
    feats = _features([(1, 4, 4, 2), (1, 2, 2, 2)], seed=11)
    with pytest.raises(ValueError, match="equally long"):
        anomaly_maps.distance_maps(feats, feats[:1], (8, 8))
    with pytest.raises(ValueError, match="pair 1"):
        anomaly_maps.distance_maps(feats, [feats[0], feats[0]], (8, 8))


def test_anomaly_map_is_blurred_sum_of_upsampled_distances():
    enc = _features([(2, 8, 8, 5), (2, 4, 4, 7)], seed=12)
    dec = _features([(2, 8, 8, 5), (2, 4, 4, 7)], seed=13)
    fn = jax.jit(anomaly_maps.anomaly_map, static_argnums=(2, 3))
    got = np.asarray(fn(enc, dec, (32, 32), 4.0))

    # Independent pipeline: numpy cosine, scipy map_coordinates, scipy blur.
    total = np.zeros((2, 32, 32))
    for e, d in zip(enc, dec, strict=True):
        e, d = np.asarray(e, np.float64), np.asarray(d, np.float64)
        cos = np.sum(e * d, -1) / (
            np.linalg.norm(e, axis=-1) * np.linalg.norm(d, axis=-1)
        )
        total += _align_corners_oracle(1.0 - cos, (32, 32))
    np.testing.assert_allclose(got, _scipy_blur(total), rtol=1e-5, atol=1e-5)


def test_image_scores_match_numpy():
    maps = _rng(14).normal(size=(3, 20, 17)).astype(np.float32)
    score = jax.jit(anomaly_maps.image_scores, static_argnums=(1, 2))
    flat = maps.reshape(3, -1).astype(np.float64)

    np.testing.assert_allclose(
        np.asarray(score(maps, "max", 0.0)), flat.max(1), rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(score(maps, "mean", 0.0)), flat.mean(1), atol=1e-6
    )
    count = int(20 * 17 * 0.05)
    top = np.sort(flat, axis=1)[:, ::-1][:, :count].mean(1)
    np.testing.assert_allclose(np.asarray(score(maps, "max", 0.05)), top, rtol=1e-5)


def test_image_scores_rejects_unknown_rule():
    maps = jnp.zeros((1, 4, 4))
    with pytest.raises(ValueError, match="'max', 'mean'"):
        anomaly_maps.image_scores(maps, rule="median")


def test_functions_trace_once_under_jit():
    # Building the matrices happens at trace time; a second call must reuse the trace.
    traces = []

    @functools.partial(jax.jit, static_argnums=1)
    def blur_and_resize(maps, out_hw):
        traces.append(1)
        return anomaly_maps.gaussian_blur(
            anomaly_maps.align_corners_resize(maps, out_hw)
        )

    maps = jnp.ones((1, 4, 4))
    out1 = blur_and_resize(maps, (16, 16))
    out2 = blur_and_resize(maps * 2, (16, 16))
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(out1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out2), 2.0, rtol=1e-6)


@pytest.mark.parametrize("width", [1, 3])
def test_replace_border_is_numpy_edge_padding_of_the_interior(width):
    maps = _rng(7).random((2, 12, 10)).astype(np.float32)
    inner = maps[:, width:-width, width:-width]
    expected = np.pad(inner, ((0, 0), (width, width), (width, width)), mode="edge")
    got = np.asarray(
        jax.jit(anomaly_maps.replace_border, static_argnums=1)(maps, width)
    )
    np.testing.assert_array_equal(got, expected)
    assert anomaly_maps.replace_border(maps, 0) is maps


def test_anomaly_map_border_is_applied_before_the_blur():
    enc = [jnp.asarray(_rng(8).normal(size=(1, 8, 8, 4)), jnp.float32)]
    dec = [jnp.asarray(_rng(9).normal(size=(1, 8, 8, 4)), jnp.float32)]
    raw = np.asarray(anomaly_maps.distance_maps(enc, dec, (16, 16)))
    padded = np.pad(raw[:, 2:-2, 2:-2], ((0, 0), (2, 2), (2, 2)), mode="edge")
    got = np.asarray(anomaly_maps.anomaly_map(enc, dec, (16, 16), 4.0, "sum", 2))
    np.testing.assert_allclose(got, _scipy_blur(padded), rtol=1e-5, atol=1e-6)
