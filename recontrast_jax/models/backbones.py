"""One entry point for every feature-extractor backbone.

ResNet-family encoders (`resnet.ARCHS`: ResNets, wide ResNets, ResNeXt) and
DenseNet encoders (`densenet.DENSENET_ARCHS`) and EfficientNet-Lite0
(`efficientnet_lite0`) share one contract: `make_encoder(arch).apply(variables,
x, train=False)` with NHWC `x` (ImageNet-normalised) returns a list of three
NHWC maps at strides 4, 8 and 16 (layer1..layer3, denseblock1..denseblock3, or
the last blocks of Lite0's stride-4, -8 and -16 stages), whose channels are
`feature_channels(arch)`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from recontrast_jax.models import densenet, efficientnet, resnet

EFFICIENTNET_ARCHS = ("efficientnet_lite0",)


def known_archs() -> list[str]:
    """All architecture names `make_encoder` accepts, sorted."""
    return sorted([*resnet.ARCHS, *densenet.DENSENET_ARCHS, *EFFICIENTNET_ARCHS])


def is_resnet(arch: str) -> bool:
    """Whether `arch` is a ResNet-family encoder (ReContrast's paper backbones)."""
    return arch in resnet.ARCHS


def is_efficientnet(arch: str) -> bool:
    """Whether `arch` is EfficientNet-Lite0 (the `_blocks.N.*` key layout)."""
    return arch in EFFICIENTNET_ARCHS


def is_densenet(arch: str) -> bool:
    """Whether `arch` is a DenseNet (torchvision `features.*` key layout)."""
    return arch in densenet.DENSENET_ARCHS


def _check_known(arch: str) -> None:
    if arch not in known_archs():
        raise ValueError(
            f"Unknown backbone architecture {arch!r}; known: {known_archs()}"
        )


def make_encoder(arch: str, norm: Callable[..., nn.Module] | None = None) -> nn.Module:
    """The Flax encoder of `arch`.

    Args:
      arch: one of `known_archs()`.
      norm: the BatchNorm layer to build it with (ReContrast's trainable
        encoder may use PartialNorm); None is the plain `layers.BatchNorm`.
        DenseNets take only None.

    Returns:
      A linen module called as `module(x, train)` that returns three NHWC maps
      at strides 4, 8 and 16.

    Raises:
      ValueError: `arch` is unknown (the message lists the known names).
    """
    _check_known(arch)
    kwargs = {} if norm is None else {"norm": norm}
    if is_densenet(arch):
        if norm is not None:
            raise ValueError(f"{arch} is built with plain BatchNorm only")
        return densenet.DenseNetEncoder(arch)
    if is_efficientnet(arch):
        return efficientnet.EfficientNetLiteEncoder(**kwargs)
    return resnet.ResNetEncoder(arch, **kwargs)


def feature_channels(arch: str) -> tuple[int, int, int]:
    """Channels of the three maps the encoder of `arch` returns.

    Args:
      arch: one of `known_archs()`.

    Returns:
      (stride-4 channels, stride-8 channels, stride-16 channels), e.g.
      (256, 512, 1792) for densenet201 and (256, 512, 1024) for resnext101_32x8d.

    Raises:
      ValueError: `arch` is unknown.
    """
    _check_known(arch)
    if is_densenet(arch):
        return densenet.get_densenet_arch(arch).block_channels
    if is_efficientnet(arch):
        return efficientnet.FEATURE_CHANNELS
    return resnet.get_arch(arch).stage_channels
