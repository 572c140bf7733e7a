"""Memory per image and the largest batch per device for the ReContrast train step.

Activation memory is what the backward pass keeps: the residuals JAX saves
for the gradient (the leaves of `jax.vjp`'s closure, from tracing only, no
compilation). Measured at batch 1 and 2, the difference is the memory per
image; the fixed part is the training state (trainable parameters, their
gradients, two Adam moments, BatchNorm statistics, the frozen encoder). The
largest batch leaves 10% of the device free; XLA's own buffer reuse can only
make the real footprint smaller than the residual sum, but temporary buffers
inside fused ops are not counted.

Usage:  python benchmarks/scale.py [--arch wide_resnet50_2] [--sizes 256,512]

Prints one markdown table; asserts nothing.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from recontrast_jax import default_config, losses
from recontrast_jax.methods import recontrast as recontrast_method
from recontrast_jax.models import recontrast

DEVICES_GB = (16, 40, 80)


def residual_bytes(arch: str, state, size: int, batch: int) -> int:
    """Bytes of the residuals saved for the backward pass of one train step."""
    images = jnp.zeros((batch, size, size, 3), jnp.float32)
    frozen = recontrast.frozen_encoder_features(arch, state.frozen, images)
    model = recontrast.ReContrast(arch)

    def loss_fn(params):
        (targets, recons), _ = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images, frozen, train=True, encoder_train=True, mutable=["batch_stats"],
        )  # fmt: skip
        return losses.recontrast_loss(targets, recons, 1.0)

    # The VJP closure's leaves are the residuals; eval_shape only traces.
    residuals = jax.eval_shape(
        lambda p: jax.tree_util.tree_leaves(jax.vjp(loss_fn, p)[1]), state.params
    )
    return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in residuals)


def tree_bytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="wide_resnet50_2")
    parser.add_argument("--sizes", default="256,512")
    args = parser.parse_args()
    tx = recontrast_method.make_optimizer(default_config.get_config().optimizer)
    state = recontrast_method.create_train_state(args.arch, 64, tx, jax.random.key(0))
    # State, plus one gradient per trainable parameter.
    fixed = tree_bytes(state) + tree_bytes(state.params)
    header = " | ".join(f"largest batch / {g} GB" for g in DEVICES_GB)
    print(f"| image size | state + gradients | activations per image | {header} |")
    print("|---|---:|---:|" + "---:|" * len(DEVICES_GB))
    for size in (int(s) for s in args.sizes.split(",")):
        one = residual_bytes(args.arch, state, size, 1)
        per_image = residual_bytes(args.arch, state, size, 2) - one
        batches = [
            max(int((0.9 * g * 1e9 - fixed - (one - per_image)) // per_image), 0)
            for g in DEVICES_GB
        ]
        cells = " | ".join(str(b) for b in batches)
        print(f"| {size} | {fixed / 1e9:.2f} GB | {per_image / 1e6:.0f} MB | {cells} |")


if __name__ == "__main__":
    main()
