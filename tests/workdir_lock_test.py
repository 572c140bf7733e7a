"""One run per workdir: a live holder stops a second run; a killed one does not."""

import os
import signal
import subprocess
import sys

from recontrast_jax import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = (
    "import sys, time\n"
    "from recontrast_jax import workdir_lock\n"
    "with workdir_lock.held(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(300)\n"
)


def start_holder(workdir):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_stops_naming_the_workdir_and_the_holder(tmp_path):
    workdir = tmp_path / "work"
    holder = start_holder(workdir)
    try:
        proc = subprocess.run(
            [
                sys.executable, "-m", "recontrast_jax.main",
                "--config", "configs/quickstart.py", f"--workdir={workdir}",
            ],
            cwd=REPO, capture_output=True, text=True, timeout=300,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert str(workdir) in errors[0] and f"PID {holder.pid}" in errors[0]
    assert not (workdir / "checkpoints").exists()


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    workdir = tmp_path / "work"
    holder = start_holder(workdir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (workdir / workdir_lock.LOCK_FILE).exists()  # the stale file stays
    with workdir_lock.held(str(workdir)):
        pid = (workdir / workdir_lock.LOCK_FILE).read_text().strip()
        assert pid == str(os.getpid())
