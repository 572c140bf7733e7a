"""SIGTERM during training: the step is checkpointed, the run exits with
`preemption.EXIT_CODE`, and rerunning ends exactly like an uninterrupted run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from recontrast_jax import preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 150


def command(data, workdir):
    return [
        sys.executable, "-m", "recontrast_jax.main",
        "--config", "configs/quickstart.py", f"--workdir={workdir}",
        "--config.data.source=folder", f"--config.data.root={data}",
        "--config.data.categories=brick", "--config.model.arch=resnet_tiny",
        "--config.model.pretrained=", "--config.data.image_size=32",
        "--config.data.crop_size=32", f"--config.train.steps={STEPS}",
        "--config.train.batch_size=4", "--config.eval.batch_size=4",
        f"--config.eval.every={STEPS}", f"--config.checkpoint.every={STEPS}",
        "--config.report.num_heatmaps=0",
    ]  # fmt: skip


ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def finish(data, workdir):
    return subprocess.run(
        command(data, workdir), cwd=REPO, env=ENV, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def metrics(workdir):
    summary = json.loads((workdir / "metrics.json").read_text())
    return {
        k: v
        for k, v in summary["categories"]["brick"].items()
        if not k.endswith(("_seconds", "_per_second"))
    }


def test_sigterm_checkpoints_the_step_and_the_rerun_resumes_it(tmp_path, tiny_dataset):
    straight = finish(tiny_dataset, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    workdir = tmp_path / "stopped"
    proc = subprocess.Popen(
        command(tiny_dataset, workdir), cwd=REPO, env=ENV, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    stderr = []
    reader = threading.Thread(
        target=lambda: stderr.extend(iter(lambda: proc.stderr.read(1), "")),
        daemon=True,
    )
    reader.start()
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        done = re.findall(rf"(\d+)/{STEPS} ", "".join(stderr))
        if done and int(done[-1]) >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    proc.wait(timeout=60)
    took = time.time() - signalled
    reader.join(timeout=10)
    text = "".join(stderr)
    assert proc.returncode == preemption.EXIT_CODE, text[-2000:]
    assert took < 30, took  # the save and the exit, on a shared 2-core host
    assert "Traceback" not in text
    line = [s for s in text.splitlines() if s.startswith("stopped:")]
    assert len(line) == 1 and "SIGTERM" in line[0], text[-2000:]
    step = int(re.search(r"after step (\d+)", line[0]).group(1))
    assert 5 <= step < STEPS
    saved = os.listdir(workdir / "checkpoints" / "brick")
    assert sorted(int(p) for p in saved if p.isdigit()) == [step]
    assert not (workdir / "metrics.json").exists()

    resumed = finish(tiny_dataset, workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step {step}" in resumed.stderr
    assert metrics(workdir) == metrics(tmp_path / "straight")
