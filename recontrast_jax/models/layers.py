"""Layers with PyTorch semantics: BatchNorm statistics, initialisers, convolutions.

Parameter names follow Flax conventions (`kernel`, `scale`, `bias`, batch stats
`mean`, `var`) so that torchvision state dicts map onto them leaf by leaf.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision and the ReContrast code re-initialise every nn.Conv2d with
# kaiming_normal_(mode='fan_out', nonlinearity='relu'): std = sqrt(2 / (out * k * k)).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def transposed_conv_kernel_init(key, shape, dtype=jnp.float32):
    """PyTorch's default ConvTranspose2d init, for a Flax kernel (kh, kw, out, in).

    PyTorch stores the weight as (in, out, kh, kw), computes fan_in from dim 1
    (= out * kh * kw) and draws kaiming_uniform(a=sqrt(5)), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    kh, kw, out_features, _ = shape
    bound = 1.0 / math.sqrt(kh * kw * out_features)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_bias_init(fan_in: int):
    """PyTorch's default conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch semantics on NHWC inputs.

    In train mode the input is normalised with the biased batch variance and the
    running statistics are updated as PyTorch does: `new = (1 - m) * old + m * batch`
    with the *unbiased* batch variance (n / (n - 1)). Flax's own BatchNorm uses
    the biased variance and the reverse momentum convention, so it cannot be used
    for parity. Under `jax.jit` over a sharded batch the statistics are global.

    With `partial_var_threshold > 0` it is the stable scripts' PartialNorm
    (spec recontrast.md section 3.4): a floor `min_var = min(pretrained running
    variance, threshold)` per channel, read from the `pretrained_stats`
    collection (the frozen encoder's statistics, so it is the value the
    reference captures at its first forward); in train mode, channels whose
    unbiased batch variance is at most the floor are normalised with the floor
    instead (the batch mean stays differentiable) and their running variance
    moves toward the floor.

    Attributes:
      momentum: PyTorch-style momentum (weight of the new batch statistic).
      epsilon: added to the variance before the square root.
      partial_var_threshold: > 0 makes this a PartialNorm with that threshold.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    partial_var_threshold: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((features,), jnp.float32)
        )
        # Statistics and normalisation in float32 whatever the compute dtype
        # (bfloat16 means and variances are too coarse); the output keeps x's dtype.
        dtype = x.dtype
        x = x.astype(jnp.float32)
        scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            count = x.size // features
            unbiased = var * (count / max(count - 1, 1))
            if self.partial_var_threshold > 0 and not self.is_initializing():
                floor = self._variance_floor(features)
                normal = jax.lax.stop_gradient(unbiased) > floor
                var = jnp.where(normal, var, floor)
                unbiased = jnp.where(normal, unbiased, floor)
            if not self.is_initializing():
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * (
                    jax.lax.stop_gradient(mean)
                )
                running_var.value = (1 - m) * running_var.value + m * (
                    jax.lax.stop_gradient(unbiased)
                )
        else:
            mean, var = running_mean.value, running_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return ((x - mean) * inv + bias).astype(dtype)

    def _variance_floor(self, features: int) -> jax.Array:
        """PartialNorm's `min(pretrained running_var, threshold)` per channel."""
        if not self.has_variable("pretrained_stats", "var"):
            raise ValueError(
                f"PartialNorm {self.path} needs the pretrained statistics: apply "
                "with a 'pretrained_stats' collection (the frozen encoder's "
                "batch_stats)"
            )
        pretrained = self.get_variable("pretrained_stats", "var")
        return jnp.minimum(pretrained, self.partial_var_threshold).astype(jnp.float32)


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """The jnp dtype of `config.model.dtype` ('float32' or 'bfloat16')."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"model.dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}"
        )
    return COMPUTE_DTYPES[name]


def cast_floating(tree, dtype):
    """Casts the floating-point leaves of `tree` to `dtype` (mixed precision).

    Parameters stay float32 in the state; a step casts them (and the images) to
    the compute dtype, so convolutions run in bfloat16 while gradients, which
    flow back through the cast, and optimiser updates stay float32.
    """
    if dtype == jnp.float32:
        return tree
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def on_cpu_else_native(*args, cpu, native):
    """`cpu(*args)` when lowered for the CPU, `native(*args)` for any other platform.

    The matmul formulations below are tuned for XLA's CPU backend; GPUs and TPUs
    run XLA's own convolutions faster. The choice is made when the program is
    lowered for its platform (`jax.lax.platform_dependent`), so a program
    lowered or exported here for `cuda` or `tpu` holds only the native path.
    """
    return jax.lax.platform_dependent(*args, cpu=cpu, default=native)


# Image, kernel and output layouts of every convolution here.
CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def pointwise_conv_matmul(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A bias-free 1x1 conv as one matmul (a stride keeps every stride-th pixel)."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])


def pointwise_conv_native(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """The same 1x1 conv as XLA's convolution."""
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), "VALID", dimension_numbers=CONV_DIMENSIONS
    )


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A bias-free 1x1 conv: a matmul on the CPU, XLA's convolution elsewhere."""
    return on_cpu_else_native(
        x,
        kernel,
        cpu=functools.partial(pointwise_conv_matmul, stride=stride),
        native=functools.partial(pointwise_conv_native, stride=stride),
    )


