"""The command line: bad input ends with a one-line error naming the path."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "recontrast_jax.main",
            "--config",
            "configs/quickstart.py",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def test_empty_train_folder_is_reported_by_path(tmp_path):
    train_dir = tmp_path / "data" / "widget" / "train" / "good"
    train_dir.mkdir(parents=True)
    (tmp_path / "data" / "widget" / "test" / "good").mkdir(parents=True)
    proc = run_main(
        f"--workdir={tmp_path / 'work'}",
        "--config.data.source=folder",
        f"--config.data.root={tmp_path / 'data'}",
        "--config.data.categories=widget",
    )
    assert proc.returncode == 1
    assert str(train_dir) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_workdir_that_is_a_file_is_reported(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    proc = run_main(f"--workdir={blocker / 'work'}")
    assert proc.returncode == 1
    assert str(blocker / "work") in proc.stderr
    assert "not writable" in proc.stderr
    assert "Traceback" not in proc.stderr
