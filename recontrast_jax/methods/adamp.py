"""AdamP (Heo et al., ICLR 2021) as an optax `GradientTransformation`.

Follows the reference PyTorch algorithm (clovaai/AdamP, spec section 2.5):

1. Adam moments with bias correction; the step direction is
   `perturb = m / (sqrt(v) / sqrt(1 - b2^t) + eps)` (or its Nesterov variant) and
   the step size is `lr / (1 - b1^t)`.
2. For parameters with ndim > 1, a projection test on the raw gradient: the
   absolute cosine similarity between gradient and weight is computed per output
   channel first, then over the whole layer. If for a view the maximum is below
   `delta / sqrt(view_dim)` (view_dim = elements per row of that view), the
   component of `perturb` along the (per-row) weight direction is removed and the
   weight decay is scaled by `wd_ratio`. The channel view wins when both pass.
3. Decoupled weight decay `w <- w * (1 - lr * weight_decay * ratio)` (ratio is
   `wd_ratio` after a projection, else 1) followed by `w <- w - step * perturb`.
   Parameters with ndim <= 1 (biases, norm scales) get plain AdamW.

Output channel axis: the reference views a PyTorch weight as
`(shape[0], -1)` because PyTorch stores out channels on axis 0 (Linear
`(out, in)`, Conv `(out, in, kh, kw)`). Flax kernels store them on the LAST
axis (Dense `(in, out)`, Conv `(kh, kw, in, out)`), so here the channel view
reduces over every axis except the last. The element order inside a channel
does not matter (only sums over it are taken), so this reproduces PyTorch
exactly for transposed weights.

Learning-rate schedules are evaluated at the 0-based step count (optax
convention); bias correction uses the 1-based step t = count + 1, as PyTorch.
Weight decay applies to every parameter, biases included, like the reference
with a single parameter group; mask the tree with `optax.masked` to exclude some.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


class AdamPState(NamedTuple):
    """State of `adamp`: the step count and Adam's first and second moments."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _bias_correction(decay: float, t: jax.Array) -> jax.Array:
    """`1 - decay**t`, accurate in float32.

    The naive float32 form loses ~1e-5 relative accuracy for decay=0.999 (the
    float32 constant 0.999 is itself off by 1.3e-8 and the subtraction cancels),
    while the reference computes it in Python double precision. `1 - decay` is
    formed in Python float64 and the power goes through log1p/expm1.
    """
    return -jnp.expm1(t * jnp.log1p(-(1.0 - decay)))


def _cosine_abs(a: jax.Array, b: jax.Array, axes: tuple[int, ...], eps: float):
    """|cos(a, b)| over `axes` (kept as size-1 dims); norms floored at eps."""
    dot = jnp.sum(a * b, axis=axes, keepdims=True)
    norm_a = jnp.sqrt(jnp.sum(a * a, axis=axes, keepdims=True))
    norm_b = jnp.sqrt(jnp.sum(b * b, axis=axes, keepdims=True))
    return jnp.abs(dot) / (jnp.maximum(norm_a, eps) * jnp.maximum(norm_b, eps))


def _remove_radial(
    perturb: jax.Array, param: jax.Array, axes: tuple[int, ...], eps: float
):
    """Removes the component of `perturb` along the weight direction per view row."""
    norm = jnp.sqrt(jnp.sum(param * param, axis=axes, keepdims=True))
    unit = param / (norm + eps)
    return perturb - unit * jnp.sum(unit * perturb, axis=axes, keepdims=True)


def _project(
    perturb: jax.Array,
    param: jax.Array,
    grad: jax.Array,
    delta: float,
    wd_ratio: float,
    eps: float,
) -> tuple[jax.Array, jax.Array]:
    """AdamP's projection for one parameter with ndim > 1.

    Returns:
      The (possibly projected) perturbation and the weight-decay ratio to use.
    """
    channel_axes = tuple(range(param.ndim - 1))  # all but the output channel axis
    layer_axes = tuple(range(param.ndim))
    channel_dim = param.size // param.shape[-1]

    def passes(axes, view_dim):
        cosine = _cosine_abs(grad, param, axes, eps)
        return jnp.max(cosine) < delta / math.sqrt(view_dim)

    channel_hit = passes(channel_axes, channel_dim)
    layer_hit = passes(layer_axes, param.size)
    projected = jnp.where(
        channel_hit,
        _remove_radial(perturb, param, channel_axes, eps),
        _remove_radial(perturb, param, layer_axes, eps),
    )
    hit = channel_hit | layer_hit
    perturb = jnp.where(hit, projected, perturb)
    ratio = jnp.where(hit, wd_ratio, 1.0)
    return perturb, ratio


def adamp(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """AdamP optimiser; the returned updates are added to the params.

    Args:
      learning_rate: a float or an optax schedule (called with the step count).
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the bias-corrected root second moment; also the norm floor
        of the cosine test and the projection.
      weight_decay: decoupled weight-decay coefficient.
      delta: threshold of the projection test, `max|cos| < delta / sqrt(dim)`.
      wd_ratio: weight-decay multiplier for projected parameters.
      nesterov: use the Nesterov momentum direction.

    Returns:
      An `optax.GradientTransformation`; `update` requires `params`.
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamPState(
            count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.copy, zeros)
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("adamp needs the current params: call update(g, s, p).")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        bias_correction1 = _bias_correction(b1, t)
        bias_correction2 = _bias_correction(b2, t)
        step_size = lr / bias_correction1
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)

        def param_update(grad, m, v, param):
            denom = jnp.sqrt(v) / jnp.sqrt(bias_correction2) + eps
            direction = b1 * m + (1.0 - b1) * grad if nesterov else m
            perturb = direction / denom
            ratio = 1.0
            if param.ndim > 1:
                perturb, ratio = _project(perturb, param, grad, delta, wd_ratio, eps)
            decay = lr * weight_decay * ratio * param
            return (-decay - step_size * perturb).astype(param.dtype)

        new_updates = jax.tree.map(param_update, updates, mu, nu, params)
        return new_updates, AdamPState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)
