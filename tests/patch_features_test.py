"""PatchCore locally aware patch features (recontrast_jax.models.reconpatch).

The adaptive pool is checked against a naive loop and the spec's closed forms
without torch; everything else is checked against PyTorch's own operators and
a torch transcription of PatchCore's `_embed` step list (spec §1.3).
"""

import math

import jax
import numpy as np
import pytest

from recontrast_jax.models import reconpatch


def naive_adaptive_pool(v, out):
    """Bin i = mean of v[floor(i*L/O) : ceil((i+1)*L/O)], written out per bin."""
    length = v.shape[-1]
    result = np.empty(v.shape[:-1] + (out,), dtype=np.float64)
    for i in range(out):
        start = math.floor(i * length / out)
        end = math.ceil((i + 1) * length / out)
        result[..., i] = v[..., start:end].astype(np.float64).mean(axis=-1)
    return result


@pytest.mark.parametrize("length,out", [(10, 3), (7, 7), (4608, 1024), (50, 24)])
def test_adaptive_pool_matches_naive_loop(length, out):
    v = np.random.default_rng(length).normal(size=(3, length)).astype(np.float32)
    got = np.asarray(reconpatch.adaptive_avg_pool_1d(v, out))
    np.testing.assert_allclose(got, naive_adaptive_pool(v, out), atol=1e-5)


def test_adaptive_pool_9216_to_1024_is_exact_nine_element_means():
    v = np.random.default_rng(0).normal(size=(2, 9216)).astype(np.float32)
    got = np.asarray(reconpatch.adaptive_avg_pool_1d(v, 1024))
    np.testing.assert_allclose(got, v.reshape(2, 1024, 9).mean(axis=-1), atol=1e-6)


def test_adaptive_pool_4608_to_1024_has_five_wide_bins_at_stride_four_and_a_half():
    matrix = reconpatch.adaptive_pool_matrix(4608, 1024)
    for i in range(1024):
        support = np.flatnonzero(matrix[:, i])
        start = math.floor(4.5 * i)
        np.testing.assert_array_equal(support, np.arange(start, start + 5))
        np.testing.assert_allclose(matrix[support, i], 0.2)
    # Channel c of a 3x3 neighbourhood yields means of positions 0-4 and 4-8.
    v = np.random.default_rng(1).normal(size=(4608,)).astype(np.float32)
    got = np.asarray(reconpatch.adaptive_avg_pool_1d(v, 1024)).reshape(512, 2)
    per_channel = v.reshape(512, 9)
    np.testing.assert_allclose(got[:, 0], per_channel[:, 0:5].mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(got[:, 1], per_channel[:, 4:9].mean(axis=1), atol=1e-6)


def test_unfold_zero_pads_and_orders_channel_major():
    x = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2)
    got = np.asarray(reconpatch.unfold_3x3(x)).reshape(2, 3, 4, 2, 3, 3)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for y in range(3):
        for xx in range(4):
            expected = padded[:, y : y + 3, xx : xx + 3, :].transpose(0, 3, 1, 2)
            np.testing.assert_array_equal(got[:, y, xx], expected)


