"""ResNet, WideResNet and ResNeXt encoders with torchvision's architecture and naming.

The encoders stop after `layer3` (ReContrast sets `layer4 = fc = None`) and return
the three stage outputs. Module names mirror torchvision's state-dict keys with
dots before indices replaced by underscores (`layer1.0.downsample.1` becomes
`layer1_0/downsample_1`), so weight conversion is a path mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax

from recontrast_jax.models.layers import (
    BatchNorm,
    conv,
    conv_kernel_init,
    max_pool_3x3_s2,
)


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Shape of a ResNet-family encoder and of the ReContrast parts built on it.

    Attributes:
      block: 'basic' (BasicBlock, expansion 1) or 'bottleneck' (expansion 4).
      layers: blocks per stage for layer1..layer3 (the decoder mirrors them).
      width_per_group: 64 for ResNets, 128 for wide ResNets, 8 for ResNeXt-32x8d.
      stem_features: channels of the 7x7 stem conv.
      planes: base planes of layer1..layer3 (torchvision: 64, 128, 256).
      oce_blocks: blocks of the bottleneck's one-class-embedding layer.
      groups: groups of the encoder Bottleneck's 3x3 conv (32 for ResNeXt). Only
        the encoder uses it; ReContrast's bottleneck and decoder stay ungrouped.
    """

    block: str
    layers: tuple[int, int, int]
    width_per_group: int = 64
    stem_features: int = 64
    planes: tuple[int, int, int] = (64, 128, 256)
    oce_blocks: int = 3
    groups: int = 1

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4

    @property
    def stage_channels(self) -> tuple[int, int, int]:
        """Channels of the layer1..layer3 outputs."""
        return tuple(p * self.expansion for p in self.planes)


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("basic", (2, 2, 2), oce_blocks=2),
    "resnet34": ArchSpec("basic", (3, 4, 6)),
    "resnet50": ArchSpec("bottleneck", (3, 4, 6)),
    "wide_resnet50_2": ArchSpec("bottleneck", (3, 4, 6), width_per_group=128),
    "wide_resnet101_2": ArchSpec("bottleneck", (3, 4, 23), width_per_group=128),
    "resnext101_32x8d": ArchSpec(
        "bottleneck", (3, 4, 23), width_per_group=8, groups=32
    ),
    # Tiny variants for tests and CPU quick runs (not torchvision models).
    "resnet_tiny": ArchSpec(
        "basic", (1, 1, 1), stem_features=16, planes=(16, 32, 64), oce_blocks=1
    ),
    "resnet_tiny_bottleneck": ArchSpec(
        "bottleneck", (1, 1, 1), stem_features=16, planes=(8, 16, 32), oce_blocks=1
    ),
    # 3x3 convs of 4 groups of 2 (layer1), 4 (layer2) and 8 (layer3) channels.
    "resnext_tiny": ArchSpec(
        "bottleneck",
        (1, 1, 1),
        width_per_group=8,
        stem_features=16,
        planes=(16, 32, 64),
        oce_blocks=1,
        groups=4,
    ),
}


def get_arch(name: str) -> ArchSpec:
    """Looks up an architecture by name, with a helpful error."""
    if name not in ARCHS:
        raise ValueError(
            f"Unknown architecture {name!r}; choose one of {sorted(ARCHS)}"
        )
    return ARCHS[name]


class BasicBlock(nn.Module):
    """torchvision BasicBlock: two 3x3 convs, stride on the first."""

    planes: int
    stride: int = 1
    downsample: bool = False
    norm: Callable[..., nn.Module] = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = conv(self.planes, 3, self.stride, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out, train))
        out = conv(self.planes, 3, name="conv2")(out)
        out = self.norm(name="bn2")(out, train)
        identity = x
        if self.downsample:
            identity = conv(self.planes, 1, self.stride, name="downsample_0")(x)
            identity = self.norm(name="downsample_1")(identity, train)
        return nn.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (ResNet v1.5: the stride sits on the 3x3 conv).

    With `groups > 1` this is the ResNeXt block: torchvision's width is
    `int(planes * width_per_group / 64) * groups` and the 3x3 conv is grouped.
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    width_per_group: int = 64
    groups: int = 1
    norm: Callable[..., nn.Module] = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
        out = conv(width, 1, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out, train))
        out = conv(width, 3, self.stride, name="conv2", groups=self.groups)(out)
        out = nn.relu(self.norm(name="bn2")(out, train))
        out = conv(self.planes * 4, 1, name="conv3")(out)
        out = self.norm(name="bn3")(out, train)
        identity = x
        if self.downsample:
            identity = conv(self.planes * 4, 1, self.stride, name="downsample_0")(x)
            identity = self.norm(name="downsample_1")(identity, train)
        return nn.relu(out + identity)


def make_block(
    spec: ArchSpec,
    planes: int,
    stride: int,
    downsample: bool,
    name: str,
    groups: int = 1,
    norm: Callable[..., nn.Module] = BatchNorm,
):
    """Instantiates the block type of `spec` (shared by encoder and bottleneck).

    `groups` and `norm` are passed explicitly (not read from `spec`) so that
    ReContrast's bottleneck, which shares this function, keeps ungrouped
    convolutions and plain BatchNorm.
    """
    if spec.block == "basic":
        return BasicBlock(planes, stride, downsample, norm, name=name)
    return Bottleneck(
        planes, stride, downsample, spec.width_per_group, groups, norm, name=name
    )


def run_stage(
    spec: ArchSpec,
    x: jax.Array,
    prefix: str,
    planes: int,
    blocks: int,
    stride: int,
    train: bool,
    groups: int = 1,
    norm: Callable[..., nn.Module] = BatchNorm,
) -> jax.Array:
    """torchvision `_make_layer`: block 0 may stride/project, the rest are identity."""
    out_channels = planes * spec.expansion
    downsample = stride != 1 or x.shape[-1] != out_channels
    block = make_block(spec, planes, stride, downsample, f"{prefix}_0", groups, norm)
    x = block(x, train)
    for i in range(1, blocks):
        x = make_block(spec, planes, 1, False, f"{prefix}_{i}", groups, norm)(x, train)
    return x


class ResNetEncoder(nn.Module):
    """Stem + layer1..layer3 of a torchvision ResNet; returns the 3 stage maps.

    Attributes:
      arch: a key of `ARCHS`.
      norm: the normalisation layer (e.g. a PartialNorm `BatchNorm`).
    """

    arch: str
    norm: Callable[..., nn.Module] = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        spec = get_arch(self.arch)
        x = nn.Conv(
            spec.stem_features,
            (7, 7),
            strides=(2, 2),
            padding=((3, 3), (3, 3)),
            use_bias=False,
            kernel_init=conv_kernel_init,
            name="conv1",
        )(x)
        x = nn.relu(self.norm(name="bn1")(x, train))
        x = max_pool_3x3_s2(x)
        features = []
        for stage, (planes, blocks) in enumerate(
            zip(spec.planes, spec.layers, strict=True)
        ):
            stride = 1 if stage == 0 else 2
            x = run_stage(
                spec,
                x,
                f"layer{stage + 1}",
                planes,
                blocks,
                stride,
                train,
                groups=spec.groups,
                norm=self.norm,
            )
            features.append(x)
        return features