class PointwiseConv(nn.Module):
    """A 1x1 conv (stride 1 or 2, no padding, optional bias), see `pointwise_conv`.

    The same `kernel` (1, 1, in, out), `bias` (out,) and initialisation as
    `nn.Conv`, so checkpoints and weight conversion are unchanged; XLA's CPU
    convolution (and its weight gradient) is 2-4x slower than its matmul for
    1x1 kernels.

    Attributes:
      features: output channels.
      stride: stride in both directions.
      use_bias: add a bias, initialised as PyTorch's default conv bias.
    """

    features: int
    stride: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", conv_kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32
        ).astype(x.dtype)
        y = pointwise_conv(x, kernel, self.stride)
        if self.use_bias:
            bias = self.param(
                "bias", torch_default_bias_init(x.shape[-1]), (self.features,)
            )
            y = y + bias.astype(y.dtype)
        return y


def _pad_same3(x: jax.Array) -> jax.Array:
    """Zero padding of 1 pixel on each side of H and W (PyTorch's padding=1)."""
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _tap_views(x: jax.Array, stride: int) -> list[jax.Array]:
    """The 9 shifted, strided views of padded `x` that a 3x3 conv multiplies.

    View t = 3 i + j is tap (i, j): (B, H', W', C) with H' = (H - 1) // stride + 1,
    the conv's output size.
    """
    height = (x.shape[1] - 1) // stride + 1
    width = (x.shape[2] - 1) // stride + 1
    padded = _pad_same3(x)
    return [
        padded[
            :,
            i : i + stride * (height - 1) + 1 : stride,
            j : j + stride * (width - 1) + 1 : stride,
            :,
        ]
        for i in range(3)
        for j in range(3)
    ]


def conv3x3_native(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A 3x3 conv with padding 1 (NHWC, HWIO) as XLA's convolution."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((1, 1), (1, 1)),
        dimension_numbers=CONV_DIMENSIONS,
    )


def conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A 3x3 conv with padding 1 (NHWC, HWIO), as `lax.conv_general_dilated`.

    Stride 1 is XLA's convolution everywhere; stride 2 is `strided_conv3x3` on
    the CPU (the same values and gradients up to float summation order) and
    XLA's convolution on other platforms.
    """
    if stride == 1:
        return conv3x3_native(x, kernel, 1)
    return on_cpu_else_native(
        x,
        kernel,
        cpu=lambda a, k: strided_conv3x3(a, k, stride),
        native=lambda a, k: conv3x3_native(a, k, stride),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def strided_conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A strided 3x3 conv computed the way XLA's CPU backend runs it fastest.

    * forward: one matmul over the 9 stacked tap views (im2col), 1.5x faster
      than XLA's convolution at 64x64 with 256 channels;
    * input gradient: XLA's transposed convolution;
    * kernel gradient: `conv3x3_kernel_gradient`, 2-13x faster than XLA's
      own at wide_resnet50_2's stride-2 shapes
      (`benchmarks/conv_kernel_gradient.py`).

    The tap views are rebuilt in the backward pass rather than kept (they
    are 9/stride^2 times the input).
    """
    cols = jnp.concatenate(_tap_views(x, stride), axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", cols, kernel.reshape(-1, kernel.shape[-1]))


def conv3x3_kernel_gradient(
    x: jax.Array, grad: jax.Array, stride: int, kernel: jax.Array
) -> jax.Array:
    """d(loss)/d(kernel) of `conv3x3(x, kernel, stride)` given the output's `grad`.

    One matmul per kernel row i: the 3 tap views (i, 0..2) stacked along
    channels, contracted with `grad` over batch and pixels. At stride 1 it is
    also 1-9x faster than XLA's kernel gradient on its own, and made the
    wide_resnet50_2 train step about 20% faster at batch 8, but it raised
    XLA's temporary memory there from 7.0 to 9.7 GB (peak host memory 22.7 GiB
    at batch 16), so stride 1 keeps XLA's.
    """
    views = _tap_views(x, stride)
    rows = []
    for i in range(3):
        cols = jnp.concatenate(views[3 * i : 3 * i + 3], axis=-1)
        # Under a sharded batch the sum over pixels is a cross-device reduction
        # to the kernel's (replicated) layout, which must be named.
        row = jnp.einsum(
            "bhwk,bhwo->ko", cols, grad, out_sharding=jax.typeof(kernel).sharding
        )
        rows.append(row.reshape(kernel.shape[1:]))
    return jnp.stack(rows).astype(kernel.dtype)


def _strided_conv3x3_fwd(x, kernel, stride):
    return strided_conv3x3(x, kernel, stride), (x, kernel)


def _strided_conv3x3_bwd(stride, residuals, grad):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda a: conv3x3_native(a, kernel, stride), x)
    (grad_x,) = input_vjp(grad)
    return grad_x, conv3x3_kernel_gradient(x, grad, stride, kernel)


strided_conv3x3.defvjp(_strided_conv3x3_fwd, _strided_conv3x3_bwd)


class Conv3x3(nn.Module):
    """A bias-free 3x3 conv with padding 1 and stride 1 or 2 (see `conv3x3`).

    The same `kernel` (3, 3, in, out) and initialisation as `nn.Conv`, so
    checkpoints and weight conversion are unchanged.

    Attributes:
      features: output channels.
      stride: stride in both directions.
    """

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", conv_kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32
        ).astype(x.dtype)
        return conv3x3(x, kernel, self.stride)


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    name: str | None = None,
    groups: int = 1,
) -> nn.Module:
    """A bias-free conv with PyTorch's symmetric padding (k // 2 on each side).

    Args:
      features: output channels.
      kernel: square kernel side.
      stride: stride in both directions.
      name: module name (a torchvision key with `.N` written `_N`).
      groups: PyTorch `groups` (ResNeXt's grouped 3x3 conv); the Flax kernel is
        (k, k, in // groups, features), the transposed PyTorch weight.

    Returns:
      `PointwiseConv` (1x1), `Conv3x3` (ungrouped 3x3) or `nn.Conv`.
    """
    if kernel == 1 and groups == 1:
        return PointwiseConv(features, stride, name=name)
    if kernel == 3 and groups == 1 and stride in (1, 2):
        return Conv3x3(features, stride, name=name)
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=conv_kernel_init,
        name=name,
    )


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow 'SAME' padding of one side: (before, after, output size)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def depthwise_conv_taps(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A depthwise conv with 'SAME' padding as a sum of k*k scaled shifted views.

    XLA's CPU grouped convolution with one channel per group is 8-31x slower
    forward and 4-15x slower in the gradient than these elementwise
    multiply-adds (measured on (16, 64..8, 64..8, 96..480) inputs).
    """
    k = kernel.shape[0]
    top, bottom, height = same_padding(x.shape[1], k, stride)
    left, right, width = same_padding(x.shape[2], k, stride)
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out = None
    for i in range(k):
        for j in range(k):
            view = padded[
                :,
                i : i + stride * (height - 1) + 1 : stride,
                j : j + stride * (width - 1) + 1 : stride,
                :,
            ]
            term = view * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def depthwise_conv_native(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """The same depthwise conv as XLA's grouped convolution."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        "SAME",
        dimension_numbers=CONV_DIMENSIONS,
        feature_group_count=x.shape[-1],
    )


