"""DenseNet-BC encoders with torchvision's architecture and naming.

PatchCore's DenseNet-201 backbone hooks `features.denseblock2` (512 channels,
stride 8) and `features.denseblock3` (1792 channels, stride 16): the outputs of
the dense blocks themselves, i.e. the concatenated features before the next
transition. `DenseNetEncoder` returns the outputs of denseblock1..3 and stops
there (no transition3, denseblock4, norm5 or classifier).

Module nesting mirrors torchvision's state-dict keys, so that
`pretrained.torch_key` maps e.g. the Flax path
`features/denseblock2/denselayer1/norm1/scale` to
`features.denseblock2.denselayer1.norm1.weight`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from recontrast_jax.models.layers import (
    BatchNorm,
    conv,
    conv_kernel_init,
    max_pool_3x3_s2,
)


@dataclasses.dataclass(frozen=True)
class DenseNetSpec:
    """Shape of a DenseNet-BC encoder (first three dense blocks).

    Attributes:
      growth_rate: channels added by each dense layer (`k` in the paper).
      blocks: dense layers in denseblock1..denseblock3 (torchvision's
        `block_config` without the fourth block, which the encoder drops).
      num_init_features: channels of the 7x7 stem conv.
      bn_size: the 1x1 bottleneck conv has `bn_size * growth_rate` channels.
    """

    growth_rate: int
    blocks: tuple[int, int, int]
    num_init_features: int = 64
    bn_size: int = 4

    @property
    def block_channels(self) -> tuple[int, int, int]:
        """Channels of the denseblock1..denseblock3 outputs."""
        channels, outputs = self.num_init_features, []
        for layers in self.blocks:
            channels += layers * self.growth_rate
            outputs.append(channels)
            channels //= 2  # each transition halves the channels
        return tuple(outputs)


DENSENET_ARCHS: dict[str, DenseNetSpec] = {
    # torchvision densenet201: block_config (6, 12, 48, 32).
    "densenet201": DenseNetSpec(32, (6, 12, 48)),
    # Tiny variant for tests and CPU quick runs (not a torchvision model).
    "densenet_tiny": DenseNetSpec(8, (1, 2, 2), num_init_features=16),
}


def get_densenet_arch(name: str) -> DenseNetSpec:
    """Looks up a DenseNet architecture by name, with a helpful error.

    Args:
      name: a key of `DENSENET_ARCHS`.

    Returns:
      Its `DenseNetSpec`.
    """
    if name not in DENSENET_ARCHS:
        raise ValueError(
            f"Unknown DenseNet architecture {name!r}; choose one of "
            f"{sorted(DENSENET_ARCHS)}"
        )
    return DENSENET_ARCHS[name]


class DenseLayer(nn.Module):
    """torchvision `_DenseLayer`: BN-ReLU-conv1x1-BN-ReLU-conv3x3 -> new features.

    Returns only the `growth_rate` new channels; the block concatenates them.
    """

    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = nn.relu(BatchNorm(name="norm1")(x, train))
        out = conv(self.bn_size * self.growth_rate, 1, name="conv1")(out)
        out = nn.relu(BatchNorm(name="norm2")(out, train))
        return conv(self.growth_rate, 3, name="conv2")(out)


class DenseBlock(nn.Module):
    """torchvision `_DenseBlock`: each layer sees the concatenation of all before.

    The output is `concat([input, new_1, ..., new_n])` along channels, in that
    order (torchvision's `torch.cat(features, 1)`).
    """

    num_layers: int
    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.num_layers):
            layer = DenseLayer(
                self.growth_rate, self.bn_size, name=f"denselayer{i + 1}"
            )
            x = jnp.concatenate([x, layer(x, train)], axis=-1)
        return x


class Transition(nn.Module):
    """torchvision `_Transition`: BN-ReLU-conv1x1 (halving channels)-AvgPool 2x2/2."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = nn.relu(BatchNorm(name="norm")(x, train))
        out = conv(x.shape[-1] // 2, 1, name="conv")(out)
        return nn.avg_pool(out, (2, 2), strides=(2, 2), padding="VALID")


class DenseFeatures(nn.Module):
    """torchvision's `features` Sequential, up to and including denseblock3."""

    spec: DenseNetSpec

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        spec = self.spec
        x = nn.Conv(
            spec.num_init_features,
            (7, 7),
            strides=(2, 2),
            padding=((3, 3), (3, 3)),
            use_bias=False,
            kernel_init=conv_kernel_init,
            name="conv0",
        )(x)
        x = nn.relu(BatchNorm(name="norm0")(x, train))
        x = max_pool_3x3_s2(x)
        outputs = []
        for index, num_layers in enumerate(spec.blocks, start=1):
            if index > 1:
                x = Transition(name=f"transition{index - 1}")(x, train)
            x = DenseBlock(
                num_layers, spec.growth_rate, spec.bn_size, name=f"denseblock{index}"
            )(x, train)
            outputs.append(x)
        return outputs


class DenseNetEncoder(nn.Module):
    """Stem + denseblock1..denseblock3 of a torchvision DenseNet.

    Returns the three dense-block outputs (NHWC, strides 4, 8 and 16).

    Attributes:
      arch: a key of `DENSENET_ARCHS`.
    """

    arch: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        return DenseFeatures(get_densenet_arch(self.arch), name="features")(x, train)
