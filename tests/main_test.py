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


def one_error_line(proc):
    """The stderr lines that are not absl/JAX start-up logging."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_misspelled_override_is_one_line_with_the_suggestion(tmp_path):
    line = one_error_line(run_main(f"--workdir={tmp_path}", "--config.train.stepz=5"))
    assert line == "error: --config: unknown field 'stepz' (did you mean 'steps'?)"


def test_missing_config_file_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "recontrast_jax.main", "--config=configs/nope.py",
         f"--workdir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = one_error_line(proc)
    assert (
        line
        == "error: --config: cannot load configs/nope.py: No such file or directory"
    )


def test_crop_larger_than_image_fails_before_any_work(tmp_path):
    work = tmp_path / "work"
    line = one_error_line(run_main(f"--workdir={work}", "--config.data.image_size=64"))
    assert "config.data.crop_size=96" in line and "config.data.image_size=64" in line
    assert not work.exists()


def test_missing_weights_file_is_one_line_naming_it(tmp_path):
    weights = tmp_path / "nope.msgpack"
    line = one_error_line(
        run_main(
            f"--workdir={tmp_path / 'work'}", f"--config.model.pretrained={weights}"
        )
    )
    assert str(weights) in line


def test_verbosity_1_adds_the_traceback(tmp_path):
    proc = run_main(
        f"--workdir={tmp_path / 'work'}", "--config.data.image_size=64", "--verbosity=1"
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_badly_typed_override_is_one_line(tmp_path):
    line = one_error_line(run_main(f"--workdir={tmp_path}", "--config.train.steps=abc"))
    assert "--config.train.steps=abc" in line


def test_corrupt_training_image_is_one_line_without_tensorflow_noise(tmp_path):
    from PIL import Image

    train = tmp_path / "data" / "widget" / "train" / "good"
    test = tmp_path / "data" / "widget" / "test" / "good"
    train.mkdir(parents=True)
    test.mkdir(parents=True)
    for folder_, name in ((train, "000.png"), (train, "001.png"), (test, "000.png")):
        Image.new("RGB", (40, 40), (90, 120, 30)).save(folder_ / name)
    broken = train / "002.png"
    broken.write_bytes((train / "000.png").read_bytes()[:60])  # truncated
    proc = run_main(
        f"--workdir={tmp_path / 'work'}",
        "--config.data.source=folder",
        f"--config.data.root={tmp_path / 'data'}",
        "--config.data.categories=widget",
        "--config.data.image_size=32",
        "--config.data.crop_size=32",
        "--config.train.steps=1",
        "--config.train.batch_size=2",
    )
    line = one_error_line(proc)
    assert "cannot read image" in line and str(broken) in line
    assert "OP_REQUIRES" not in proc.stderr
    assert len(proc.stderr.splitlines()) < 15, proc.stderr


def test_evaluate_without_a_checkpoint_creates_nothing(tmp_path):
    work = tmp_path / "work"
    line = one_error_line(run_main(f"--workdir={work}", "--config.mode=evaluate"))
    assert str(work) in line and "train first" in line
    assert not work.exists()
    work.mkdir()
    line = one_error_line(run_main(f"--workdir={work}", "--config.mode=evaluate"))
    assert "No checkpoint in" in line
    assert not (work / "checkpoints").exists()


def test_the_console_shows_no_library_logs_unless_asked(tmp_path):
    """No absl INFO lines and no probing for a TPU (JAX_PLATFORMS unset, so JAX
    probes every backend); `--verbosity=0` brings the INFO lines back."""
    args = [
        sys.executable, "-m", "recontrast_jax.main", "--config",
        "configs/quickstart.py", f"--workdir={tmp_path / 'work'}",
        "--config.mode=evaluate",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    quiet = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert quiet.stderr.splitlines() == [
        f"error: Workdir {tmp_path / 'work'} does not exist: nothing to evaluate; "
        "train first (mode 'train')."
    ]
    verbose = subprocess.run(
        [*args, "--verbosity=0"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert "] JAX " in verbose.stderr  # main's INFO line with the device count