class DepthwiseConv(nn.Module):
    """A bias-free depthwise kxk conv with TensorFlow 'SAME' padding.

    The `kernel` is (k, k, 1, channels), as `nn.Conv` with
    `feature_group_count=channels` keeps it; the CPU runs `depthwise_conv_taps`,
    other platforms XLA's convolution.

    Attributes:
      kernel_size: the square kernel's side.
      stride: stride in both directions.
    """

    kernel_size: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size, self.kernel_size, 1, x.shape[-1])
        kernel = self.param("kernel", conv_kernel_init, shape, jnp.float32)
        return on_cpu_else_native(
            x,
            kernel.astype(x.dtype),
            cpu=functools.partial(depthwise_conv_taps, stride=self.stride),
            native=functools.partial(depthwise_conv_native, stride=self.stride),
        )


def transposed_conv2x2_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 2x2, stride-2 transposed conv as one matmul per tap and an interleave."""
    batch, height, width, _ = x.shape
    taps = jnp.einsum("bhwc,pqoc->bhpwqo", x, kernel)
    # Under a sharded batch the merged layout must be named (same as x's).
    return jax.lax.reshape(
        taps,
        (batch, 2 * height, 2 * width, kernel.shape[2]),
        out_sharding=jax.typeof(x).sharding,
    )


def transposed_conv2x2_native(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The same transposed conv as XLA's (dilated) convolution."""
    return jax.lax.conv_transpose(
        x,
        kernel,
        (2, 2),
        "VALID",
        dimension_numbers=CONV_DIMENSIONS,
        transpose_kernel=True,
    )


class TransposedConv2x2(nn.Module):
    """PyTorch's ConvTranspose2d(k=2, s=2, bias=False): out[2i + a, 2j + b] = x[i, j] . W[a, b].

    The kernel is stored as Flax's `ConvTranspose(transpose_kernel=True)` stores
    it, (kh, kw, out, in) = the PyTorch weight (in, out, kh, kw) transposed, so
    checkpoints and weight conversion are unchanged. With stride = kernel the
    output cells do not overlap, so on the CPU the layer is one matmul per
    kernel tap followed by an interleave; XLA's CPU lowering of the same op (and
    of its gradient) is ~60x slower. Other platforms get XLA's op.

    Attributes:
      features: output channels.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            transposed_conv_kernel_init,
            (2, 2, self.features, x.shape[-1]),
            jnp.float32,
        ).astype(x.dtype)
        return on_cpu_else_native(
            x, kernel, cpu=transposed_conv2x2_matmul, native=transposed_conv2x2_native
        )


def transposed_conv2x2(features: int, name: str | None = None) -> TransposedConv2x2:
    """The decoder's 2x2, stride-2 transposed conv (see `TransposedConv2x2`)."""
    return TransposedConv2x2(features, name=name)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """The ResNet stem max-pool: 3x3, stride 2, symmetric padding 1 with -inf."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def count_params(tree) -> int:
    """Number of scalar parameters in a pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
