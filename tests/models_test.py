"""Model tests: parameter counts, shapes, PyTorch layer semantics, pairing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recontrast_jax.models import layers, recontrast, resnet


def abstract_variables(arch, size=64):
    return jax.eval_shape(
        lambda r: recontrast.init_variables(arch, r, size), jax.random.key(0)
    )


def test_wide_resnet50_2_parameter_counts_match_the_reference():
    variables, frozen = abstract_variables("wide_resnet50_2")
    params = variables["params"]
    assert layers.count_params(params["encoder"]) == 24_862_528
    assert layers.count_params(params["decoder"]) == 27_673_600
    assert layers.count_params(params["bottleneck"]) == 67_277_824 - 8_392_704
    assert layers.count_params(frozen["params"]) == 24_862_528


# Stage channels and parameter counts of torchvision's layer1..layer3 + stem
# (torchvision totals minus layer4 and fc): resnet18 11,689,512 - 8,393,728 -
# 513,000; resnet50 25,557,032 - 14,964,736 - 2,049,000.
@pytest.mark.parametrize(
    "arch, channels, encoder_params",
    [
        ("resnet18", (64, 128, 256), 2_782_784),
        ("resnet34", (64, 128, 256), None),
        ("resnet50", (256, 512, 1024), 8_543_296),
        ("wide_resnet50_2", (256, 512, 1024), 24_862_528),
        ("wide_resnet101_2", (256, 512, 1024), None),
    ],
)
def test_encoder_shapes_and_counts(arch, channels, encoder_params):
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables, _ = abstract_variables(arch)
    feats = jax.eval_shape(
        lambda v, x: resnet.ResNetEncoder(arch).apply(v, x, train=False),
        {
            "params": variables["params"]["encoder"],
            "batch_stats": variables["batch_stats"]["encoder"],
        },
        x,
    )
    assert [f.shape for f in feats] == [
        (2, 16, 16, channels[0]),
        (2, 8, 8, channels[1]),
        (2, 4, 4, channels[2]),
    ]
    if encoder_params:
        assert layers.count_params(variables["params"]["encoder"]) == encoder_params


def test_torchvision_style_names():
    variables, _ = abstract_variables("resnet50")
    enc = variables["params"]["encoder"]
    assert set(enc) >= {"conv1", "bn1", "layer1_0", "layer3_5"}
    assert set(enc["layer1_0"]) == {
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "conv3",
        "bn3",
        "downsample_0",
        "downsample_1",
    }
    assert set(variables["batch_stats"]["encoder"]["bn1"]) == {"mean", "var"}
    dec = variables["params"]["decoder"]
    assert dec["layer1_0"]["upsample_0"]["kernel"].shape == (2, 2, 1024, 2048)
    assert {f"out{i}_{j}" for i in (1, 2, 3) for j in (0, 1)} <= set(dec)
    assert "conv4" not in variables["params"]["bottleneck"]


def test_batchnorm_train_mode_follows_pytorch():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(4, 3, 5, 6)).astype(np.float32)
    bn = layers.BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=False)
    variables = {
        "params": {"scale": jnp.arange(1.0, 7.0), "bias": jnp.linspace(-1, 1, 6)},
        "batch_stats": {"mean": jnp.full(6, 0.5), "var": jnp.full(6, 2.0)},
    }
    y, updated = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    x64 = x.astype(np.float64)
    mean = x64.mean((0, 1, 2))
    biased = x64.var((0, 1, 2))
    n = 4 * 3 * 5
    expected = (x64 - mean) / np.sqrt(biased + 1e-5) * np.arange(
        1.0, 7.0
    ) + np.linspace(-1, 1, 6)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        updated["batch_stats"]["mean"], 0.9 * 0.5 + 0.1 * mean, rtol=1e-5
    )
    np.testing.assert_allclose(
        updated["batch_stats"]["var"], 0.9 * 2.0 + 0.1 * biased * n / (n - 1), rtol=1e-5
    )
    y_eval = bn.apply(variables, x, train=False)
    expected_eval = (x64 - 0.5) / np.sqrt(2.0 + 1e-5) * np.arange(
        1.0, 7.0
    ) + np.linspace(-1, 1, 6)
    np.testing.assert_allclose(np.asarray(y_eval), expected_eval, rtol=1e-5, atol=1e-5)


def naive_conv_nhwc(x, w_oihw, stride, pad):
    """Direct PyTorch-semantics conv2d (cross-correlation, symmetric zero pad)."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_c, _, k, _ = w_oihw.shape
    h = (x.shape[1] - k) // stride + 1
    w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], h, w, out_c))
    for i in range(h):
        for j in range(w):
            patch = x[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            out[:, i, j, :] = np.einsum("bhwc,ochw->bo", patch, w_oihw)
    return out


@pytest.mark.parametrize(
    "kernel, stride, size", [(7, 2, 10), (3, 2, 8), (3, 1, 5), (1, 2, 6)]
)
def test_conv_padding_is_symmetric_like_pytorch(kernel, stride, size):
    rng = np.random.default_rng(kernel + stride)
    x = rng.normal(size=(1, size, size, 2)).astype(np.float32)
    w = rng.normal(size=(3, 2, kernel, kernel)).astype(np.float32)
    module = layers.conv(3, kernel, stride)
    y = module.apply({"params": {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0))}}, x)
    np.testing.assert_allclose(
        np.asarray(y), naive_conv_nhwc(x, w, stride, kernel // 2), atol=1e-4
    )


@pytest.mark.parametrize("stride, size", [(2, 8), (2, 7), (1, 6)])
def test_conv3x3_gradients_match_xla_convolution(stride, size):
    """Values and both gradients of `conv3x3` against XLA's own convolution."""
    rng = np.random.default_rng(size + stride)
    x = jnp.asarray(rng.normal(size=(3, size, size + 1, 4)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 5)).astype(np.float32))
    probe = jnp.asarray(
        rng.normal(size=layers.conv3x3(x, kernel, stride).shape).astype(np.float32)
    )

    def xla_conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    def loss(conv):
        return lambda x, kernel: jnp.sum(jnp.tanh(conv(x, kernel)) * probe)

    ours = jax.jit(
        jax.value_and_grad(loss(lambda x, k: layers.conv3x3(x, k, stride)), (0, 1))
    )(x, kernel)
    reference = jax.jit(jax.value_and_grad(loss(xla_conv), (0, 1)))(x, kernel)
    for got, expected in zip(
        jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_with_bias_is_a_1x1_conv_plus_bias(stride):
    rng = np.random.default_rng(stride)
    x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    bias = rng.normal(size=(4,)).astype(np.float32)
    module = layers.PointwiseConv(4, stride, use_bias=True)
    params = {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)), "bias": bias}
    y = module.apply({"params": params}, x)
    np.testing.assert_allclose(
        np.asarray(y), naive_conv_nhwc(x, w, stride, 0) + bias, atol=1e-5
    )


