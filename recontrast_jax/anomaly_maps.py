"""Anomaly maps and image scores for ReContrast (spec section 4.1).

The reference computes, for every (encoder, decoder) feature pair, the map
``1 - cosine_similarity`` along channels, upsamples it with PyTorch's bilinear
``align_corners=True`` interpolation, sums the maps, and smooths the sum with
``scipy.ndimage.gaussian_filter(sigma=4)``. This module reproduces those steps in
JAX so that they run on the accelerator inside ``jax.jit``.

Resizing and blurring are expressed as products with small dense matrices that
are built with numpy when the function is traced (shapes are static). This is
exact (the matrices encode the reference's arithmetic, boundary handling
included), avoids gathers, and maps onto the matrix units of GPUs and TPUs.

All arrays are NHWC / BHW ``float32``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Full float32 accuracy for the interpolation/blur matmuls: the default precision
# on TPU (bf16 passes) would cost about three significant digits.
_PRECISION = jax.lax.Precision.HIGHEST

SCORE_RULES = ("max", "mean")


def cosine_similarity(
    a: jax.Array, b: jax.Array, axis: int = -1, eps: float = 1e-8
) -> jax.Array:
    """Cosine similarity as ``torch.nn.functional.cosine_similarity`` (torch 1.12).

    Computes ``sum(a*b) / sqrt(max(sum(a^2) * sum(b^2), eps^2))`` so that a zero
    vector gives similarity 0 instead of NaN.

    Args:
      a: array of any shape.
      b: array broadcastable against ``a``.
      axis: the axis that holds the vector components (channels).
      eps: lower bound of the product of the two norms.

    Returns:
      ``a`` and ``b`` broadcast together, with ``axis`` removed.
    """
    dot = jnp.sum(a * b, axis=axis)
    squared_norms = jnp.sum(a * a, axis=axis) * jnp.sum(b * b, axis=axis)
    return dot / jnp.sqrt(jnp.maximum(squared_norms, eps * eps))


@functools.lru_cache(maxsize=64)
def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) linear interpolation matrix with ``align_corners=True``."""
    if out_size == 1 or in_size == 1:
        # PyTorch uses scale 0 when out == 1; every output reads source pixel 0.
        source = np.zeros(out_size, dtype=np.float64)
    else:
        source = np.arange(out_size, dtype=np.float64) * (
            (in_size - 1) / (out_size - 1)
        )
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = source - lower
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - frac)
    np.add.at(matrix, (rows, upper), frac)
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def align_corners_resize(maps: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize with PyTorch ``align_corners=True`` semantics.

    ``jax.image.resize`` uses half-pixel centres and does not match the reference
    (spec 4.1), hence the explicit interpolation matrices.

    Args:
      maps: (B, h, w) array.
      out_hw: static output size (H, W).

    Returns:
      (B, H, W) float32 array.
    """
    if maps.ndim != 3:
        raise ValueError(
            f"align_corners_resize expects (B, h, w) maps, got {maps.shape}"
        )
    out_h, out_w = (int(s) for s in out_hw)
    rows = jnp.asarray(_align_corners_matrix(maps.shape[1], out_h))
    cols = jnp.asarray(_align_corners_matrix(maps.shape[2], out_w))
    return jnp.einsum(
        "Hh,bhw,Ww->bHW", rows, maps.astype(jnp.float32), cols, precision=_PRECISION
    )


def _gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    """Normalised 1-D Gaussian weights, computed as scipy.ndimage does."""
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 / (sigma * sigma) * taps**2)
    return weights / weights.sum()


def _reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Maps any integer index into [0, size) with scipy's 'reflect' mode.

    The extension ``d c b a | a b c d | d c b a`` is periodic with period
    ``2 * size``; taking the index modulo the period also covers kernels wider
    than the image, where the reflection has to repeat.
    """
    folded = np.mod(index, 2 * size)
    return np.where(folded >= size, 2 * size - 1 - folded, folded)


@functools.lru_cache(maxsize=64)
def _blur_matrix(size: int, sigma: float, truncate: float) -> np.ndarray:
    """(size, size) matrix M such that ``M @ x`` is scipy's 1-D gaussian filter."""
    radius = int(truncate * sigma + 0.5)
    weights = _gaussian_kernel(sigma, radius)
    outputs = np.arange(size)[:, None]
    sources = _reflect_index(outputs + np.arange(-radius, radius + 1)[None, :], size)
    matrix = np.zeros((size, size), dtype=np.float64)
    np.add.at(matrix, (np.broadcast_to(outputs, sources.shape), sources), weights)
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def gaussian_blur(
    maps: jax.Array, sigma: float = 4.0, truncate: float = 4.0
) -> jax.Array:
    """Per-image 2-D Gaussian blur equal to ``scipy.ndimage.gaussian_filter``.

    Uses scipy's defaults: mode 'reflect' (numpy pad 'symmetric') and a kernel of
    radius ``int(truncate * sigma + 0.5)``. The boundary handling is folded into
    an (H, H) and a (W, W) matrix, so the blur is two matmuls.

    Args:
      maps: (B, H, W) array.
      sigma: static standard deviation in pixels; 0 returns ``maps`` unchanged.
      truncate: static kernel half-width in units of sigma.

    Returns:
      (B, H, W) float32 array.
    """
    if maps.ndim != 3:
        raise ValueError(f"gaussian_blur expects (B, H, W) maps, got {maps.shape}")
    if sigma < 0:
        raise ValueError(f"gaussian_blur needs sigma >= 0, got {sigma}")
    maps = maps.astype(jnp.float32)
    if sigma == 0:
        return maps
    rows = jnp.asarray(_blur_matrix(maps.shape[1], float(sigma), float(truncate)))
    cols = jnp.asarray(_blur_matrix(maps.shape[2], float(sigma), float(truncate)))
    return jnp.einsum("Hh,bhw,Ww->bHW", rows, maps, cols, precision=_PRECISION)


def distance_maps(
    encoder_features: Sequence[jax.Array],
    decoder_features: Sequence[jax.Array],
    out_hw: tuple[int, int],
) -> jax.Array:
    """Sum over feature pairs of the upsampled cosine distance (unblurred map).

    The reference sums (not averages) the maps of all pairs; with the 6 pairs of
    ReContrast the range is [0, 12] (spec 4.1, 6.10).

    Args:
      encoder_features: list of (B, h_i, w_i, C_i) target features.
      decoder_features: list of the same length and shapes, reconstructions.
      out_hw: static output size (H, W).

    Returns:
      (B, H, W) float32 array.
    """
    if len(encoder_features) != len(decoder_features) or not encoder_features:
        raise ValueError(
            "distance_maps needs two equally long, non-empty feature lists, got "
            f"{len(encoder_features)} encoder and {len(decoder_features)} decoder maps"
        )
    total = None
    for level, (enc, dec) in enumerate(
        zip(encoder_features, decoder_features, strict=True)
    ):
        if enc.shape != dec.shape:
            raise ValueError(
                f"feature pair {level} has mismatched shapes: encoder {enc.shape}, "
                f"decoder {dec.shape}"
            )
        distance = 1.0 - cosine_similarity(
            enc.astype(jnp.float32), dec.astype(jnp.float32), axis=-1
        )
        upsampled = align_corners_resize(distance, out_hw)
        total = upsampled if total is None else total + upsampled
    return total


MAP_RULES = ("sum", "mean_conv5")


def replace_border(maps: jax.Array, width: int) -> jax.Array:
    """Each of the outer `width` rows and columns replaced by the nearest inner one.

    Args:
      maps: (B, H, W) array.
      width: static; 0 returns `maps` unchanged.
    """
    if width == 0:
        return maps
    rows = np.clip(np.arange(maps.shape[1]), width, maps.shape[1] - 1 - width)
    cols = np.clip(np.arange(maps.shape[2]), width, maps.shape[2] - 1 - width)
    return maps[:, rows][:, :, cols]


def anomaly_map(
    encoder_features: Sequence[jax.Array],
    decoder_features: Sequence[jax.Array],
    out_hw: tuple[int, int],
    sigma: float = 4.0,
    rule: str = "sum",
    border: int = 0,
) -> jax.Array:
    """Blurred anomaly map of the feature pairs.

    Args:
      encoder_features: list of (B, h_i, w_i, C_i) target features.
      decoder_features: list of the same length and shapes, reconstructions.
      out_hw: static output size (H, W).
      sigma: static blur sigma in output pixels (0 disables the blur).
      rule: 'sum': ``gaussian_blur(distance_maps(...), sigma)`` (``evaluation``,
        spec 4.1); 'mean_conv5': the mean over the pairs blurred by
        `gaussian_conv5` (the multi-class ``evaluation_batch``, spec 4.3).
      border: static; the unblurred map's outer `border` pixels are replaced
        by the nearest inner ones (`replace_border`; 0 = the reference).

    Returns:
      (B, H, W) float32 array.
    """
    if rule not in MAP_RULES:
        raise ValueError(
            f"eval.map_rule must be one of {', '.join(MAP_RULES)}; got {rule!r}"
        )
    total = replace_border(
        distance_maps(encoder_features, decoder_features, out_hw), border
    )
    if rule == "sum":
        return gaussian_blur(total, sigma)
    return gaussian_conv5(total / len(encoder_features), sigma)


@functools.lru_cache(maxsize=64)
def _zero_padded_blur_matrix(size: int, sigma: float, radius: int) -> np.ndarray:
    """(size, size) matrix of a 1-D Gaussian conv with zero padding ``radius``."""
    weights = _gaussian_kernel(sigma, radius)
    matrix = np.zeros((size, size), dtype=np.float64)
    for offset, weight in zip(range(-radius, radius + 1), weights, strict=True):
        matrix += weight * np.eye(size, k=offset)
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def gaussian_conv5(maps: jax.Array, sigma: float = 4.0) -> jax.Array:
    """The multi-class scripts' blur: a 5x5 Gaussian ``Conv2d``, zero padding 2.

    Their kernel is ``exp(-|xy - 2|^2 / (2 sigma^2))`` over the 5x5 grid,
    normalised to sum 1, which is the outer product of the normalised 1-D
    kernel; so it is two banded matmuls here.

    Args:
      maps: (B, H, W) array.
      sigma: static standard deviation in pixels.

    Returns:
      (B, H, W) float32 array.
    """
    if maps.ndim != 3:
        raise ValueError(f"gaussian_conv5 expects (B, H, W) maps, got {maps.shape}")
    maps = maps.astype(jnp.float32)
    rows = jnp.asarray(_zero_padded_blur_matrix(maps.shape[1], float(sigma), 2))
    cols = jnp.asarray(_zero_padded_blur_matrix(maps.shape[2], float(sigma), 2))
    return jnp.einsum("Hh,bhw,Ww->bHW", rows, maps, cols, precision=_PRECISION)


def image_scores(
    maps: jax.Array, rule: str = "max", max_ratio: float = 0.0
) -> jax.Array:
    """Reduces anomaly maps to one score per image.

    Args:
      maps: (B, H, W) array.
      rule: 'max' (segmentation datasets, APTOS, OCT) or 'mean' (ISIC).
      max_ratio: static, only for rule 'max'. If > 0 the score is the mean of the
        top ``int(H * W * max_ratio)`` pixels (reference ``max_ratio``; 655
        pixels for 256x256 and 0.01). At least one pixel is used; the reference
        would silently average the whole map when that count rounds to 0.

    Returns:
      (B,) float32 array.
    """
    if rule not in SCORE_RULES:
        raise ValueError(
            f"unknown image score rule {rule!r}; allowed rules are {SCORE_RULES}"
        )
    if not 0.0 <= max_ratio <= 1.0:
        raise ValueError(f"max_ratio must be in [0, 1], got {max_ratio}")
    if maps.ndim != 3:
        raise ValueError(f"image_scores expects (B, H, W) maps, got {maps.shape}")
    flat = maps.reshape(maps.shape[0], -1).astype(jnp.float32)
    if rule == "mean":
        return jnp.mean(flat, axis=1)
    if max_ratio == 0:
        return jnp.max(flat, axis=1)
    count = max(int(flat.shape[1] * max_ratio), 1)
    top_values, _ = jax.lax.top_k(flat, count)
    return jnp.mean(top_values, axis=1)
