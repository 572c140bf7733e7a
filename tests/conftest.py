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
    """The environment of command-line runs in fault tests: the CPU, with
    LLVM's optimisation off, which halves the compile time that dominates
    them (they check behaviour, not speed)."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_backend_optimization_level=0",
    )
