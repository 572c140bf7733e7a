"""A full disk: one line naming the path and the cause, the previous files
whole, and nothing printed afterwards.

The checkpoint and TensorBoard cases write to a real small filesystem (a
tmpfs, which needs root to mount; skipped elsewhere); the result-file case
injects ENOSPC into the atomic writer.
"""

import errno
import os
import subprocess
import sys

import pytest

from recontrast_jax import reports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted under tmp_path."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_result_file_on_a_full_disk_is_named_and_the_old_one_kept(
    tmp_path, monkeypatch
):
    path = tmp_path / "metrics.json"
    reports.atomic_write_json(path, {"old": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(reports.WriteError) as raised:
        reports.atomic_write_json(path, {"new": 2})
    assert str(raised.value) == f"cannot write {path}: no space left on device"
    assert path.read_text() == '{\n  "old": 1\n}\n'
    assert os.listdir(tmp_path) == ["metrics.json"]


# Saves a small checkpoint, then 32 arrays of eight times the disk's size; prints the
# error, checks the first one is still whole, and exits (the interpreter's
# shutdown is where orbax's leftover writers used to print).
SAVE_TOO_MUCH = """
import sys
import numpy as np
from recontrast_jax import checkpointing
manager = checkpointing.manager(sys.argv[1])
checkpointing.save(manager, 1, {"w": np.full(1024, 1.0, np.float32)})
try:
    rng = np.random.default_rng(0)  # incompressible, and many writes in flight
    checkpointing.save(manager, 2, {f"w{i}": rng.random(2**16, np.float32)
                                    for i in range(32)})
except checkpointing.CheckpointWriteError as e:
    print(f"error: {e}", file=sys.stderr)
manager = checkpointing.manager(sys.argv[1])
restored = checkpointing.restore_latest(manager, {"w": np.zeros(1024, np.float32)})
print(manager.all_steps(), float(restored["w"].sum()))
"""


def test_a_checkpoint_on_a_full_disk_is_one_line_and_the_previous_is_kept(
    small_disk,
):
    directory = small_disk / "checkpoints"
    run = subprocess.run(
        [sys.executable, "-c", SAVE_TOO_MUCH, str(directory)], cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr == (
        f"error: cannot write checkpoint {directory / '2'}: no space left on device\n"
    )
    assert run.stdout == "[1] 1024.0\n"
    assert sorted(os.listdir(directory)) == ["1"]  # no partial folder left


def test_tensorboard_logs_on_a_full_disk_are_one_error_naming_the_folder(
    small_disk,
):
    with open(small_disk / "fill", "wb") as f:
        with pytest.raises(OSError, match="No space left"):
            f.write(bytes(2**21))
    logdir = small_disk / "tensorboard"
    with pytest.raises(reports.WriteError) as raised:
        reports.MetricWriter(str(logdir))
    assert str(raised.value) == (
        f"cannot write TensorBoard logs in {logdir}: no space left on device"
    )
