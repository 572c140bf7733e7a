"""One entry point for every feature-extractor backbone.

ResNet-family encoders (`resnet.ARCHS`: ResNets, wide ResNets, ResNeXt) and
DenseNet encoders (`densenet.DENSENET_ARCHS`) share one contract:
`make_encoder(arch).apply(variables, x, train=False)` with NHWC `x` returns a
list of three NHWC maps at strides 4, 8 and 16 (layer1..layer3, or
denseblock1..denseblock3), whose channels are `feature_channels(arch)`.
"""

from __future__ import annotations

import flax.linen as nn

from recontrast_jax.models import densenet, resnet


def known_archs() -> list[str]:
    """All architecture names `make_encoder` accepts, sorted."""
    return sorted([*resnet.ARCHS, *densenet.DENSENET_ARCHS])


def is_densenet(arch: str) -> bool:
    """Whether `arch` is a DenseNet (torchvision `features.*` key layout)."""
    return arch in densenet.DENSENET_ARCHS


def _check_known(arch: str) -> None:
    if arch not in resnet.ARCHS and not is_densenet(arch):
        raise ValueError(
            f"Unknown backbone architecture {arch!r}; known: {known_archs()}"
        )


def make_encoder(arch: str) -> nn.Module:
    """The Flax encoder of `arch`.

    Args:
      arch: one of `known_archs()`.

    Returns:
      A linen module called as `module(x, train)` that returns three NHWC maps
      at strides 4, 8 and 16.

    Raises:
      ValueError: `arch` is unknown (the message lists the known names).
    """
    _check_known(arch)
    if is_densenet(arch):
        return densenet.DenseNetEncoder(arch)
    return resnet.ResNetEncoder(arch)


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
    return resnet.get_arch(arch).stage_channels
