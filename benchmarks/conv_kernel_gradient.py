"""Kernel gradient of a 3x3 convolution: XLA's against `layers.conv3x3`'s.

At the stride-1 and stride-2 3x3 shapes of the wide_resnet50_2 ReContrast train
step (batch 16, 256 px; the bottleneck and decoder see both halves, batch 32),
times d(loss)/d(kernel) computed by

* `xla`: the gradient XLA derives for `lax.conv_general_dilated` (a
  convolution over the transposed activations);
* `rows`: `layers.conv3x3_kernel_gradient`, three matmuls over stacked tap
  views, the one `layers.conv3x3` uses in its backward pass at stride 2;

and prints the best of 3 wall times, GFLOP/s and the largest relative
difference between the two.

Usage:  python benchmarks/conv_kernel_gradient.py [--repeats 3]

Prints one markdown table; asserts nothing.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from recontrast_jax.models import layers

# (batch, input size, input channels, output channels, stride)
SHAPES = (
    (16, 64, 64, 64, 1),
    (16, 32, 128, 128, 1),
    (16, 16, 256, 256, 1),
    (32, 64, 128, 128, 1),
    (32, 32, 256, 256, 1),
    (16, 64, 128, 128, 2),
    (32, 64, 256, 512, 2),
)


def xla_kernel_gradient(x, kernel, grad, stride):
    conv = lambda k: layers.conv3x3_native(x, k, stride)  # noqa: E731
    return jax.vjp(conv, kernel)[1](grad)[0]


def rows_kernel_gradient(x, kernel, grad, stride):
    return layers.conv3x3_kernel_gradient(x, grad, stride, kernel)


def best_time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        "| batch x size x in -> out, stride | xla | rows | speed-up | max rel. diff |"
    )
    print("|---|---:|---:|---:|---:|")
    for batch, size, cin, cout, stride in SHAPES:
        out_size = size // stride
        x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
        grad = jnp.asarray(
            rng.normal(size=(batch, out_size, out_size, cout)), jnp.float32
        )
        gflop = 2 * batch * out_size**2 * 9 * cin * cout / 1e9
        results = {}
        for name, fn in (("xla", xla_kernel_gradient), ("rows", rows_kernel_gradient)):
            jitted = jax.jit(fn, static_argnums=3)
            seconds = best_time(jitted, (x, kernel, grad, stride), args.repeats)
            results[name] = (seconds, jitted(x, kernel, grad, stride))
        (xla_s, xla_out), (rows_s, rows_out) = results["xla"], results["rows"]
        diff = float(jnp.max(jnp.abs(rows_out - xla_out)) / jnp.max(jnp.abs(xla_out)))
        print(
            f"| {batch} x {size}^2 x {cin} -> {cout}, {stride} "
            f"| {xla_s:.3f} s ({gflop / xla_s:.0f} GFLOP/s) "
            f"| {rows_s:.3f} s ({gflop / rows_s:.0f} GFLOP/s) "
            f"| {xla_s / rows_s:.1f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
