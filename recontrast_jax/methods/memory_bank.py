"""PatchCore memory bank: coreset subsampling, nearest neighbours, reweighting.

Implements ReConPatch spec sections 1.4, 1.5 and 2.6 in JAX (``float32``):

* ``approximate_greedy_coreset``: PatchCore's ``ApproximateGreedyCoresetSampler``
  (random projection to 128 dimensions, 10 random start points whose mean
  distance initialises the anchor distances, then greedy k-center). It keeps one
  ``[N]`` vector of minimum distances inside a single ``lax.fori_loop`` and never
  builds an ``N x N`` matrix.
* ``exact_greedy_coreset``: PatchCore's ``GreedyCoresetSampler`` (full distance
  matrix; small ``N`` only, used as a reference in tests).
* ``nearest_neighbors``: exact k-NN search in blocks whose distance matrix stays
  under a memory budget.
* ``reweighted_image_score``: PatchCore Eq. 7 / ReConPatch Eq. 10 softmax
  reweighting as anomalib implements it (arg-max patch only), with a per-patch
  option.

All distances are true Euclidean distances ``sqrt(max(|a|^2 - 2ab + |b|^2, 0))``,
as in PatchCore's sampler and anomalib's scorer (faiss would give squared L2).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Full float32 accuracy for the distance matmuls; on TPU the default precision
# (bf16 passes) would make the greedy argmax pick different points.
_PRECISION = jax.lax.Precision.HIGHEST

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 1024 * 1024


def _squared_norms(x: jax.Array) -> jax.Array:
    return jnp.sum(x * x, axis=-1)


def _euclidean(
    a: jax.Array, b: jax.Array, a_sq: jax.Array, b_sq: jax.Array
) -> jax.Array:
    """Pairwise distances ``[A, B]`` from precomputed squared norms."""
    cross = jnp.matmul(a, b.T, precision=_PRECISION)
    return jnp.sqrt(jnp.maximum(a_sq[:, None] - 2.0 * cross + b_sq[None, :], 0.0))


def coreset_size(num_features: int, ratio: float) -> int:
    """Number of coreset samples, ``int(N * ratio)`` as in PatchCore.

    Args:
      num_features: Number of feature rows ``N``.
      ratio: Fraction of rows to keep, in ``(0, 1]``.

    Returns:
      The number of rows the sampler selects.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return int(num_features * ratio)


def coreset_projection(
    key: jax.Array, feature_dim: int, projection_dim: int = 128
) -> jax.Array | None:
    """Random projection matrix like a fresh ``torch.nn.Linear(D, 128, bias=False)``.

    PyTorch's default Kaiming-uniform init (``a=sqrt(5)``) draws the weights from
    ``U(-1/sqrt(D), 1/sqrt(D))``. The matrix is returned transposed (``[D, P]``)
    so that ``features @ matrix`` projects.

    Args:
      key: PRNG key.
      feature_dim: Input dimension ``D``.
      projection_dim: Output dimension (128 in PatchCore).

    Returns:
      A ``[D, projection_dim]`` float32 matrix, or ``None`` if
      ``feature_dim == projection_dim`` (PatchCore then skips the projection).
    """
    if feature_dim == projection_dim:
        return None
    bound = 1.0 / math.sqrt(feature_dim)
    return jax.random.uniform(
        key, (feature_dim, projection_dim), jnp.float32, -bound, bound
    )


def coreset_start_indices(
    key: jax.Array, num_features: int, num_starts: int = 10
) -> jax.Array:
    """Distinct random start points, like ``np.random.choice(N, 10, replace=False)``.

    Args:
      key: PRNG key.
      num_features: Number of feature rows ``N``.
      num_starts: Number of start points; clipped to ``N``.

    Returns:
      ``[min(num_starts, N)]`` int32 indices.
    """
    count = min(num_starts, num_features)
    return jax.random.choice(key, num_features, (count,), replace=False).astype(
        jnp.int32
    )


