"""Stop training when the loss stops being finite, and never checkpoint it.

A NaN or infinite loss (a learning rate far too high, a broken input) poisons
every parameter within a step; training on would waste the rest of the run
and end in an error from the metrics. `DivergenceWatch` keeps, on the device,
the first step whose loss is not finite and the last finite loss before it:
one small asynchronous update per step, no host synchronisation. The training
loops read it (`check`) where they synchronise anyway, at log steps and
before every checkpoint, so a diverged state is never saved and the newest
checkpoint on disk is the last good one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@jax.jit
def _update(record: jax.Array, step: jax.Array, loss: jax.Array) -> jax.Array:
    """record = [first non-finite step (-1: none), last finite step, its loss]."""
    healthy = record[0] < 0
    finite = jnp.isfinite(loss)
    step = step.astype(jnp.float32)
    first_bad = jnp.where(healthy & ~finite, step, record[0])
    keep = healthy & finite
    last_step = jnp.where(keep, step, record[1])
    last_loss = jnp.where(keep, loss.astype(jnp.float32), record[2])
    return jnp.stack([first_bad, last_step, last_loss])


class DivergenceWatch:
    """The first non-finite loss of a run, tracked on the device."""

    def __init__(self):
        self._record = jnp.asarray([-1.0, -1.0, np.nan], jnp.float32)

    def add(self, step: int, loss: jax.Array) -> None:
        """Records the loss of training step `step` (1-based); asynchronous."""
        self._record = _update(self._record, jnp.int32(step), loss)

    def check(self, what: str) -> None:
        """Raises `TrainingDiverged` if a loss so far was not finite.

        Args:
          what: names the run in the message, e.g. 'brick'.
        """
        first_bad, last_step, last_loss = (float(v) for v in np.asarray(self._record))
        if first_bad < 0:
            return
        last = (
            f"the last finite loss was {last_loss:.6g} at step {int(last_step)}"
            if last_step >= 0
            else "no step had a finite loss"
        )
        raise TrainingDiverged(
            f"{what}: the training loss is not finite at step {int(first_bad)} "
            f"({last}); training stopped and the newest checkpoint is the last "
            "finite one. Lower the learning rates or check the input images."
        )


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def ensure_finite(tree, what: str, step: int) -> None:
    """Raises `TrainingDiverged` unless every float in `tree` is finite.

    Run before a checkpoint is written: a finite loss does not prove that the
    update after it left finite parameters.
    """
    if not bool(_all_finite(tree)):
        raise TrainingDiverged(
            f"{what}: the training state is not finite after step {step}; training "
            "stopped and the newest checkpoint is the last finite one. Lower the "
            "learning rates or check the input images."
        )
