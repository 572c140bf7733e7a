"""A training run that is killed, restarted, preempted and restarted again ends
exactly like an uninterrupted one.

One workdir goes through both interruptions, so the suite trains the
reference run once: SIGKILL after the first periodic checkpoint (the restart
resumes from it), then SIGTERM during the restarted run (the step is
checkpointed and the run exits with `preemption.EXIT_CODE`), then a run to the
end. The batch of 4 over 5 training images makes every epoch end in a partial
batch, which the resumed input stream must reproduce.
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
STEPS, EVERY = 150, 10


def command(data, workdir):
    return [
        sys.executable, "-m", "recontrast_jax.main",
        "--config", "configs/quickstart.py", f"--workdir={workdir}",
        "--config.data.source=folder", f"--config.data.root={data}",
        "--config.data.categories=brick", "--config.model.arch=resnet_tiny",
        "--config.model.pretrained=", "--config.data.image_size=32",
        "--config.data.crop_size=32", f"--config.train.steps={STEPS}",
        "--config.train.batch_size=4", "--config.eval.batch_size=4",
        f"--config.eval.every={STEPS}", f"--config.checkpoint.every={EVERY}",
        "--config.report.num_heatmaps=0",
    ]  # fmt: skip


def finish(data, workdir, env):
    return subprocess.run(
        command(data, workdir), cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def metrics(workdir):
    summary = json.loads((workdir / "metrics.json").read_text())
    return {
        k: v
        for k, v in summary["categories"]["brick"].items()
        if not k.endswith(("_seconds", "_per_second"))
    }


def saved_steps(workdir):
    names = os.listdir(workdir / "checkpoints" / "brick")
    return sorted(int(p) for p in names if p.isdigit())


def start(data, workdir, env):
    """The run, with its stderr collected as it comes."""
    proc = subprocess.Popen(
        command(data, workdir), cwd=REPO, env=env, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    stderr = []
    reader = threading.Thread(
        target=lambda: stderr.extend(iter(lambda: proc.stderr.read(1), "")),
        daemon=True,
    )
    reader.start()
    return proc, stderr, reader


def wait_for(proc, condition, timeout=300):
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not condition():
        time.sleep(0.01)


def kill_after_first_checkpoint(data, workdir, env):
    proc, _, _ = start(data, workdir, env)
    first = workdir / "checkpoints" / "brick" / str(EVERY)
    wait_for(proc, first.exists)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "metrics.json").exists(), "it finished before the kill"


def preempt(data, workdir, env, after_step):
    """SIGTERM once the progress bar shows `after_step`; returns (step, stderr)."""
    proc, stderr, reader = start(data, workdir, env)

    def past():
        done = re.findall(rf"(\d+)/{STEPS} ", "".join(stderr))
        return bool(done) and int(done[-1]) >= after_step

    wait_for(proc, past)
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
    return int(re.search(r"after step (\d+)", line[0]).group(1)), text


def test_killed_then_preempted_training_ends_like_an_uninterrupted_run(
    tmp_path, tiny_dataset, cli_env
):
    straight = finish(tiny_dataset, tmp_path / "straight", cli_env)
    assert straight.returncode == 0, straight.stderr[-2000:]
    workdir = tmp_path / "interrupted"

    kill_after_first_checkpoint(tiny_dataset, workdir, cli_env)
    killed_at = max(saved_steps(workdir))
    assert EVERY <= killed_at < STEPS

    step, text = preempt(tiny_dataset, workdir, cli_env, after_step=killed_at + 5)
    assert f"resuming from step {killed_at}" in text
    assert killed_at + 5 <= step < STEPS
    assert max(saved_steps(workdir)) == step  # the step itself, not the last period
    assert not (workdir / "metrics.json").exists()

    resumed = finish(tiny_dataset, workdir, cli_env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step {step}" in resumed.stderr
    assert metrics(workdir) == metrics(tmp_path / "straight")