def _greedy_k_center(
    points: jax.Array, initial_anchor: jax.Array, num_samples: int
) -> jax.Array:
    """Greedy k-center: ``num_samples`` times argmax, then min-update the anchors."""
    sq_norms = _squared_norms(points)

    def body(i, state):
        anchor, selected = state
        chosen = jnp.argmax(anchor)
        cross = jnp.matmul(points, points[chosen], precision=_PRECISION)
        dist = jnp.sqrt(jnp.maximum(sq_norms - 2.0 * cross + sq_norms[chosen], 0.0))
        return jnp.minimum(anchor, dist), selected.at[i].set(chosen.astype(jnp.int32))

    selected = jnp.zeros((num_samples,), jnp.int32)
    _, selected = jax.lax.fori_loop(0, num_samples, body, (initial_anchor, selected))
    return selected


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _approximate_greedy_indices(
    features: jax.Array,
    projection: jax.Array | None,
    start_indices: jax.Array,
    num_samples: int,
) -> jax.Array:
    points = features
    if projection is not None:
        points = jnp.matmul(features, projection, precision=_PRECISION)
    starts = points[start_indices]
    start_dists = _euclidean(
        points, starts, _squared_norms(points), _squared_norms(starts)
    )
    # PatchCore initialises with the MEAN distance to the start points; the
    # start points themselves are not added to the coreset.
    initial_anchor = jnp.mean(start_dists, axis=1)
    return _greedy_k_center(points, initial_anchor, num_samples)


def approximate_greedy_coreset(
    features: jax.Array,
    ratio: float,
    key: jax.Array | None = None,
    projection_dim: int = 128,
    num_starts: int = 10,
    projection: jax.Array | None = None,
    start_indices: jax.Array | None = None,
) -> jax.Array:
    """PatchCore's ``ApproximateGreedyCoresetSampler`` (spec section 1.4).

    Memory is ``O(N * (D + projection_dim))``: the greedy loop keeps one ``[N]``
    vector of minimum distances and computes one matrix-vector product per
    selected point.

    Args:
      features: ``[N, D]`` patch features.
      ratio: Fraction of rows to select; ``int(N * ratio)`` indices are returned.
      key: PRNG key for the projection and the start points. May be ``None``
        only if both ``projection`` (or ``D == projection_dim``) and
        ``start_indices`` are given.
      projection_dim: Dimension of the random projection (128 in PatchCore).
      num_starts: Number of random start points (10 in PatchCore).
      projection: Optional ``[D, projection_dim]`` matrix to use instead of a
        random one (for reproducing a reference run or testing).
      start_indices: Optional start point indices to use instead of random ones.

    Returns:
      ``[int(N * ratio)]`` int32 indices into ``features`` in selection order.
      The bank is ``features[indices]`` (the unprojected rows).
    """
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    num_features, feature_dim = features.shape
    num_samples = coreset_size(num_features, ratio)
    if key is None and (
        start_indices is None or (projection is None and feature_dim != projection_dim)
    ):
        raise ValueError(
            "approximate_greedy_coreset needs a PRNG key unless both the "
            "projection and the start indices are given"
        )
    if key is not None:
        projection_key, start_key = jax.random.split(key)
    if projection is None:
        projection = (
            None
            if feature_dim == projection_dim
            else coreset_projection(projection_key, feature_dim, projection_dim)
        )
    elif projection.shape[0] != feature_dim:
        raise ValueError(
            f"projection has {projection.shape[0]} input rows but features have "
            f"dimension {feature_dim}"
        )
    if start_indices is None:
        start_indices = coreset_start_indices(start_key, num_features, num_starts)
    if num_samples == 0:
        return jnp.zeros((0,), jnp.int32)
    return _approximate_greedy_indices(
        features,
        None if projection is None else jnp.asarray(projection, jnp.float32),
        jnp.asarray(start_indices, jnp.int32),
        num_samples,
    )


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _exact_greedy_indices(features: jax.Array, num_samples: int) -> jax.Array:
    sq_norms = _squared_norms(features)
    distances = _euclidean(features, features, sq_norms, sq_norms)
    # GreedyCoresetSampler starts from the row norms of the full distance matrix.
    initial_anchor = jnp.linalg.norm(distances, axis=1)
    return _greedy_k_center(features, initial_anchor, num_samples)


