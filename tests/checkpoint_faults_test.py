"""Unreadable checkpoints and checkpoints of another config: one clear line.

Real garbled files: every file of a saved checkpoint is overwritten with
random bytes of the same length.
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from recontrast_jax import checkpointing, default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def garble(directory):
    rng = np.random.default_rng(0)
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "wb") as f:
                f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def saved_steps(tmp_path, steps=(1, 2, 3)):
    manager = checkpointing.manager(str(tmp_path / "ckpt"))
    for step in steps:
        checkpointing.save(manager, step, {"w": jnp.full((4, 4), float(step))})
    return manager


def test_the_newest_readable_checkpoint_is_restored(tmp_path, capsys):
    manager = saved_steps(tmp_path)
    garble(os.path.join(manager.directory, "3"))
    target = {"w": jnp.zeros((4, 4))}
    restored = checkpointing.restore_latest(manager, target)
    np.testing.assert_array_equal(restored["w"], np.full((4, 4), 2.0))
    warning = capsys.readouterr().err
    assert f"checkpoint {os.path.join(manager.directory, '3')} cannot be read" in (
        warning
    )
    assert manager.all_steps() == [1, 2, 3]  # reading leaves it where it is
    with pytest.raises(checkpointing.UnreadableCheckpointError, match="/3 cannot be"):
        checkpointing.restore(manager, target, step=3)
    checkpointing.restore_latest(manager, target, set_aside=True)
    assert list(manager.all_steps()) == [1, 2]
    assert os.path.isdir(os.path.join(manager.directory, "3.unreadable"))


def test_no_readable_checkpoint_is_one_error_naming_them(tmp_path):
    manager = saved_steps(tmp_path, steps=(1, 2))
    for step in (1, 2):
        garble(os.path.join(manager.directory, str(step)))
    with pytest.raises(checkpointing.UnreadableCheckpointError) as raised:
        checkpointing.restore_latest(manager, {"w": jnp.zeros((4, 4))})
    assert manager.directory.as_posix() in str(raised.value)
    assert "/1 (" in str(raised.value) and "/2 (" in str(raised.value)


def test_model_fields_are_recorded_and_a_mismatch_names_each_field(tmp_path):
    config = default_config.get_config()
    manager = checkpointing.manager(str(tmp_path / "ckpt"), config=config)
    checkpointing.save(manager, 1, {"w": jnp.zeros(2)})
    other = ml_collections.ConfigDict(config.to_dict())
    other.train.steps = 5  # free to change
    checkpointing.existing_manager(str(tmp_path / "ckpt"), config=other)
    other.model.arch = "resnet18"
    other.data.image_size = 320
    with pytest.raises(checkpointing.ConfigMismatchError) as raised:
        checkpointing.existing_manager(str(tmp_path / "ckpt"), config=other)
    message = str(raised.value)
    assert "model.arch saved 'wide_resnet50_2', requested 'resnet18'" in message
    assert "data.image_size saved 256, requested 320" in message
    assert "another --workdir" in message and "\n" not in message


def main(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "recontrast_jax.main", "--config",
         "configs/quickstart.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def test_the_command_line_falls_back_then_stops_with_one_line(
    tmp_path, tiny_dataset, cli_env
):
    workdir = tmp_path / "work"
    common = [
        f"--workdir={workdir}", "--config.data.source=folder",
        f"--config.data.root={tiny_dataset}", "--config.data.categories=brick",
        "--config.model.arch=resnet_tiny", "--config.model.pretrained=",
        "--config.data.image_size=32", "--config.data.crop_size=32",
        "--config.train.batch_size=5", "--config.eval.batch_size=4",
        "--config.report.num_heatmaps=0",
    ]  # fmt: skip
    trained = main(
        cli_env, *common, "--config.train.steps=4", "--config.checkpoint.every=2"
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    checkpoints = workdir / "checkpoints" / "brick"
    garble(checkpoints / "4")
    evaluated = main(cli_env, *common, "--config.mode=evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"checkpoint {checkpoints / '4'} cannot be read" in evaluated.stderr
    assert "restored step 2" in evaluated.stderr
    assert "Traceback" not in evaluated.stderr

    garble(checkpoints / "2")
    failed = main(cli_env, *common, "--config.mode=evaluate")
    errors = [s for s in failed.stderr.splitlines() if s.startswith("error:")]
    assert failed.returncode == 1 and len(errors) == 1, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    assert f"No checkpoint in {checkpoints} can be read" in errors[0]

    other = main(cli_env, *common, "--config.model.arch=resnet_tiny_bottleneck")
    errors = [s for s in other.stderr.splitlines() if s.startswith("error:")]
    assert other.returncode == 1 and len(errors) == 1, other.stderr[-2000:]
    assert (
        "model.arch saved 'resnet_tiny', requested 'resnet_tiny_bottleneck'"
        in (errors[0])
    )
