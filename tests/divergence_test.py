"""A non-finite loss stops training with one line and never reaches a checkpoint."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recontrast_jax import divergence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_watch_names_the_first_bad_step_and_the_last_finite_loss():
    watch = divergence.DivergenceWatch()
    for step, loss in enumerate([1.5, 0.25], start=1):
        watch.add(step, jnp.float32(loss))
    watch.check("brick")  # all finite: nothing raised
    for step, loss in enumerate([np.nan, 3.0, np.inf], start=3):
        watch.add(step, jnp.float32(loss))
    with pytest.raises(divergence.TrainingDiverged) as raised:
        watch.check("brick")
    message = str(raised.value)
    assert "brick: the training loss is not finite at step 3" in message
    assert "the last finite loss was 0.25 at step 2" in message


def test_a_loss_that_is_never_finite_is_named():
    watch = divergence.DivergenceWatch()
    watch.add(1, jnp.float32(np.inf))
    with pytest.raises(divergence.TrainingDiverged, match="step 1 .no step had"):
        watch.check("grass")


def test_ensure_finite_finds_one_bad_value_anywhere_in_the_tree():
    tree = {"a": jnp.ones((3, 3)), "b": {"c": jnp.arange(4), "d": jnp.zeros(2)}}
    divergence.ensure_finite(tree, "brick", 7)
    tree["b"]["d"] = jnp.asarray([0.0, -np.inf])
    with pytest.raises(divergence.TrainingDiverged, match="after step 7"):
        divergence.ensure_finite(tree, "brick", 7)


def test_huge_learning_rates_stop_with_one_line_and_finite_checkpoints(
    tmp_path, tiny_dataset, cli_env
):
    """Learning rates of 1e6 keep the state finite for a few steps, then not.

    A batch of 5 (all training images but the held-out one) compiles one step.
    """
    workdir = tmp_path / "work"
    command = [
        sys.executable, "-m", "recontrast_jax.main",
        "--config", "configs/quickstart.py", f"--workdir={workdir}",
        "--config.data.source=folder", f"--config.data.root={tiny_dataset}",
        "--config.data.categories=brick", "--config.model.arch=resnet_tiny",
        "--config.model.pretrained=", "--config.model.encoder_bn_train=True",
        "--config.data.image_size=32", "--config.data.crop_size=32",
        "--config.train.batch_size=5", "--config.train.log_every=5",
        "--config.train.steps=20", "--config.checkpoint.every=1",
        "--config.checkpoint.max_to_keep=20", "--config.eval.every=100",
        "--config.optimizer.lr_decoder=1e6", "--config.optimizer.lr_encoder=1e6",
    ]  # fmt: skip
    proc = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600,
        env=cli_env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "brick: the training" in errors[0], proc.stderr
    assert "not finite" in errors[0]
    bad_step = int(re.search(r"(?:at|after) step (\d+)", errors[0]).group(1))
    directory = workdir / "checkpoints" / "brick"
    saved = sorted(int(p) for p in os.listdir(directory) if p.isdigit())
    assert saved == list(range(1, len(saved) + 1)) and max(saved) < bad_step
    with ocp.CheckpointManager(directory) as manager:
        for step in saved:
            for leaf in jax.tree_util.tree_leaves(manager.restore(step)):
                if np.issubdtype(np.asarray(leaf).dtype, np.floating):
                    assert np.isfinite(leaf).all(), step
