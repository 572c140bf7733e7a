"""PatchCore's locally aware patch features, as used by ReConPatch (spec §1.3).

Pure JAX functions on NHWC float32 arrays that reproduce the PatchCore reference
code (`PatchMaker`, `Preprocessing`/`MeanMapper`, `Aggregator`): a 3x3 zero-padded
neighbourhood is unfolded per layer, each neighbourhood vector is
adaptive-average-pooled to a common length, the deeper layer is resized
bilinearly to the shallower layer's grid, and the two layers are pooled together
into one vector per patch. PatchCore resizes the unfolded tensor before pooling;
both are linear maps on different axes, so the order does not change the result
beyond float rounding, and pooling first resizes 9x less data.

The resizing operator is a fixed linear map whose coefficients depend only on
static shapes, so it is built in numpy at trace time and applied with
full-precision matmuls; the pooling is a few sums of shifted maps per bin.
"""

from __future__ import annotations

import functools
import math
import operator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _neighbour_shifts(x: jax.Array) -> list[jax.Array]:
    """The 9 zero-padded shifts of `[B, h, w, C]`, in torch Unfold's (ky, kx) order."""
    if x.ndim != 4:
        raise ValueError(f"3x3 neighbourhoods need [B, h, w, C], got shape {x.shape}")
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Plain shifted slices rather than a patch convolution: exact on every backend.
    return [
        padded[:, ky : ky + height, kx : kx + width, :]
        for ky in range(3)
        for kx in range(3)
    ]


def unfold_3x3(x: jax.Array) -> jax.Array:
    """3x3 neighbourhoods with zero padding 1 and stride 1, like `torch.nn.Unfold(3, padding=1)`.

    Args:
        x: features `[B, h, w, C]`.

    Returns:
        `[B, h, w, C * 9]`; each vector is flattened channel-major, then (ky, kx),
        which is the order torch's Unfold uses for its `C * 9` axis.
    """
    return _unfolded(_neighbour_shifts(x))


def _unfolded(shifts: list[jax.Array]) -> jax.Array:
    """The 9 shifts `[B, h, w, C]` as `[B, h, w, C * 9]`, C-major, then (ky, kx)."""
    batch, height, width, channels = shifts[0].shape
    stacked = jnp.stack(shifts, axis=-1)  # [B, h, w, C, 9]
    return stacked.reshape(batch, height, width, channels * 9)


def pooled_neighbourhoods(x: jax.Array, out: int) -> jax.Array:
    """`adaptive_avg_pool_1d(unfold_3x3(x), out)`, PatchCore's `MeanMapper` of one layer.

    Where the bins tile each channel's 9 neighbours alike (WRN-50: one bin of 9
    for layer3, two of 5 for layer2), every bin is a sum of shifted maps and the
    9x larger unfolded tensor is never built.

    Args:
        x: features `[B, h, w, C]`.
        out: pooled length O.

    Returns:
        `[B, h, w, O]`.
    """
    shifts = _neighbour_shifts(x)
    channels, out = int(x.shape[-1]), int(out)
    _check_pool_sizes(channels * 9, out)
    periods, bounds = _period_bins(channels * 9, out)
    if periods != channels or len(bounds) > _MAX_SLICED_BINS:
        return adaptive_avg_pool_1d(_unfolded(shifts), out)
    means = [
        functools.reduce(operator.add, shifts[start:end]) / (end - start)
        for start, end in bounds
    ]
    return jnp.stack(means, axis=-1).reshape(*x.shape[:3], out)


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The `[out, in]` 1-D linear interpolation matrix of `F.interpolate(align_corners=False)`.

    PyTorch maps output index d to source coordinate (d + 0.5) * in / out - 0.5,
    clamps negative coordinates to 0 and never antialiases.
    """
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for dst in range(out_size):
        src = max((dst + 0.5) * scale - 0.5, 0.0)
        lo = min(int(np.floor(src)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        matrix[dst, lo] += 1.0 - frac
        matrix[dst, hi] += frac
    return matrix.astype(np.float32)


def upsample_bilinear(u: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize (PyTorch `align_corners=False`, no antialias) of every channel.

    Args:
        u: features `[B, h, w, C]`.
        size: target spatial size `(H, W)`.

    Returns:
        `[B, H, W, C]`, each channel resized independently, as
        `F.interpolate(mode="bilinear")` resizes a `[B * C, h, w]` view.
    """
    if u.ndim != 4:
        raise ValueError(f"upsample_bilinear expects [B, h, w, C], got shape {u.shape}")
    out_h, out_w = (int(s) for s in size)
    rows = jnp.asarray(_bilinear_matrix(u.shape[1], out_h))
    cols = jnp.asarray(_bilinear_matrix(u.shape[2], out_w))
    resized = jnp.einsum("Hh,bhwc->bHwc", rows, u, precision=_HIGHEST)
    return jnp.einsum("Ww,bhwc->bhWc", cols, resized, precision=_HIGHEST)


def _check_pool_sizes(length: int, out: int) -> None:
    if length < 1 or out < 1:
        raise ValueError(f"adaptive pool needs positive sizes, got L={length}, O={out}")


