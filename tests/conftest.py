"""Test-session setup.

torchvision (the parity tests' oracle) crashes the interpreter with a
segmentation fault when it is first imported after TensorFlow (seen with
torchvision 0.29 / TensorFlow 2.21: its triton import clashes with TensorFlow's
native libraries). Importing it first, when it is installed, avoids that; the
library itself never imports torchvision.
"""

try:
    import torchvision  # noqa: F401
except ImportError:
    pass

import os  # noqa: E402

import pytest  # noqa: E402

# LLVM optimisation off, for this process and the runs it starts: compiling
# dominates the suite (20 min 14 s with it on, 13 min 34 s off, on a 2-vCPU
# Zen 4), the tests check values and behaviour, not speed, and float
# semantics do not change (no fast-math either way). Set before any test
# imports JAX, whose CPU backend reads it when it starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()


@pytest.fixture
def tiny_dataset(tmp_path):
    """A small embedded dataset (48 px, 6 training images per category)."""
    from recontrast_jax.data import synthetic

    return synthetic.ensure_embedded_dataset(
        tmp_path / "data",
        image_size=48,
        num_train=6,
        num_test_good=3,
        num_test_per_defect=1,
    )


@pytest.fixture
def cli_env():
    """The environment of command-line runs in fault tests: the CPU, with the
    compile-light flags above."""
    return dict(os.environ, JAX_PLATFORMS="cpu")
