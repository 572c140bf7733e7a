"""The one place that talks to Orbax: save and restore training states."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from recontrast_jax import console, reports

# The config fields that shape a model and its inputs: a checkpoint written
# with other values cannot be resumed or evaluated with these (steps, logging,
# evaluation batch and the like may change freely).
MODEL_FIELDS = (
    "method",
    "model.arch",
    "model.dtype",
    "model.decoder_activation",
    "model.partial_norm_threshold",
    "model.encoder_bn_epsilon",
    "data.image_size",
    "data.crop_size",
    "data.resize",
    "patchcore.pretrain_dim",
    "patchcore.target_dim",
    "patchcore.ensemble",
    "reconpatch.feature_dim",
    "reconpatch.projection_dim",
)
FIELDS_FILE = "model_config.json"


class ConfigMismatchError(ValueError):
    """A checkpoint directory was written with other model-shaping fields."""


def model_fields(config) -> dict:
    """`MODEL_FIELDS` of `config` as JSON values (tuples become lists)."""
    values = {}
    for name in MODEL_FIELDS:
        node = config
        for part in name.split("."):
            node = node[part]
        values[name] = list(node) if isinstance(node, tuple) else node
    return values


def check_model_fields(mngr: ocp.CheckpointManager, config, write: bool) -> None:
    """Compares `config` with the fields its checkpoints were written with.

    Args:
      mngr: the checkpoint directory's manager.
      config: the run's config.
      write: record the fields when the directory holds no checkpoint yet
        (training); process 0 writes.

    Raises:
      ConfigMismatchError: one line naming each differing field, its saved and
        its requested value, and the way out.
    """
    path = os.path.join(mngr.directory, FIELDS_FILE)
    requested = model_fields(config)
    if mngr.all_steps() and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        differing = [
            f"{k} saved {saved[k]!r}, requested {v!r}"
            for k, v in requested.items()
            if k in saved and saved[k] != v
        ]
        if differing:
            raise ConfigMismatchError(
                f"{mngr.directory} holds checkpoints of another config "
                f"({'; '.join(differing)}): use another --workdir, or the saved values"
            )
    elif write and not mngr.all_steps() and jax.process_index() == 0:
        reports.atomic_write_json(path, requested)


def manager(directory: str, max_to_keep: int = 3, config=None) -> ocp.CheckpointManager:
    """A CheckpointManager for `directory` keeping the last `max_to_keep` steps.

    With `config` (training), its `MODEL_FIELDS` are checked against the
    directory's checkpoints, or recorded for the ones to come.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,  # what a killed save left
    )
    # The handler is named up front so that item metadata (used to restore
    # without a template) can be read by a manager that has not saved yet.
    mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=options,
        item_handlers=ocp.StandardCheckpointHandler(),
    )
    if config is not None:
        check_model_fields(mngr, config, write=True)
    return mngr


def existing_manager(directory: str, config=None) -> ocp.CheckpointManager:
    """`manager(directory)` for reading: a missing directory is an error, not made.

    With `config`, its `MODEL_FIELDS` must match the checkpoints' (see
    `check_model_fields`).
    """
    if not os.path.isdir(directory):
        raise NoCheckpointError(
            f"No checkpoint in {os.path.abspath(directory)}: train first (mode 'train')."
        )
    mngr = manager(directory)
    if config is not None:
        check_model_fields(mngr, config, write=False)
    return mngr


class CheckpointWriteError(OSError):
    """A checkpoint cannot be written; the previous ones are left whole."""


_saving = False  # orbax's own error logs are hidden while a save is in progress
_save_failed = False  # ... and so are the late callbacks of a failed one


def _hide_orbax_errors_while_saving(record) -> bool:
    return not (_saving and "orbax" in record.pathname)


absl_logging.get_absl_logger().addFilter(_hide_orbax_errors_while_saving)


def _hide_unretrieved_write_errors(record) -> bool:
    first_line = record.getMessage().split("\n", 1)[0]  # 'Task exception was ...'
    unretrieved = first_line.endswith("exception was never retrieved")
    return not (unretrieved and (_saving or _save_failed))


logging.getLogger("asyncio").addFilter(_hide_unretrieved_write_errors)


def _drop_callbacks_into_a_closed_loop(unraisable, previous=sys.unraisablehook):
    """Writes still in flight when a save fails complete into orbax's closed
    event loop; each would print a traceback. Only those are dropped."""
    late = (_saving or _save_failed) and isinstance(unraisable.exc_value, RuntimeError)
    if not (late and str(unraisable.exc_value) == "Event loop is closed"):
        previous(unraisable)


