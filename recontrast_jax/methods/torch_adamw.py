"""AdamW with PyTorch's AMSGrad, as an optax transformation.

The multi-class ReContrast scripts (spec recontrast.md section 3.3) train with
`torch.optim.AdamW(..., eps=1e-10, amsgrad=True)`. PyTorch keeps the running
maximum of the *raw* second moment and divides it by the bias correction
afterwards: `denom = sqrt(max(v_1..v_t)) / sqrt(1 - b2^t) + eps`. optax's
`scale_by_amsgrad` takes the maximum of the bias-corrected moments instead,
which is a different sequence (the correction shrinks over time), so it cannot
be used for parity.

The bias corrections are computed as `-expm1(t * log(b))` in float32, which is
what PyTorch's float64 `1 - b**t` rounds to; `1 - b**t` in float32 would be off
by 1e-5 relative at t = 1 with b = 0.999.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByTorchAmsgradState(NamedTuple):
    """Step count, first moment, second moment and its running maximum."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def bias_correction(decay: float, count: jax.Array) -> jax.Array:
    """`1 - decay**count` accurate to float32 rounding (see the module docstring)."""
    return -jnp.expm1(count.astype(jnp.float32) * jnp.float32(math.log(decay)))


def scale_by_torch_amsgrad(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """`m_hat / (sqrt(max_t v_t) / sqrt(1 - b2^t) + eps)`, PyTorch's AMSGrad step.

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the denominator after the square root.
    """

    def init_fn(params):
        def zeros():
            return jax.tree_util.tree_map(jnp.zeros_like, params)

        return ScaleByTorchAmsgradState(
            count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(), nu_max=zeros()
        )

    def update_fn(updates, state, params=None):
        del params
        tree_map = jax.tree_util.tree_map
        mu = tree_map(lambda m, g: m + (1 - b1) * (g - m), state.mu, updates)
        nu = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        nu_max = tree_map(jnp.maximum, state.nu_max, nu)
        count = optax.safe_increment(state.count)
        correction1 = bias_correction(b1, count)
        correction2_sqrt = jnp.sqrt(bias_correction(b2, count))
        scaled = tree_map(
            lambda m, v: (m / correction1) / (jnp.sqrt(v) / correction2_sqrt + eps),
            mu,
            nu_max,
        )
        return scaled, ScaleByTorchAmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
) -> optax.GradientTransformation:
    """`torch.optim.AdamW`: decoupled decay `p -= lr * wd * p` before the step.

    With `amsgrad=False` this is `optax.adamw` (which matches PyTorch's plain
    AdamW); with `amsgrad=True` the step is `scale_by_torch_amsgrad`.
    """
    if not amsgrad:
        return optax.adamw(
            learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
        )
    return optax.chain(
        scale_by_torch_amsgrad(b1, b2, eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def multistep_lr(
    base: float, milestones: tuple[int, ...], gamma: float
) -> optax.ScalarOrSchedule:
    """`torch.optim.lr_scheduler.MultiStepLR` stepped once per iteration.

    Update i (0-based) uses `base * gamma ** (number of milestones <= i)`; with
    no milestones the rate is the constant `base`.
    """
    if not milestones:
        return base
    return optax.piecewise_constant_schedule(
        base, {int(m): float(gamma) for m in milestones}
    )


class PeriodicState(NamedTuple):
    """Updates done so far and the wrapped transformation's state."""

    count: jax.Array
    inner: optax.OptState


def _where(condition, new_tree, old_tree):
    return jax.tree_util.tree_map(
        lambda new, old: jnp.where(condition, new, old), new_tree, old_tree
    )


def reset_every(
    inner: optax.GradientTransformation, period: int
) -> optax.GradientTransformation:
    """`inner` whose state restarts from `init` after every `period` updates.

    The stable scripts empty the decoder/bottleneck optimiser's state
    (`opt1.state`) every 500 iterations (spec recontrast.md section 3.4), so
    its moments and step count start again; update `k * period + 1` is the
    first of each restart.
    """

    def init_fn(params):
        return PeriodicState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        restart = (state.count > 0) & (state.count % period == 0)
        inner_state = _where(restart, inner.init(params), state.inner)
        updates, inner_state = inner.update(updates, inner_state, params)
        return updates, PeriodicState(optax.safe_increment(state.count), inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def pause_after_resets(
    inner: optax.GradientTransformation, period: int, pause: int
) -> optax.GradientTransformation:
    """`inner`, skipped for the `pause` updates that follow every `period` updates.

    The MVTec stable script does not step the encoder's optimiser for 100
    iterations after each decoder reset: a skipped update changes neither the
    parameters (no weight decay either) nor the optimiser's state.
    """

    def init_fn(params):
        return PeriodicState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        skip = (state.count >= period) & (state.count % period < pause)
        new_updates, inner_state = inner.update(updates, state.inner, params)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, new_updates)
        return _where(skip, zeros, new_updates), PeriodicState(
            optax.safe_increment(state.count), _where(skip, state.inner, inner_state)
        )

    return optax.GradientTransformation(init_fn, update_fn)