def exact_greedy_coreset(features: jax.Array, ratio: float) -> jax.Array:
    """PatchCore's ``GreedyCoresetSampler`` (no projection, full distance matrix).

    Builds an ``N x N`` matrix once for the initial anchors, so it is meant for
    small ``N`` (tests and reference runs) only.

    Args:
      features: ``[N, D]`` features.
      ratio: Fraction of rows to select.

    Returns:
      ``[int(N * ratio)]`` int32 indices in selection order.
    """
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    num_samples = coreset_size(features.shape[0], ratio)
    if num_samples == 0:
        return jnp.zeros((0,), jnp.int32)
    return _exact_greedy_indices(features, num_samples)


def knn_chunk_sizes(
    num_queries: int, bank_size: int, k: int, memory_budget_bytes: int
) -> tuple[int, int]:
    """Block sizes so that one ``[query_chunk, bank_chunk]`` float32 block fits.

    Args:
      num_queries: Number of query rows ``Q``.
      bank_size: Number of bank rows ``M``.
      k: Number of neighbours (a bank block holds at least ``k`` rows).
      memory_budget_bytes: Budget for the largest distance block.

    Returns:
      ``(query_chunk, bank_chunk)``.
    """
    max_elements = max(1, memory_budget_bytes // 4)
    bank_chunk = min(bank_size, max(k, max_elements))
    query_chunk = max(1, min(num_queries, max_elements // bank_chunk))
    return query_chunk, bank_chunk


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    pad = -x.shape[0] % multiple
    return jnp.pad(x, ((0, pad), (0, 0)))


@functools.partial(
    jax.jit, static_argnames=("k", "query_chunk", "bank_chunk", "squared")
)
def _chunked_knn(
    queries: jax.Array,
    bank: jax.Array,
    k: int,
    query_chunk: int,
    bank_chunk: int,
    squared: bool,
) -> tuple[jax.Array, jax.Array]:
    num_queries, dim = queries.shape
    bank_size = bank.shape[0]
    query_blocks = _pad_rows(queries, query_chunk).reshape(-1, query_chunk, dim)
    bank_blocks = _pad_rows(bank, bank_chunk).reshape(-1, bank_chunk, dim)
    num_bank_blocks = bank_blocks.shape[0]
    bank_sq = _squared_norms(bank_blocks)
    bank_ids = jnp.arange(num_bank_blocks * bank_chunk, dtype=jnp.int32).reshape(
        num_bank_blocks, bank_chunk
    )
    block_k = min(k, bank_chunk)
    padded = num_bank_blocks * bank_chunk > bank_size

    def block_nearest(query_block, query_sq, rows, rows_sq, ids):
        cross = jnp.matmul(query_block, rows.T, precision=_PRECISION)
        dist_sq = jnp.maximum(query_sq[:, None] - 2.0 * cross + rows_sq, 0.0)
        if padded:  # padding rows must never be chosen
            dist_sq = jnp.where(ids < bank_size, dist_sq, jnp.inf)
        return _smallest(dist_sq, ids, block_k)

    def scan_bank_blocks(query_block, query_sq):
        def merge_bank_block(best, block):
            best_sq, best_ids = best
            block_sq, block_ids = block_nearest(query_block, query_sq, *block)
            # Earlier (lower-index) candidates come first so ties keep them.
            cand_sq = jnp.concatenate([best_sq, block_sq], axis=1)
            cand_ids = jnp.concatenate([best_ids, block_ids], axis=1)
            return _smallest(cand_sq, cand_ids, k), None

        init = (
            jnp.full((query_chunk, k), jnp.inf, jnp.float32),
            jnp.zeros((query_chunk, k), jnp.int32),
        )
        best, _ = jax.lax.scan(merge_bank_block, init, (bank_blocks, bank_sq, bank_ids))
        return best

    def search_query_block(query_block):
        query_sq = _squared_norms(query_block)
        if num_bank_blocks == 1:  # no loop: the runtimes see one plain product
            best_sq, best_ids = block_nearest(
                query_block, query_sq, bank_blocks[0], bank_sq[0], bank_ids[0]
            )
        else:
            best_sq, best_ids = scan_bank_blocks(query_block, query_sq)
        return (best_sq if squared else jnp.sqrt(best_sq)), best_ids

    if query_blocks.shape[0] == 1:
        distances, indices = search_query_block(query_blocks[0])
    else:
        distances, indices = jax.lax.map(search_query_block, query_blocks)
    distances = distances.reshape(-1, k)[:num_queries]
    indices = indices.reshape(-1, k)[:num_queries]
    return distances, indices


def _smallest(
    dist_sq: jax.Array, ids: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """The k smallest of each row and their ids, the lower index first on ties.

    A top_k even for k = 1: OpenVINO's ArgMin ran the paper-setting search 17%
    slower than its TopK.
    """
    neg_sq, local = jax.lax.top_k(-dist_sq, k)
    return -neg_sq, _take_ids(ids, local)


def _take_ids(ids: jax.Array, local: jax.Array) -> jax.Array:
    """`ids[local]` for one id row shared by all queries, or per query."""
    return ids[local] if ids.ndim == 1 else jnp.take_along_axis(ids, local, axis=1)


def nearest_neighbors(
    queries: jax.Array,
    bank: jax.Array,
    k: int = 1,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    squared: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Exact k-nearest-neighbour search with bounded temporary memory.

    Queries (and, if one query row against the whole bank is too large, bank
    rows) are processed in blocks so that the largest ``float32`` distance block
    stays under ``memory_budget_bytes``; partial top-k results are merged.

    Args:
      queries: ``[Q, D]`` query features.
      bank: ``[M, D]`` memory bank.
      k: Number of neighbours, ``1 <= k <= M``.
      memory_budget_bytes: Budget for the largest distance block.
      squared: Return squared L2 distances ``max(|q|^2 - 2 q.m + |m|^2, 0)``,
        as faiss ``IndexFlatL2`` does, instead of their square roots.

    Returns:
      ``(distances, indices)``, both ``[Q, k]``, sorted by increasing distance.
    """
    queries = jnp.asarray(queries, jnp.float32)
    bank = jnp.asarray(bank, jnp.float32)
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"queries [Q, D] and bank [M, D] must share D, got {queries.shape} "
            f"and {bank.shape}"
        )
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, {bank.shape[0]}] (bank size), got {k}")
    if queries.shape[0] == 0:
        return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
    query_chunk, bank_chunk = knn_chunk_sizes(
        queries.shape[0], bank.shape[0], k, memory_budget_bytes
    )
    return _chunked_knn(queries, bank, k, query_chunk, bank_chunk, squared)


def _support_with_self_first(
    anchor: jax.Array, bank: jax.Array, b: int, memory_budget_bytes: int
) -> jax.Array:
    """The ``b`` nearest bank entries of each ``bank[anchor]``, anchor first.

    anomalib relies on the kNN returning the anchor itself at position 0; with
    duplicate bank rows or float ties that can fail, so the anchor is put first
    explicitly (replacing the farthest neighbour if it was not returned).
    """
    _, support = nearest_neighbors(bank[anchor], bank, b, memory_budget_bytes)
    is_anchor = support == anchor[:, None]
    present = jnp.any(is_anchor, axis=1, keepdims=True)
    support = jnp.where(present, support, support.at[:, -1].set(anchor))
    rank = jnp.where(support == anchor[:, None], -1, jnp.arange(b))
    return jnp.take_along_axis(support, jnp.argsort(rank, axis=1), axis=1)


def _softmax_weights(
    queries: jax.Array, bank: jax.Array, support: jax.Array
) -> jax.Array:
    """``1 - softmax(D(query, bank[support]))[0]`` for each query row."""
    neighbours = bank[support]  # [n, b, D]
    dist = jnp.sqrt(
        jnp.maximum(jnp.sum((queries[:, None, :] - neighbours) ** 2, axis=-1), 0.0)
    )
    return 1.0 - jax.nn.softmax(dist, axis=1)[:, 0]


def reweighted_image_score(
    patch_scores: jax.Array,
    nn_indices: jax.Array,
    bank: jax.Array,
    query_features: jax.Array,
    b: int = 9,
    per_patch: bool = False,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
    """Image score with PatchCore's softmax reweighting (ReConPatch Eq. 10).

    For the arg-max patch ``t`` with nearest bank entry ``m*``, ``N_b(m*)`` is
    the ``b`` nearest bank entries of ``m*`` including ``m*`` itself, and
    ``s = (1 - softmax_{r in N_b(m*)}(D(p_t, r))[m*]) * D(p_t, m*)``, as in
    anomalib's ``compute_anomaly_score``. With ``per_patch=True`` every patch is
    reweighted this way and the image score is the maximum (ReConPatch
    reimplementation R3).

    Args:
      patch_scores: ``[B, P]`` (or ``[P]``) Euclidean 1-NN distances.
      nn_indices: ``[B, P]`` (or ``[P]``, or with a trailing ``k`` axis whose
        first column is used) bank index of each patch's nearest neighbour.
      bank: ``[M, D]`` memory bank.
      query_features: ``[B, P, D]`` (or ``[P, D]``) patch features.
      b: Neighbourhood size; clipped to ``M``. ``b == 1`` gives the plain max.
      per_patch: Reweight every patch instead of only the arg-max patch.
      memory_budget_bytes: Budget for the neighbour search inside the bank.

    Returns:
      ``[B]`` (or scalar for unbatched input) image scores.
    """
    patch_scores = jnp.asarray(patch_scores, jnp.float32)
    nn_indices = jnp.asarray(nn_indices, jnp.int32)
    bank = jnp.asarray(bank, jnp.float32)
    query_features = jnp.asarray(query_features, jnp.float32)
    unbatched = patch_scores.ndim == 1
    if unbatched:
        patch_scores = patch_scores[None]
        nn_indices = nn_indices[None]
        query_features = query_features[None]
    if nn_indices.ndim == 3:
        nn_indices = nn_indices[..., 0]
    if (
        patch_scores.ndim != 2
        or nn_indices.shape != patch_scores.shape
        or query_features.shape[:2] != patch_scores.shape
    ):
        raise ValueError(
            "expected patch_scores [B, P], nn_indices [B, P] and query_features "
            f"[B, P, D]; got {patch_scores.shape}, {nn_indices.shape} and "
            f"{query_features.shape}"
        )
    b = min(b, bank.shape[0])
    if b == 1:
        scores = jnp.max(patch_scores, axis=1)
    elif per_patch:
        batch, patches = patch_scores.shape
        anchors = nn_indices.reshape(-1)
        support = _support_with_self_first(anchors, bank, b, memory_budget_bytes)
        weights = _softmax_weights(
            query_features.reshape(batch * patches, -1), bank, support
        )
        scores = jnp.max(weights.reshape(batch, patches) * patch_scores, axis=1)
    else:
        top = jnp.argmax(patch_scores, axis=1)
        rows = jnp.arange(patch_scores.shape[0])
        anchors = nn_indices[rows, top]
        support = _support_with_self_first(anchors, bank, b, memory_budget_bytes)
        weights = _softmax_weights(query_features[rows, top], bank, support)
        scores = weights * patch_scores[rows, top]
    return scores[0] if unbatched else scores
