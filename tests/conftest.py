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
