"""Times reading + converting wide_resnet50_2 encoder weights (V1 layout) to Flax.

  python benchmarks/convert_timing.py

Writes a random state dict with torchvision's key names and shapes (no download)
as .safetensors (and .pth when PyTorch is installed) into a temporary folder,
then times `pretrained.load_encoder_variables` on each file.
"""

import os
import tempfile
import time

import jax
import numpy as np
from safetensors.numpy import save_file

from recontrast_jax import pretrained
from recontrast_jax.models import recontrast

ARCH = "wide_resnet50_2"


def main():
    template, _ = jax.eval_shape(
        lambda r: recontrast.init_variables(ARCH, r, 64), jax.random.key(0)
    )
    encoder = {c: template[c]["encoder"] for c in ("params", "batch_stats")}
    rng = np.random.default_rng(0)
    random_vars = jax.tree_util.tree_map(
        lambda s: rng.normal(size=s.shape).astype(np.float32), encoder
    )
    state_dict = pretrained.variables_to_state_dict(random_vars)
    size_mb = sum(v.nbytes for v in state_dict.values()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        files = {"safetensors": os.path.join(tmp, "w.safetensors")}
        save_file(state_dict, files["safetensors"])
        try:
            import torch

            files["pth"] = os.path.join(tmp, "w.pth")
            torch.save(
                {k: torch.from_numpy(v) for k, v in state_dict.items()}, files["pth"]
            )
        except ImportError:
            pass
        print(f"{ARCH} encoder: {len(state_dict)} tensors, {size_mb:.0f} MiB")
        print("| format | read + convert (s), best of 3 |")
        print("|---|---:|")
        for name, path in files.items():
            times = []
            for _ in range(3):
                start = time.perf_counter()
                pretrained.load_encoder_variables(ARCH, path, encoder)
                times.append(time.perf_counter() - start)
            print(f"| {name} | {min(times):.2f} |")


if __name__ == "__main__":
    main()
