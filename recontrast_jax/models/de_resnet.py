"""ReContrast's bottleneck (multi-scale fusion + one-class embedding) and decoder.

The bottleneck is the authors' `BN_layer` without the unused `conv4`/`bn4`; the
decoder is the mirrored ResNet of `de_resnet.py` whose stride-2 stages upsample
with 2x2 transposed convolutions, followed by two sets of 1x1 output heads (one
per reconstruction direction). Names mirror the PyTorch modules.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from recontrast_jax.models import backbones
from recontrast_jax.models.layers import (
    BatchNorm,
    PointwiseConv,
    conv,
    transposed_conv2x2,
)
from recontrast_jax.models.resnet import ArchSpec, get_arch, run_stage


def decoder_spec(arch: str) -> ArchSpec:
    """The ResNet shape that the bottleneck and decoder of `arch` mirror.

    A ResNet-family encoder is mirrored as the authors do. Any other encoder of
    the `backbones` contract gets ResNet-18's shape (BasicBlocks, two per
    stage, two in the one-class embedding) with its own feature channels as the
    widths, so the decoder reconstructs exactly the maps the encoder returns.
    """
    if backbones.is_resnet(arch):
        return get_arch(arch)
    return ArchSpec(
        "basic", (2, 2, 2), planes=backbones.feature_channels(arch), oce_blocks=2
    )


class FusionBottleneck(nn.Module):
    """Multi-scale feature fusion followed by the one-class embedding layer.

    Input: the three encoder maps (already batch-concatenated by the caller).
    Output: one map at 1/32 of the image side (2048 channels for wide ResNets).
    """

    arch: str

    @nn.compact
    def __call__(self, features: list[jax.Array], train: bool) -> jax.Array:
        spec = decoder_spec(self.arch)
        c1, c2, c3 = spec.stage_channels
        del c1
        x0, x1, x2 = features
        l1 = nn.relu(BatchNorm(name="bn1")(conv(c2, 3, 2, name="conv1")(x0), train))
        l1 = nn.relu(BatchNorm(name="bn2")(conv(c3, 3, 2, name="conv2")(l1), train))
        l2 = nn.relu(BatchNorm(name="bn3")(conv(c3, 3, 2, name="conv3")(x1), train))
        fused = jnp.concatenate([l1, l2, x2], axis=-1)
        oce_planes = 2 * spec.planes[2]
        return run_stage(spec, fused, "bn_layer", oce_planes, spec.oce_blocks, 2, train)


def shortcut(x: jax.Array, out_channels: int, upsample: bool, train: bool):
    """Identity, or the `upsample` branch: 2x2/s2 transposed conv + BatchNorm.

    Called inside a compact block, so the modules it creates belong to that block.
    """
    if not upsample:
        return x
    y = transposed_conv2x2(out_channels, name="upsample_0")(x)
    return BatchNorm(name="upsample_1")(y, train)


# The multi-class scripts swap every decoder nn.ReLU for nn.GELU() (exact erf).
ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
}


def activation_fn(name: str):
    """The decoder activation `name` ('relu' or 'gelu')."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"model.decoder_activation must be one of {', '.join(ACTIVATIONS)}; "
            f"got {name!r}"
        )
    return ACTIVATIONS[name]


class DeBasicBlock(nn.Module):
    """Decoder BasicBlock: conv1 is a 2x2/s2 transposed conv when upsampling."""

    planes: int
    stride: int = 1
    upsample: bool = False
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.stride == 2:
            out = transposed_conv2x2(self.planes, name="conv1")(x)
        else:
            out = conv(self.planes, 3, name="conv1")(x)
        act = activation_fn(self.activation)
        out = act(BatchNorm(name="bn1")(out, train))
        out = BatchNorm(name="bn2")(conv(self.planes, 3, name="conv2")(out), train)
        return act(out + shortcut(x, self.planes, self.upsample, train))


class DeBottleneck(nn.Module):
    """Decoder Bottleneck: conv2 is a 2x2/s2 transposed conv when upsampling."""

    planes: int
    stride: int = 1
    upsample: bool = False
    width_per_group: int = 64
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = activation_fn(self.activation)
        width = int(self.planes * (self.width_per_group / 64.0))
        out = act(BatchNorm(name="bn1")(conv(width, 1, name="conv1")(x), train))
        if self.stride == 2:
            out = transposed_conv2x2(width, name="conv2")(out)
        else:
            out = conv(width, 3, name="conv2")(out)
        out = act(BatchNorm(name="bn2")(out, train))
        out = BatchNorm(name="bn3")(conv(self.planes * 4, 1, name="conv3")(out), train)
        return act(out + shortcut(x, self.planes * 4, self.upsample, train))


def run_decoder_stage(
    spec: ArchSpec,
    x: jax.Array,
    prefix: str,
    planes: int,
    blocks: int,
    train: bool,
    activation: str = "relu",
) -> jax.Array:
    """Decoder `_make_layer` with stride 2: only block 0 upsamples."""
    for i in range(blocks):
        stride, upsample = (2, True) if i == 0 else (1, False)
        name = f"{prefix}_{i}"
        if spec.block == "basic":
            block = DeBasicBlock(planes, stride, upsample, activation, name=name)
        else:
            block = DeBottleneck(
                planes, stride, upsample, spec.width_per_group, activation, name=name
            )
        x = block(x, train)
    return x


class Decoder(nn.Module):
    """Mirrored ResNet decoder with two sets of 1x1 output heads.

    Returns six maps: `[out1_0(f1), out2_0(f2), out3_0(f3), out1_1(f1),
    out2_1(f2), out3_1(f3)]`, where f1 is the largest (layer1-sized) map.

    Attributes:
      arch: encoder architecture it mirrors.
      activation: 'relu', or 'gelu' (exact erf) as in the multi-class scripts.
    """

    arch: str
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        spec = decoder_spec(self.arch)
        stage = functools.partial(
            run_decoder_stage, spec, train=train, activation=self.activation
        )
        f3 = stage(x, "layer1", spec.planes[2], spec.layers[0])
        f2 = stage(f3, "layer2", spec.planes[1], spec.layers[1])
        f1 = stage(f2, "layer3", spec.planes[0], spec.layers[2])
        outputs = []
        for head_set in range(2):
            for level, feature in enumerate((f1, f2, f3), start=1):
                outputs.append(output_head(feature, f"out{level}_{head_set}"))
        return outputs


def output_head(x: jax.Array, name: str) -> jax.Array:
    """A 1x1 conv with bias (kaiming fan_out kernel, PyTorch default bias)."""
    return PointwiseConv(x.shape[-1], use_bias=True, name=name)(x)
