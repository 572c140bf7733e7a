"""ReConPatch pseudo-labels and relaxed contrastive loss (spec sections 2.2-2.4).

All functions work on one batch of N patch embeddings and build dense N x N
matrices, which is cheap for the batch sizes ReConPatch uses (N <= 4096).

* Eq. 1, pairwise similarity: `exp(-||zi - zj||^2 / sigma)` on the EMA (target)
  projections. By default the projections are L2-normalised first (as in the
  original relaxed contrastive loss); on raw 128-d projections `exp(-d^2)` is ~0
  for almost every pair. This is a recorded deviation, switchable with
  `normalize=False`.
* Eqs. 2-5, contextual similarity: k-nearest-neighbour overlap, averaged over the
  reciprocal `k // 2` neighbours (query expansion) and symmetrised. Neighbours are
  Euclidean on the *raw* target projections, each point is its own nearest
  neighbour, and the sets contain exactly k members (`lax.top_k`, no ties).
* Eq. 6, combined label `alpha * w_P + (1 - alpha) * w_C` (no gradient).
* Eq. 7, relaxed contrastive loss on the online projections with relative
  distances `delta_ij = ||zi - zj|| / mean_n ||zi - zn||`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Floor under squared distances before the square root: keeps the gradient of
# the distance finite for duplicate points (sqrt has an infinite slope at 0).
_SQ_DIST_EPS = 1e-12
_NORM_EPS = 1e-12


def squared_distances(z: jax.Array) -> jax.Array:
    """Squared Euclidean distances between all rows, with an exact zero diagonal.

    Uses `|a|^2 + |b|^2 - 2 a.b` (O(N^2) memory instead of O(N^2 d)); rounding
    can make it slightly negative, so it is clamped at 0.

    Args:
      z: (N, d) embeddings.

    Returns:
      (N, N) squared distances.
    """
    sq_norms = jnp.sum(z * z, axis=-1)
    sq = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (z @ z.T)
    sq = jnp.maximum(sq, 0.0)
    return jnp.where(jnp.eye(z.shape[0], dtype=bool), 0.0, sq)


def _check_batch(z: jax.Array, name: str) -> None:
    if z.ndim != 2:
        raise ValueError(f"{name} must have shape (N, d), got shape {z.shape}.")


def _l2_normalize(z: jax.Array) -> jax.Array:
    norms = jnp.linalg.norm(z, axis=-1, keepdims=True)
    return z / jnp.maximum(norms, _NORM_EPS)


def pairwise_similarity(
    z_target: jax.Array, sigma: float = 1.0, normalize: bool = True
) -> jax.Array:
    """Eq. 1: Gaussian-kernel similarity `exp(-||zi - zj||^2 / sigma)`.

    Args:
      z_target: (N, d) target (EMA) projections.
      sigma: kernel bandwidth.
      normalize: L2-normalise the rows first (so d^2 is in [0, 4]); the spec's
        recommended deviation from the raw projections of the paper.

    Returns:
      (N, N) similarities in (0, 1], 1 on the diagonal.
    """
    _check_batch(z_target, "z_target")
    z = _l2_normalize(z_target) if normalize else z_target
    return jnp.exp(-squared_distances(z) / sigma)


def knn_mask(z: jax.Array, k: int) -> jax.Array:
    """0/1 matrix whose row i marks the exactly-k nearest neighbours of row i.

    Every point is its own first neighbour (distance 0); its diagonal entry is
    ranked ahead of exact duplicates so that it is always selected. Ties among
    other points are broken by `lax.top_k` (lowest index first), so each row
    holds exactly k ones.

    Args:
      z: (N, d) embeddings.
      k: number of neighbours, self included; 1 <= k <= N.

    Returns:
      (N, N) float mask, `mask[i, j] = 1` iff j is in N_k(i).
    """
    _check_batch(z, "z")
    n = z.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}] for the kNN mask, got k={k}.")
    sq = squared_distances(z)
    # Self gets a score above any real distance so duplicates cannot displace it.
    sq = jnp.where(jnp.eye(n, dtype=bool), -1.0, sq)
    _, idx = lax.top_k(-sq, k)
    rows = jnp.arange(n)[:, None]
    return jnp.zeros((n, n), z.dtype).at[rows, idx].set(1.0)


def reciprocal_neighbours(z: jax.Array, k: int) -> jax.Array:
    """Eq. 3: R_k(i) = {j : j in N_k(i) and i in N_k(j)} as a 0/1 matrix.

    Args:
      z: (N, d) embeddings.
      k: neighbourhood size, self included.

    Returns:
      (N, N) symmetric float mask with ones on the diagonal.
    """
    mask = knn_mask(z, k)
    return mask * mask.T


def contextual_similarity(z_target: jax.Array, k: int = 5) -> jax.Array:
    """Eqs. 2-5: contextual similarity from shared and reciprocal neighbours.

    * Eq. 2: `w~_ij = |N_k(i) & N_k(j)| / k` if j in N_k(i), else 0.
    * Eq. 4: `w^_ij = mean over l in R_{k/2}(i) of w~_lj`, with the reciprocal
      neighbourhood size `k // 2` rounded down and at least 1 (k=5 gives 2:
      the point itself and its nearest reciprocal neighbour).
    * Eq. 5: `w_C = (w^ + w^.T) / 2`.

    Args:
      z_target: (N, d) target (EMA) projections; neighbours are Euclidean on them.
      k: neighbourhood size, self included.

    Returns:
      (N, N) symmetric similarities in [0, 1].
    """
    neighbours = knn_mask(z_target, k)
    shared = neighbours @ neighbours.T
    w_tilde = shared / k * neighbours
    reciprocal = reciprocal_neighbours(z_target, max(k // 2, 1))
    # The diagonal of `reciprocal` is 1, so the row counts are >= 1.
    w_hat = (reciprocal @ w_tilde) / jnp.sum(reciprocal, axis=1, keepdims=True)
    return 0.5 * (w_hat + w_hat.T)


def reconpatch_labels(
    z_target: jax.Array,
    alpha: float = 0.5,
    sigma: float = 1.0,
    k: int = 5,
    normalize: bool = True,
) -> jax.Array:
    """Eq. 6: pseudo-labels `alpha * w_P + (1 - alpha) * w_C`, without gradient.

    Args:
      z_target: (N, d) target (EMA) projections.
      alpha: weight of the pairwise term, in [0, 1].
      sigma: bandwidth of the pairwise Gaussian kernel.
      k: neighbourhood size of the contextual term.
      normalize: L2-normalise the projections for the pairwise term only.

    Returns:
      (N, N) labels in [0, 1].
    """
    z_target = lax.stop_gradient(z_target)
    pairwise = pairwise_similarity(z_target, sigma=sigma, normalize=normalize)
    contextual = contextual_similarity(z_target, k=k)
    return lax.stop_gradient(alpha * pairwise + (1.0 - alpha) * contextual)


def relative_distances(z: jax.Array) -> jax.Array:
    """`delta_ij = ||zi - zj|| / mean_n ||zi - zn||`, exactly 0 on the diagonal.

    The row mean includes n = i and is differentiated through (as in the
    original relaxed contrastive loss). Off the diagonal the distance is
    `sqrt(max(d^2, eps))`, whose gradient stays finite for duplicate points.

    Args:
      z: (N, d) online projections.

    Returns:
      (N, N) relative distances.
    """
    off_diagonal = 1.0 - jnp.eye(z.shape[0], dtype=z.dtype)
    dist = jnp.sqrt(jnp.maximum(squared_distances(z), _SQ_DIST_EPS)) * off_diagonal
    row_mean = jnp.mean(dist, axis=1, keepdims=True)
    return dist / jnp.maximum(row_mean, _NORM_EPS)


def relaxed_contrastive_loss(
    z_online: jax.Array, weights: jax.Array, margin: float = 1.0
) -> jax.Array:
    """Eq. 7: `(1/N) sum_{i != j} [w d^2 + (1 - w) max(m - d, 0)^2]`, d = delta_ij.

    The diagonal (i == j) is left out; its term `(1 - w_ii) m^2` is a constant
    with zero gradient, so this changes only the loss value, not training.

    Args:
      z_online: (N, d) online projections.
      weights: (N, N) pseudo-labels in [0, 1]; no gradient flows into them.
      margin: margin m of the repulsive term.

    Returns:
      Scalar loss.
    """
    _check_batch(z_online, "z_online")
    n = z_online.shape[0]
    if weights.shape != (n, n):
        raise ValueError(
            f"weights must have shape ({n}, {n}) to match z_online, "
            f"got {weights.shape}."
        )
    weights = lax.stop_gradient(weights)
    delta = relative_distances(z_online)
    attract = weights * delta**2
    repel = (1.0 - weights) * jnp.maximum(margin - delta, 0.0) ** 2
    off_diagonal = 1.0 - jnp.eye(n, dtype=z_online.dtype)
    return jnp.sum((attract + repel) * off_diagonal) / n