def test_pointwise_conv_parameters_are_those_of_nn_conv():
    """Same names, shapes and initial values: checkpoints stay interchangeable."""
    x = jnp.ones((1, 4, 4, 6))
    key = jax.random.key(0)
    bias_init = layers.torch_default_bias_init(6)
    reference = nn.Conv(
        6, (1, 1), kernel_init=layers.conv_kernel_init, bias_init=bias_init
    ).init(key, x)
    ours = layers.PointwiseConv(6, use_bias=True).init(key, x)
    for got, expected in zip(
        jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True
    ):
        np.testing.assert_array_equal(got, expected)
    assert jax.tree.structure(ours) == jax.tree.structure(reference)


def test_transposed_conv_matches_pytorch_formula():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    w = rng.normal(size=(5, 6, 2, 2)).astype(np.float32)  # PyTorch (in, out, kh, kw)
    y = layers.transposed_conv2x2(6).apply(
        {"params": {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0))}}, x
    )
    expected = np.zeros((2, 6, 8, 6))
    for a in range(2):
        for b in range(2):  # out[2i + a, 2j + b] = x[i, j] . W[:, :, a, b]
            expected[:, a::2, b::2, :] = np.einsum("bijc,co->bijo", x, w[:, :, a, b])
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)


def test_max_pool_pads_with_minus_infinity():
    x = -np.ones((1, 4, 4, 1), np.float32) - np.arange(16, dtype=np.float32).reshape(
        1, 4, 4, 1
    )
    y = np.asarray(layers.max_pool_3x3_s2(jnp.asarray(x)))
    expected = np.array([[-1, -2], [-5, -6]], np.float32)  # zero padding would give 0
    np.testing.assert_array_equal(y[0, :, :, 0], expected)


@pytest.mark.parametrize("arch", ["resnet_tiny", "resnet_tiny_bottleneck"])
def test_cross_pairing_halves(arch):
    """Head set 0 is decoded from the trainable half, head set 1 from the frozen half."""
    variables, frozen = recontrast.init_variables(arch, jax.random.key(1), 32)
    model = recontrast.ReContrast(arch)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    frozen_a = recontrast.frozen_encoder_features(arch, frozen, x)
    frozen_b = [f * 1.5 + 0.3 for f in frozen_a]

    def run(f):
        return model.apply(variables, x, f, train=False, encoder_train=False)

    targets_a, recons_a = run(frozen_a)
    targets_b, recons_b = run(frozen_b)
    trainable = resnet.ResNetEncoder(arch).apply(
        {
            "params": variables["params"]["encoder"],
            "batch_stats": variables["batch_stats"]["encoder"],
        },
        x,
        train=False,
    )
    for i in range(3):
        np.testing.assert_array_equal(targets_b[i], frozen_b[i])
        np.testing.assert_array_equal(targets_a[3 + i], trainable[i])
        assert recons_a[i].shape == targets_a[i].shape == recons_a[3 + i].shape
        # Items 0-2 depend only on the trainable half, items 3-5 on the frozen half.
        np.testing.assert_allclose(recons_a[i], recons_b[i], rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(recons_a[3 + i] - recons_b[3 + i]).max()) > 1e-3
