"""benchmarks/accelerator_check.py runs with no TensorFlow and no TFDS installed.

Accelerator machines may have only the JAX stack, so the check, the models,
the ReContrast train step and predict must import and run without them. The
script is run in subprocesses whose imports of tensorflow and
tensorflow_datasets fail (a `sitecustomize` on PYTHONPATH installs the block
in every child the script starts too).
"""

import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accelerator_check.py"

BLOCKER = textwrap.dedent(
    """
    import sys

    class NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
                raise ImportError(f"{name} is blocked (not on accelerator machines)")

    sys.meta_path.insert(0, NoTensorFlow())
    """
)


def run_check(tmp_path, *args):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_blocker_blocks_tensorflow(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", "import recontrast_jax.data.input_pipeline"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "tensorflow is blocked" in result.stderr


def test_on_a_cpu_it_says_no_accelerator_and_exits_cleanly(tmp_path):
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no accelerator"), result.stdout


def test_smoke_run_measures_every_setting_and_the_two_paths_agree(tmp_path):
    result = run_check(tmp_path, "--smoke", "--steps", "1", "--batch", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| train") or "| predict" in line]
    assert len(rows) == 4, result.stdout  # train and predict, float32 and bfloat16
    assert any("bfloat16" in row for row in rows)
    parity = next(line for line in lines if line.startswith("native convolutions"))
    # "maps 1.2e-07, scores ..., loss ..., gradient ...": all tiny on one CPU.
    values = [float(part.split()[-1]) for part in parity.split(": ")[1].split(", ")]
    assert len(values) == 4 and max(values) < 1e-5, parity