sys.unraisablehook = _drop_callbacks_into_a_closed_loop


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Saves `state` at `step` (blocking; an existing step is left as it is).

    Raises:
      CheckpointWriteError: the write failed (a full disk, permissions); the
        message names the step's folder and the cause, the partial folder is
        removed and orbax's threads are shut down, so nothing prints after it.
    """
    global _saving, _save_failed
    if step in mngr.all_steps():
        return
    _saving = True
    try:
        mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
    except Exception as e:  # orbax reports write failures in many types
        _save_failed = True
        mngr.close()
        _remove_partial_save(mngr.directory, step)
        raise CheckpointWriteError(
            f"cannot write checkpoint {os.path.join(mngr.directory, str(step))}: "
            f"{reports.os_reason(e)}"
        ) from e
    finally:
        _saving = False


def _remove_partial_save(directory, step: int, seconds: float = 5.0) -> None:
    """Deletes the temporary folder of a failed save.

    Writer threads of the failed save may still be adding files to it (and
    recreate folders for them), so it is removed until it has stayed gone for
    a moment.
    """
    deadline, gone_since = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        partial = glob.glob(os.path.join(directory, f"{step}.orbax-*"))
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        if partial:
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since > 0.2:
            return
        time.sleep(0.05)


class NoCheckpointError(FileNotFoundError):
    """The requested checkpoint does not exist."""


class UnreadableCheckpointError(NoCheckpointError):
    """No checkpoint that was asked for (or none at all) can be read."""


def _abstract(target):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)


def _restore_step(mngr: ocp.CheckpointManager, step: int, target, partial: bool):
    abstract = _abstract(target)
    if not partial:
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    # The standard handler reads whole trees; its PyTree handler (the same
    # files) reads the named items only.
    reader = ocp.CheckpointManager(
        mngr.directory, item_handlers=ocp.PyTreeCheckpointHandler()
    )
    try:
        return reader.restore(
            step,
            args=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True,
            ),
        )
    finally:
        reader.close()


def _cause(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def restore(
    mngr: ocp.CheckpointManager, target, step: int | None = None, partial: bool = False
):
    """Restores `step` (None: the newest readable) into `target`'s structure.

    With `partial`, `target` is a dict naming some of the saved top-level
    items (arrays or `jax.ShapeDtypeStruct`s with shardings); only they are
    read.

    Raises:
      NoCheckpointError: `step` is not in the directory.
      UnreadableCheckpointError: `step` (or, with None, every checkpoint)
        cannot be read; the message names it and the cause.
    """
    if step is None:
        return restore_latest(mngr, target, partial=partial)
    if step not in mngr.all_steps():
        raise NoCheckpointError(
            f"No checkpoint for step {step} in {mngr.directory}; have {list(mngr.all_steps())}."
        )
    try:
        return _restore_step(mngr, step, target, partial)
    except Exception as e:  # garbled files fail in many ways inside orbax
        raise UnreadableCheckpointError(
            f"Checkpoint {os.path.join(mngr.directory, str(step))} cannot be read "
            f"({_cause(e)}); choose another with --config.checkpoint.step"
        ) from e


def restore_latest(
    mngr: ocp.CheckpointManager, target, set_aside: bool = False, partial: bool = False
):
    """Restores the newest readable checkpoint into `target`'s structure.

    An unreadable checkpoint is named in a warning and the next older one is
    tried. With `set_aside` (training, which will write new checkpoints) it is
    renamed `<step>.unreadable`, kept for inspection and never picked again.

    Returns:
      The restored state, or None when the directory holds no checkpoint.

    Raises:
      UnreadableCheckpointError: there are checkpoints and none can be read.
    """
    unreadable = []
    for step in sorted(mngr.all_steps(), reverse=True):
        path = os.path.join(mngr.directory, str(step))
        try:
            return _restore_step(mngr, step, target, partial)
        except Exception as e:  # garbled files fail in many ways inside orbax
            unreadable.append(f"{path} ({_cause(e)})")
            console.say(f"warning: checkpoint {path} cannot be read ({_cause(e)})")
            if set_aside:
                os.rename(path, f"{path}.unreadable")
                mngr.reload()
    if unreadable:
        raise UnreadableCheckpointError(
            f"No checkpoint in {mngr.directory} can be read: {'; '.join(unreadable)}"
        )
    return None


def holds_item(mngr: ocp.CheckpointManager, step: int, name: str) -> bool:
    """Whether checkpoint `step` holds the top-level item `name`.

    Raises:
      UnreadableCheckpointError: its metadata cannot be read.
    """
    try:
        return name in mngr.item_metadata(step).tree
    except Exception as e:  # garbled metadata fails in many ways inside orbax
        raise UnreadableCheckpointError(
            f"Checkpoint {os.path.join(mngr.directory, str(step))} cannot be read "
            f"({_cause(e)}); fit again in another workdir, or delete it"
        ) from e


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
    try:
        tree = mngr.item_metadata(step).tree
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree
        )
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # garbled files fail in many ways inside orbax
        raise UnreadableCheckpointError(
            f"Checkpoint {os.path.join(mngr.directory, str(step))} cannot be read "
            f"({_cause(e)}); fit again in another workdir, or delete it"
        ) from e
