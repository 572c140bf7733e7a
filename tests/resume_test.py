"""Kill-and-resume: a run killed with SIGKILL and restarted ends like an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 60, 10


def main_command(data, workdir):
    return [
        sys.executable, "-m", "recontrast_jax.main",
        "--config", "configs/quickstart.py",
        f"--workdir={workdir}",
        "--config.data.source=folder",
        f"--config.data.root={data}",
        "--config.data.categories=brick",
        "--config.model.arch=resnet_tiny",  # the CLI's resume, on the fastest model
        "--config.model.pretrained=",
        "--config.data.image_size=32",
        "--config.data.crop_size=32",
        f"--config.train.steps={STEPS}",
        "--config.train.batch_size=4",
        "--config.eval.batch_size=4",
        f"--config.eval.every={STEPS}",
        f"--config.checkpoint.every={EVERY}",
        "--config.report.num_heatmaps=0",
    ]  # fmt: skip


def run(data, workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        main_command(data, workdir), cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_sigkill_then_restart_gives_the_uninterrupted_result(tmp_path, tiny_dataset):
    straight = run(tiny_dataset, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    workdir = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        main_command(tiny_dataset, workdir), cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    first_checkpoint = workdir / "checkpoints" / "brick" / str(EVERY)
    deadline = time.time() + 300
    while (
        not first_checkpoint.exists() and proc.poll() is None and time.time() < deadline
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "metrics.json").exists(), (
        "the run finished before it was killed"
    )
    saved = sorted(
        int(p) for p in os.listdir(workdir / "checkpoints" / "brick") if p.isdigit()
    )
    assert saved and max(saved) < STEPS

    resumed = run(tiny_dataset, workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step {max(saved)}" in resumed.stderr
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())["categories"][
        "brick"
    ]
    b = json.loads((workdir / "metrics.json").read_text())["categories"]["brick"]
    for key in a:
        if not key.endswith(("_seconds", "_per_second")):
            assert a[key] == b[key], key


def test_start_batch_continues_the_stream_exactly(tiny_dataset):
    import itertools

    import numpy as np

    from recontrast_jax.data import folder, input_pipeline

    samples = folder.scan_category(tiny_dataset, "brick").train  # 6 images
    kwargs = dict(batch_size=4, image_size=16, crop_size=16, seed=3)

    def stream(start):
        ds = input_pipeline.train_dataset(samples, start_batch=start, **kwargs)
        return [
            b["image"] for b in itertools.islice(input_pipeline.iterate_numpy(ds), 5)
        ]

    full = stream(0)
    resumed = stream(3)  # epoch 1, second (partial) batch onwards
    for a, b in zip(full[3:], resumed, strict=False):
        np.testing.assert_array_equal(a, b)
    assert [len(b) for b in full] == [4, 2, 4, 2, 4]