def nhwc_to_torch(torch, x):
    """NHWC numpy array -> NCHW torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def torch_patch_features(torch, layer2, layer3, pretrain_dim, target_dim):
    """PatchCore `_embed` + `Preprocessing` + `Aggregator`, step by step in torch."""
    functional = torch.nn.functional
    unfolder = torch.nn.Unfold(kernel_size=3, stride=1, padding=1)
    per_layer = []
    for feats in (nhwc_to_torch(torch, layer2), nhwc_to_torch(torch, layer3)):
        batch, channels, height, width = feats.shape
        patches = unfolder(feats).reshape(batch, channels, 3, 3, height * width)
        # [B, h*w, C, 3, 3], as PatchMaker.patchify returns it.
        per_layer.append((patches.permute(0, 4, 1, 2, 3), (height, width)))
    ref_h, ref_w = per_layer[0][1]
    patches3, (h3, w3) = per_layer[1]
    batch, _, channels3 = patches3.shape[:3]
    grid = patches3.reshape(batch, h3, w3, channels3, 3, 3).permute(0, 3, 4, 5, 1, 2)
    grid = functional.interpolate(
        grid.reshape(-1, 1, h3, w3),
        size=(ref_h, ref_w),
        mode="bilinear",
        align_corners=False,
    )
    grid = grid.reshape(batch, channels3, 3, 3, ref_h, ref_w).permute(0, 4, 5, 1, 2, 3)
    patches3 = grid.reshape(batch, ref_h * ref_w, channels3, 3, 3)
    layers = [per_layer[0][0], patches3]
    layers = [p.reshape(-1, *p.shape[-3:]) for p in layers]  # [N, C, 3, 3]
    mapped = [
        functional.adaptive_avg_pool1d(p.reshape(len(p), 1, -1), pretrain_dim)[:, 0]
        for p in layers
    ]
    stacked = torch.stack(mapped, dim=1)  # [N, 2, pretrain]
    pooled = functional.adaptive_avg_pool1d(
        stacked.reshape(len(stacked), 1, -1), target_dim
    )
    return pooled.reshape(batch, ref_h * ref_w, target_dim).numpy()


def random_nhwc(seed, shape):
    """Standard-normal float32 array of the given shape."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_unfold_matches_torch_unfold():
    torch = pytest.importorskip("torch")
    x = random_nhwc(0, (2, 5, 6, 8))
    expected = torch.nn.Unfold(3, padding=1)(
        nhwc_to_torch(torch, x)
    ).numpy()  # [B, C*9, h*w]
    got = np.asarray(reconpatch.unfold_3x3(x)).reshape(2, 30, 72).transpose(0, 2, 1)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "in_hw,out_hw",
    [((4, 4), (8, 8)), ((3, 5), (7, 9)), ((7, 7), (14, 14)), ((6, 4), (3, 4))],
)
def test_upsample_matches_torch_bilinear(in_hw, out_hw):
    torch = pytest.importorskip("torch")
    u = random_nhwc(1, (2, *in_hw, 18))
    expected = torch.nn.functional.interpolate(
        nhwc_to_torch(torch, u), size=out_hw, mode="bilinear", align_corners=False
    ).numpy()
    got = np.asarray(reconpatch.upsample_bilinear(u, out_hw)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(
    "length,out", [(72, 32), (144, 32), (4608, 1024), (9216, 1024), (64, 24)]
)
def test_adaptive_pool_matches_torch(length, out):
    torch = pytest.importorskip("torch")
    v = np.random.default_rng(2).normal(size=(3, length)).astype(np.float32)
    expected = torch.nn.functional.adaptive_avg_pool1d(
        torch.from_numpy(v)[:, None, :], out
    )[:, 0].numpy()
    got = np.asarray(reconpatch.adaptive_avg_pool_1d(v, out))
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("length", [4608, 9216, 2048])
def test_paper_size_pooling_is_sums_not_a_matrix_product(length):
    """The `[L, 1024]` averaging matrix would cost as much as PatchCore's kNN."""
    jaxpr = jax.make_jaxpr(lambda v: reconpatch.adaptive_avg_pool_1d(v, 1024))(
        np.zeros((784, length), np.float32)
    )
    primitives = {equation.primitive.name for equation in jaxpr.jaxpr.eqns}
    assert "dot_general" not in primitives
    assert "reduce_sum" in primitives


def test_adaptive_pool_rejects_empty_sizes():
    with pytest.raises(ValueError, match="L=0, O=4"):
        reconpatch.adaptive_avg_pool_1d(np.zeros((2, 0), np.float32), 4)


@pytest.mark.parametrize(
    "shape2,shape3,pretrain_dim,target_dim",
    [
        ((2, 8, 8, 8), (2, 4, 4, 16), 32, 24),
        ((1, 6, 5, 8), (1, 3, 3, 16), 32, 24),
        ((1, 4, 4, 512), (1, 2, 2, 1024), 1024, 1024),
    ],
)
def test_patch_features_match_torch_transcription(
    shape2, shape3, pretrain_dim, target_dim
):
    torch = pytest.importorskip("torch")
    layer2 = random_nhwc(3, shape2)
    layer3 = random_nhwc(4, shape3)
    fn = jax.jit(reconpatch.patch_features, static_argnums=(2, 3))
    got = np.asarray(fn(layer2, layer3, pretrain_dim, target_dim))
    expected = torch_patch_features(torch, layer2, layer3, pretrain_dim, target_dim)
    assert got.shape == (shape2[0], shape2[1] * shape2[2], target_dim)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def numpy_unfold(x):
    """torch Unfold(3, padding=1) order: [B, h, w, C * 9], C-major then (ky, kx)."""
    batch, height, width, channels = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.empty((batch, height, width, channels, 3, 3), x.dtype)
    for ky in range(3):
        for kx in range(3):
            out[..., ky, kx] = padded[:, ky : ky + height, kx : kx + width]
    return out.reshape(batch, height, width, channels * 9)


@pytest.mark.parametrize(
    "channels,out", [(8, 32), (8, 8), (512, 1024), (16, 32), (8, 24), (4, 7)]
)
def test_pooled_neighbourhoods_equal_pooling_the_unfolded_vectors(channels, out):
    """Shifted sums where the bins tile each channel alike, unfold + pool elsewhere."""
    x = random_nhwc(5, (2, 5, 6, channels))
    got = np.asarray(reconpatch.pooled_neighbourhoods(x, out))
    expected = naive_adaptive_pool(numpy_unfold(x), out)
    assert got.shape == (2, 5, 6, out)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_paper_size_patch_features_never_build_the_unfolded_tensors():
    """WRN-50's 4608- and 9216-long vectors would cost 9x the memory traffic."""
    layer2 = np.zeros((1, 28, 28, 512), np.float32)
    layer3 = np.zeros((1, 14, 14, 1024), np.float32)
    jaxpr = jax.make_jaxpr(lambda a, b: reconpatch.patch_features(a, b, 1024, 1024))(
        layer2, layer3
    )
    widths = {v.aval.shape[-1] for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars}
    assert not widths & {4608, 9216}, sorted(widths)
