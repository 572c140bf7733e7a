"""The one place that talks to Orbax: save and restore training states."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(directory: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A CheckpointManager for `directory` keeping the last `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    # The handler is named up front so that item metadata (used to restore
    # without a template) can be read by a manager that has not saved yet.
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=options,
        item_handlers=ocp.StandardCheckpointHandler(),
    )


def existing_manager(directory: str) -> ocp.CheckpointManager:
    """`manager(directory)` for reading: a missing directory is an error, not made."""
    if not os.path.isdir(directory):
        raise NoCheckpointError(
            f"No checkpoint in {os.path.abspath(directory)}: train first (mode 'train')."
        )
    return manager(directory)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Saves `state` at `step` (blocking; an existing step is left as it is)."""
    if step in mngr.all_steps():
        return
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()


class NoCheckpointError(FileNotFoundError):
    """The requested checkpoint does not exist."""


def restore(mngr: ocp.CheckpointManager, target, step: int | None = None):
    """Restores `step` (None: the latest) into the structure/sharding of `target`."""
    if step is None:
        return restore_latest(mngr, target)
    if step not in mngr.all_steps():
        raise NoCheckpointError(
            f"No checkpoint for step {step} in {mngr.directory}; have {list(mngr.all_steps())}."
        )
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_latest(mngr: ocp.CheckpointManager, target):
    """Restores the latest checkpoint into the structure/sharding of `target`.

    Returns:
      The restored state, or None when the directory holds no checkpoint.
    """
    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_as_saved(mngr: ocp.CheckpointManager, step: int | None = None) -> dict:
    """Restores `step` (None or -1: the latest) as the nested dict that was saved.

    Shapes come from the checkpoint's own metadata, so no template is needed
    (used where shapes depend on the training data, e.g. a memory bank).
    """
    if step in (None, -1):
        step = mngr.latest_step()
        if step is None:
            raise NoCheckpointError(f"No checkpoint in {mngr.directory}.")
    elif step not in mngr.all_steps():
        raise NoCheckpointError(
            f"No checkpoint for step {step} in {mngr.directory}; have {list(mngr.all_steps())}."
        )
    tree = mngr.item_metadata(step).tree
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree
    )
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
