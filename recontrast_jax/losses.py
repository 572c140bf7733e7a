"""ReContrast's global cosine loss with hard mining (spec section 2).

For each level the loss is `mean_b(1 - cos(flatten(target_b), flatten(recon_b)))`
and its value is never masked. Hard mining acts on the *gradient* only: points
whose channel-wise cosine distance is below `mean + alpha * std` (unbiased std
over all B*H*W points of the level) get their gradient multiplied by `factor`
(0 in the paper), exactly as the authors' backward hook does. The hook is
reproduced with `b_eff = stop_gradient(b) + (b - stop_gradient(b)) * w`, which has
the value of `b` and the gradient of `b` scaled by `w`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from recontrast_jax.anomaly_maps import cosine_similarity


def hard_mining_weights(target: jax.Array, recon: jax.Array, alpha) -> jax.Array:
    """1 where a point keeps its gradient (distance >= threshold), else 0.

    Args:
      target: (B, H, W, C) features.
      recon: (B, H, W, C) reconstruction.
      alpha: threshold factor in `mean + alpha * std`.

    Returns:
      (B, H, W, 1) float mask, gradient-free.
    """
    distance = jax.lax.stop_gradient(1.0 - cosine_similarity(target, recon))
    threshold = jnp.mean(distance) + alpha * jnp.std(distance, ddof=1)
    return (distance >= threshold).astype(recon.dtype)[..., None]


def global_cosine_hard_mining(
    targets: Sequence[jax.Array],
    recons: Sequence[jax.Array],
    alpha,
    factor: float = 0.0,
) -> jax.Array:
    """Sum over levels of the global cosine distance, with hard-mined gradients.

    Args:
      targets: per-level (B, H, W, C) targets (gradients are stopped).
      recons: per-level reconstructions of the same shapes.
      alpha: hard-mining threshold factor (see `alpha_schedule`).
      factor: gradient multiplier for easy points (0 drops them).

    Returns:
      Scalar loss: sum over levels of `mean_b(1 - cos(flat(target), flat(recon)))`.
    """
    loss = 0.0
    for target, recon in zip(targets, recons, strict=True):
        target = jax.lax.stop_gradient(target)
        keep = hard_mining_weights(target, recon, alpha)
        weight = keep + (1.0 - keep) * factor
        frozen = jax.lax.stop_gradient(recon)
        recon_masked_grad = frozen + (recon - frozen) * weight
        batch = target.shape[0]
        cos = cosine_similarity(
            target.reshape(batch, -1), recon_masked_grad.reshape(batch, -1)
        )
        loss = loss + jnp.mean(1.0 - cos)
    return loss


def recontrast_loss(targets, recons, alpha, factor: float = 0.0) -> jax.Array:
    """Both reconstruction directions, averaged: L(items 0-2)/2 + L(items 3-5)/2."""
    first = global_cosine_hard_mining(targets[:3], recons[:3], alpha, factor)
    second = global_cosine_hard_mining(targets[3:], recons[3:], alpha, factor)
    return first / 2 + second / 2


def alpha_schedule(step, total_steps: int, warmup_fraction: float = 0.1):
    """`min(-3 + 4 * step / (warmup_fraction * total_steps), 1)`.

    `step` is the 0-based number of updates already done (the value before the
    current update), as in the reference loop.
    """
    warmup = warmup_fraction * total_steps
    return jnp.minimum(-3.0 + 4.0 * step / warmup, 1.0)