@functools.lru_cache(maxsize=64)
def adaptive_pool_matrix(length: int, out: int) -> np.ndarray:
    """The `[length, out]` averaging matrix of PyTorch's `adaptive_avg_pool1d`.

    Bin i averages the half-open range [floor(i * L / O), ceil((i + 1) * L / O));
    neighbouring bins may overlap when O does not divide L.

    Args:
        length: input length L.
        out: output length O.

    Returns:
        float32 matrix M with `v @ M` equal to the pooled vector.
    """
    _check_pool_sizes(length, out)
    matrix = np.zeros((length, out), dtype=np.float64)
    for i in range(out):
        start = (i * length) // out
        end = -((-(i + 1) * length) // out)  # integer ceil, no float rounding
        matrix[start:end, i] = 1.0 / (end - start)
    return matrix.astype(np.float32)


# Above this many bins per period, slicing costs more than the matrix product.
_MAX_SLICED_BINS = 8


def _period_bins(length: int, out: int) -> tuple[int, list[tuple[int, int]]]:
    """Number of periods and the (start, end) of each bin in one period.

    The bins repeat every `length // g` inputs and `out // g` outputs, with
    `g = gcd(length, out)`, so one period's bounds describe them all.
    """
    periods = math.gcd(length, out)
    period_in, period_out = length // periods, out // periods
    bounds = [
        ((i * period_in) // period_out, -((-(i + 1) * period_in) // period_out))
        for i in range(period_out)
    ]
    return periods, bounds


def adaptive_avg_pool_1d(v: jax.Array, out: int) -> jax.Array:
    """PyTorch's `adaptive_avg_pool1d` over the last axis.

    Computed as slice means over the bins' period (9216 -> 1024: one mean of 9;
    4608 -> 1024: two overlapping means of 5), which costs a few sums per bin
    where the averaging matrix costs a `[L, O]` product per vector, as much as
    the nearest-neighbour search in PatchCore's paper setting. Periods with
    more than `_MAX_SLICED_BINS` bins use the matrix.

    Args:
        v: array `[..., L]`.
        out: output length O.

    Returns:
        `[..., O]` bin means.
    """
    length, out = int(v.shape[-1]), int(out)
    _check_pool_sizes(length, out)
    periods, bounds = _period_bins(length, out)
    if len(bounds) > _MAX_SLICED_BINS:
        matrix = jnp.asarray(adaptive_pool_matrix(length, out))
        return jnp.matmul(v, matrix, precision=_HIGHEST)
    grouped = v.reshape(*v.shape[:-1], periods, length // periods)
    means = [jnp.mean(grouped[..., start:end], axis=-1) for start, end in bounds]
    return jnp.stack(means, axis=-1).reshape(*v.shape[:-1], out)


def patch_features(
    layer2: jax.Array,
    layer3: jax.Array,
    pretrain_dim: int = 1024,
    target_dim: int = 1024,
) -> jax.Array:
    """PatchCore's aggregated locally aware patch features (spec §1.3).

    Args:
        layer2: shallower features `[B, h2, w2, C2]`.
        layer3: deeper features `[B, h3, w3, C3]`.
        pretrain_dim: per-layer length after `MeanMapper` (PatchCore's
            `pretrain_embed_dimension`).
        target_dim: final length after the `Aggregator`
            (`target_embed_dimension`).

    Returns:
        `[B, h2 * w2, target_dim]`, patches row-major over (h2, w2).
    """
    if layer2.ndim != 4 or layer3.ndim != 4 or layer2.shape[0] != layer3.shape[0]:
        raise ValueError(
            "patch_features expects layer2 [B, h2, w2, C2] and layer3 "
            f"[B, h3, w3, C3] with the same B, got {layer2.shape} and {layer3.shape}"
        )
    batch, height, width, _ = layer2.shape
    # The neighbourhood is taken at layer3 resolution (unfold before upsampling).
    # Pooling along the feature axis and resizing along the spatial axes are
    # linear maps on different axes, so they commute: resizing the pooled layer3
    # equals PatchCore's resizing of the 9x larger unfolded tensor.
    pooled2 = pooled_neighbourhoods(layer2, pretrain_dim)
    pooled3 = upsample_bilinear(
        pooled_neighbourhoods(layer3, pretrain_dim), (height, width)
    )
    # Stacking [N, 2, D] then flattening equals concatenating along the last axis.
    stacked = jnp.concatenate([pooled2, pooled3], axis=-1)
    return adaptive_avg_pool_1d(stacked.reshape(batch, height * width, -1), target_dim)


def torch_linear_init(key, shape, dtype=jnp.float32):
    """PyTorch's default `nn.Linear` init for a Flax `[in, out]` kernel or `[out]` bias.

    Both are U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)
    for the weight). For the bias the fan-in is not in its shape, so
    `Modulation` passes it explicitly through `_bias_init`.
    """
    bound = 1.0 / np.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _bias_init(fan_in: int):
    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / np.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Modulation(nn.Module):
    """ReConPatch's representation layer f (linear) and projection layer g (linear).

    `r = f(p)` is the modulated patch feature that goes into the memory bank;
    `z = g(r)` is only used by the contrastive loss during training (spec §2.1).

    Attributes:
        feature_dim: output size of f (512 for WRN-50, 384 per ensemble model).
        projection_dim: output size of g (128; the paper does not state it).
    """

    feature_dim: int = 512
    projection_dim: int = 128

    def _dense(self, features: int, fan_in: int, name: str) -> nn.Dense:
        return nn.Dense(
            features,
            kernel_init=torch_linear_init,
            bias_init=_bias_init(fan_in),
            precision=_HIGHEST,
            name=name,
        )

    @nn.compact
    def __call__(self, p: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns `(r, z) = (f(p), g(f(p)))` for patch features `p [..., C']`."""
        r = self._dense(self.feature_dim, p.shape[-1], "f")(p)
        z = self._dense(self.projection_dim, self.feature_dim, "g")(r)
        return r, z


def represent(head_params, p: jax.Array) -> jax.Array:
    """`f(p)` from the parameters of a `Modulation` (g is not needed)."""
    kernel, bias = head_params["f"]["kernel"], head_params["f"]["bias"]
    return jnp.matmul(p, kernel, precision=_HIGHEST) + bias
