"""Import a ReContrast model trained with the authors' PyTorch code.

  python -m recontrast_jax.convert --checkpoint recontrast_bottle.pth \
      --config configs/mvtec.py:bottle --workdir runs/imported

reads the state dict (`.pth` or `.safetensors`; keys `encoder.*`,
`encoder_freeze.*`, `bottleneck.*`, `decoder.*` as the authors' `ReContrast`
module names them) and writes an Orbax checkpoint at step `config.train.steps`
into `<workdir>/checkpoints/<category>/`. Running `main` with the same config and
workdir then evaluates it (a finished category is evaluated, not retrained).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from recontrast_jax import checkpointing, parallel, pretrained, run
from recontrast_jax.data import sources
from recontrast_jax.methods import recontrast as recontrast_method
from recontrast_jax.models import recontrast

# (state-dict prefix, Flax part, keys of the part that PyTorch has but Flax drops)
PARTS = (
    ("encoder.", "encoder", pretrained.ENCODER_UNUSED),
    ("bottleneck.", "bottleneck", (r"^conv4\.", r"^bn4\.")),
    ("decoder.", "decoder", (r"^unc\d\.",)),
)
FROZEN_PREFIX = "encoder_freeze."


def strip_data_parallel_prefix(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Removes the `module.` prefix that nn.DataParallel adds to every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def recontrast_variables_from_state_dict(
    state_dict: Mapping[str, np.ndarray], arch: str, image_size: int
) -> tuple[dict, dict]:
    """Converts an authors'-format state dict to (variables, frozen_variables).

    Raises:
      pretrained.ConversionError: with every missing/unexpected/mis-shaped key.
    """
    state_dict = strip_data_parallel_prefix(state_dict)
    template, frozen_template = jax.eval_shape(
        lambda r: recontrast.init_variables(arch, r, image_size), jax.random.key(0)
    )
    known = tuple(p for p, _, _ in PARTS) + (FROZEN_PREFIX,)
    stray = sorted(k for k in state_dict if not k.startswith(known))
    if stray:
        raise pretrained.ConversionError(
            f"{len(stray)} keys outside {known}: {stray[:10]}"
            + (" ..." if len(stray) > 10 else "")
        )
    variables = {"params": {}, "batch_stats": {}}
    frozen, problems = None, []
    for prefix, part, ignore in PARTS:
        part_template = {c: template[c][part] for c in ("params", "batch_stats")}
        try:
            converted = pretrained.state_dict_to_variables(
                state_dict, part_template, prefix, ignore
            )
        except pretrained.ConversionError as e:
            problems.append(str(e))
            continue
        for collection in ("params", "batch_stats"):
            variables[collection][part] = converted[collection]
    try:
        frozen = pretrained.state_dict_to_variables(
            state_dict, frozen_template, FROZEN_PREFIX, pretrained.ENCODER_UNUSED
        )
    except pretrained.ConversionError as e:
        problems.append(str(e))
    if problems:  # report every part at once
        raise pretrained.ConversionError("\n".join(problems))
    return variables, frozen


def import_checkpoint(
    checkpoint_path: str, config: ml_collections.ConfigDict, workdir: str, category: str
) -> str:
    """Writes the PyTorch ReContrast checkpoint as an Orbax checkpoint.

    Returns:
      The checkpoint directory of the category.
    """
    state_dict = pretrained.read_state_dict(checkpoint_path)
    try:
        variables, frozen = recontrast_variables_from_state_dict(
            state_dict, config.model.arch, config.data.crop_size
        )
    except pretrained.ConversionError as e:
        raise pretrained.ConversionError(f"{checkpoint_path}: {e}") from e
    tx = recontrast_method.make_optimizer(config.optimizer)
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    state = recontrast_method.TrainState(
        step=jnp.asarray(config.train.steps, jnp.int32),
        params=params,
        batch_stats=jax.tree_util.tree_map(jnp.asarray, variables["batch_stats"]),
        opt_state=tx.init(params),
        frozen=jax.tree_util.tree_map(jnp.asarray, frozen),
    )
    run.prepare_workdir(workdir)
    directory = recontrast_method.checkpoint_dir(workdir, category)
    manager = checkpointing.manager(
        directory, config.checkpoint.max_to_keep, config=config
    )
    if manager.latest_step() is not None:
        raise FileExistsError(
            f"{directory} already holds checkpoints; use a new workdir."
        )
    state = parallel.replicate(parallel.make_mesh(), state)
    checkpointing.save(manager, config.train.steps, state)
    return directory


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags, defined only when run as a program.

    Defining them at import would clash with `recontrast_jax.main`'s `--config`
    flag when both modules are imported into one process (e.g. a notebook).
    """
    config_flags.DEFINE_config_file(
        "config", None, "Config the model was trained with."
    )
    flags.DEFINE_string(
        "checkpoint", None, "PyTorch state dict (.pth or .safetensors)."
    )
    flags.DEFINE_string("workdir", None, "Workdir to write the Orbax checkpoint into.")
    flags.DEFINE_string(
        "category", None, "Category name (default: the config's only one)."
    )
    flags.mark_flags_as_required(["config", "checkpoint", "workdir"])


def main(argv):
    del argv
    config = FLAGS.config
    category = FLAGS.category
    if category is None:
        categories = sources.category_list(config.data.categories)
        if len(categories) != 1:
            sys.exit("error: pass --category (the config names several or none).")
        category = categories[0]
    try:
        directory = import_checkpoint(FLAGS.checkpoint, config, FLAGS.workdir, category)
    except (
        pretrained.PretrainedWeightsError,
        pretrained.ConversionError,
        FileExistsError,
    ) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {os.path.join(directory, str(config.train.steps))}")
    print(
        "evaluate it with: python -m recontrast_jax.main --config <same config> "
        f"--workdir {FLAGS.workdir}"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
