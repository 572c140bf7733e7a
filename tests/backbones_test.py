"""Ensemble backbones (ResNeXt, DenseNet) against naive NumPy transcriptions.

No PyTorch needed. The oracles below are written from torchvision's model
definitions: the expected state-dict keys and shapes, and a plain float64
forward pass that reads the weights by their torchvision names. Random weights
(including BatchNorm statistics) are drawn in torchvision layout, loaded through
`pretrained`, run through the Flax encoders and compared with the oracle.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recontrast_jax import pretrained
from recontrast_jax.models import backbones, de_resnet, layers

EPS = 1e-5

# ----------------------------------------------------------------------------
# Naive NumPy ops (NHWC activations, torchvision (O, I/groups, kh, kw) weights)


def naive_conv(x, weight, stride=1, padding=0, groups=1):
    """Direct sum over kernel offsets, one group at a time."""
    n, h, w, _ = x.shape
    out_ch, in_per_group, kh, kw = weight.shape
    out_per_group = out_ch // groups
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    out = np.zeros((n, oh, ow, out_ch))
    for g in range(groups):
        xs = xp[..., g * in_per_group : (g + 1) * in_per_group]
        ws = weight[g * out_per_group : (g + 1) * out_per_group]
        for i in range(kh):
            for j in range(kw):
                patch = xs[
                    :, i : i + stride * oh : stride, j : j + stride * ow : stride
                ]
                out[..., g * out_per_group : (g + 1) * out_per_group] += (
                    patch @ ws[:, :, i, j].T
                )
    return out


def naive_bn(x, sd, name):
    scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + EPS)
    return (x - sd[f"{name}.running_mean"]) * scale + sd[f"{name}.bias"]


def relu(x):
    return np.maximum(x, 0.0)


def naive_max_pool_3x3_s2_p1(x):
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    windows = [
        xp[:, i : i + 2 * oh : 2, j : j + 2 * ow : 2]
        for i in range(3)
        for j in range(3)
    ]
    return np.max(windows, axis=0)


def naive_avg_pool_2x2(x):
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


# ----------------------------------------------------------------------------
# torchvision architectures, transcribed: key -> shape, and forward passes


def bn_shapes(name, channels):
    return {
        f"{name}.{leaf}": (channels,)
        for leaf in ("weight", "bias", "running_mean", "running_var")
    }


def resnext_shapes(planes, groups, width_per_group, stem=16, layers_=(1, 1, 1)):
    """torchvision ResNet(Bottleneck) keys up to layer3, plus layer4/fc extras."""
    shapes = {"conv1.weight": (stem, 3, 7, 7), **bn_shapes("bn1", stem)}
    in_ch = stem
    for stage, (p, blocks) in enumerate(zip(planes, layers_, strict=True), start=1):
        width = int(p * width_per_group / 64) * groups
        for b in range(blocks):
            pre = f"layer{stage}.{b}"
            shapes[f"{pre}.conv1.weight"] = (width, in_ch, 1, 1)
            shapes[f"{pre}.conv2.weight"] = (width, width // groups, 3, 3)
            shapes[f"{pre}.conv3.weight"] = (p * 4, width, 1, 1)
            for i, c in ((1, width), (2, width), (3, p * 4)):
                shapes |= bn_shapes(f"{pre}.bn{i}", c)
            if b == 0 and (stage > 1 or in_ch != p * 4):
                shapes[f"{pre}.downsample.0.weight"] = (p * 4, in_ch, 1, 1)
                shapes |= bn_shapes(f"{pre}.downsample.1", p * 4)
            in_ch = p * 4
    return shapes


def naive_resnext(x, sd, num_blocks, groups):
    x = naive_conv(x, sd["conv1.weight"], stride=2, padding=3)
    x = naive_max_pool_3x3_s2_p1(relu(naive_bn(x, sd, "bn1")))
    outputs = []
    for stage, blocks in enumerate(num_blocks, start=1):
        for b in range(blocks):
            pre = f"layer{stage}.{b}"
            stride = 2 if (stage > 1 and b == 0) else 1
            out = relu(
                naive_bn(naive_conv(x, sd[f"{pre}.conv1.weight"]), sd, f"{pre}.bn1")
            )
            out = naive_conv(out, sd[f"{pre}.conv2.weight"], stride, 1, groups)
            out = relu(naive_bn(out, sd, f"{pre}.bn2"))
            out = naive_bn(naive_conv(out, sd[f"{pre}.conv3.weight"]), sd, f"{pre}.bn3")
            identity = x
            if f"{pre}.downsample.0.weight" in sd:
                identity = naive_conv(x, sd[f"{pre}.downsample.0.weight"], stride)
                identity = naive_bn(identity, sd, f"{pre}.downsample.1")
            x = relu(out + identity)
        outputs.append(x)
    return outputs


# densenet_tiny as specified: growth 8, blocks (1, 2, 2), 16 init features, bn_size 4.
TINY_DENSE = dict(growth=8, blocks=(1, 2, 2), init=16, bn_size=4)


def densenet_shapes(growth, blocks, init, bn_size, with_unused=False):
    """torchvision DenseNet keys up to denseblock3 (+ transition3, block4, norm5, fc)."""
    shapes = {
        "features.conv0.weight": (init, 3, 7, 7),
        **bn_shapes("features.norm0", init),
    }
    all_blocks = (*blocks, 1) if with_unused else blocks
    channels = init
    for k, num_layers in enumerate(all_blocks, start=1):
        for j in range(1, num_layers + 1):
            pre = f"features.denseblock{k}.denselayer{j}"
            in_ch = channels + (j - 1) * growth
            shapes |= bn_shapes(f"{pre}.norm1", in_ch)
            shapes[f"{pre}.conv1.weight"] = (bn_size * growth, in_ch, 1, 1)
            shapes |= bn_shapes(f"{pre}.norm2", bn_size * growth)
            shapes[f"{pre}.conv2.weight"] = (growth, bn_size * growth, 3, 3)
        channels += num_layers * growth
        if k < len(all_blocks):
            shapes |= bn_shapes(f"features.transition{k}.norm", channels)
            shapes[f"features.transition{k}.conv.weight"] = (
                channels // 2,
                channels,
                1,
                1,
            )
            channels //= 2
    if with_unused:
        shapes |= bn_shapes("features.norm5", channels)
        shapes["classifier.weight"] = (10, channels)
        shapes["classifier.bias"] = (10,)
    return shapes


def naive_densenet(x, sd, blocks):
    x = naive_conv(x, sd["features.conv0.weight"], stride=2, padding=3)
    x = naive_max_pool_3x3_s2_p1(relu(naive_bn(x, sd, "features.norm0")))
    outputs = []
    for k, num_layers in enumerate(blocks, start=1):
        if k > 1:
            t = f"features.transition{k - 1}"
            x = naive_conv(relu(naive_bn(x, sd, f"{t}.norm")), sd[f"{t}.conv.weight"])
            x = naive_avg_pool_2x2(x)
        features = [x]
        for j in range(1, num_layers + 1):
            pre = f"features.denseblock{k}.denselayer{j}"
            h = np.concatenate(features, axis=-1)
            h = naive_conv(
                relu(naive_bn(h, sd, f"{pre}.norm1")), sd[f"{pre}.conv1.weight"]
            )
            h = naive_conv(
                relu(naive_bn(h, sd, f"{pre}.norm2")),
                sd[f"{pre}.conv2.weight"],
                padding=1,
            )
            features.append(h)
        x = np.concatenate(features, axis=-1)
        outputs.append(x)
    return outputs


def random_state_dict(shapes, seed):
    """Conv weights ~ N(0, 2/fan_in); BN affine and running statistics random."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = rng.normal(0.0, 0.2, shape)
        elif len(shape) == 1:  # BN weight
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        sd[key] = value.astype(np.float32)
    return sd


def encoder_template(arch, side=32):
    module = backbones.make_encoder(arch)
    return jax.eval_shape(
        lambda: module.init(
            jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False
        )
    )


def run_encoder(arch, variables, x):
    out = backbones.make_encoder(arch).apply(variables, jnp.asarray(x), train=False)
    return [np.asarray(o) for o in out]


def assert_maps_close(got, expected):
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max())


def images(seed=0, side=32, batch=2):
    return (
        np.random.default_rng(seed)
        .normal(size=(batch, side, side, 3))
        .astype(np.float32)
    )


# ----------------------------------------------------------------------------
# Tests


def test_grouped_conv_matches_naive_grouped_convolution():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 9, 8)).astype(np.float32)
    weight = rng.normal(size=(12, 2, 3, 3)).astype(np.float32)  # 4 groups of 2 -> 3
    module = layers.conv(12, 3, 2, groups=4)
    got = module.apply(
        {"params": {"kernel": jnp.asarray(pretrained.to_flax_layout(weight))}},
        jnp.asarray(x),
    )
    expected = naive_conv(x.astype(np.float64), weight, stride=2, padding=1, groups=4)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_resnext_tiny_matches_naive_torchvision_transcription():
    shapes = resnext_shapes(planes=(16, 32, 64), groups=4, width_per_group=8)
    sd = random_state_dict(shapes, seed=2)
    variables = pretrained.state_dict_to_variables(sd, encoder_template("resnext_tiny"))
    x = images()
    expected = naive_resnext(x.astype(np.float64), sd, (1, 1, 1), groups=4)
    assert_maps_close(run_encoder("resnext_tiny", variables, x), expected)


def test_existing_bottleneck_arch_unchanged_by_groups_support():
    # resnet_tiny_bottleneck: planes (8, 16, 32), ungrouped, width_per_group 64.
    shapes = resnext_shapes(planes=(8, 16, 32), groups=1, width_per_group=64)
    sd = random_state_dict(shapes, seed=3)
    arch = "resnet_tiny_bottleneck"
    variables = pretrained.state_dict_to_variables(sd, encoder_template(arch))
    x = images(seed=1)
    expected = naive_resnext(x.astype(np.float64), sd, (1, 1, 1), groups=1)
    assert_maps_close(run_encoder(arch, variables, x), expected)


def test_recontrast_bottleneck_stays_ungrouped_for_resnext():
    features = [
        jnp.zeros((1, 8, 8, 64)),
        jnp.zeros((1, 4, 4, 128)),
        jnp.zeros((1, 2, 2, 256)),
    ]
    variables = jax.eval_shape(
        lambda: de_resnet.FusionBottleneck("resnext_tiny").init(
            jax.random.key(0), features, train=False
        )
    )
    kernel = variables["params"]["bn_layer_0"]["conv2"]["kernel"]
    # One-class embedding planes 2 * 64 = 128, width int(128 * 8 / 64) = 16.
    assert kernel.shape == (3, 3, 16, 16)


def test_densenet_tiny_matches_naive_torchvision_transcription():
    sd = random_state_dict(densenet_shapes(**TINY_DENSE), seed=4)
    variables = pretrained.state_dict_to_variables(
        sd, encoder_template("densenet_tiny")
    )
    x = images(seed=2)
    expected = naive_densenet(x.astype(np.float64), sd, TINY_DENSE["blocks"])
    assert_maps_close(run_encoder("densenet_tiny", variables, x), expected)


def test_densenet_odd_input_size_floors_like_torch_pooling():
    sd = random_state_dict(densenet_shapes(**TINY_DENSE), seed=5)
    variables = pretrained.state_dict_to_variables(
        sd, encoder_template("densenet_tiny", side=36)
    )
    x = images(seed=3, side=36, batch=1)  # 36 -> 18 -> 9 -> 4 -> 2
    expected = naive_densenet(x.astype(np.float64), sd, TINY_DENSE["blocks"])
    got = run_encoder("densenet_tiny", variables, x)
    assert [g.shape[1] for g in got] == [9, 4, 2]
    assert_maps_close(got, expected)


@pytest.mark.parametrize("arch", ["resnext_tiny", "densenet_tiny", "resnet_tiny"])
def test_maps_have_strides_4_8_16_and_declared_channels(arch):
    out = jax.eval_shape(
        lambda: backbones.make_encoder(arch).init_with_output(
            jax.random.key(0), jnp.zeros((2, 64, 64, 3)), train=False
        )[0]
    )
    channels = backbones.feature_channels(arch)
    assert [o.shape for o in out] == [
        (2, 64 // s, 64 // s, c) for s, c in zip((4, 8, 16), channels, strict=True)
    ]


def test_feature_channels_of_the_ensemble_backbones():
    # PatchCore: densenet201 denseblock2 = 512 and denseblock3 = 1792 channels.
    assert backbones.feature_channels("densenet201") == (256, 512, 1792)
    assert backbones.feature_channels("resnext101_32x8d") == (256, 512, 1024)
    assert backbones.feature_channels("densenet_tiny") == (16 + 8, 12 + 16, 14 + 16)


def test_unknown_arch_error_lists_known_archs():
    with pytest.raises(ValueError) as info:
        backbones.make_encoder("resnet9000")
    message = str(info.value)
    assert "resnet9000" in message
    for arch in ("densenet201", "resnext101_32x8d", "wide_resnet50_2", "densenet_tiny"):
        assert arch in message
    with pytest.raises(ValueError, match="resnet9000"):
        backbones.feature_channels("resnet9000")


def test_known_archs_cover_both_families():
    archs = backbones.known_archs()
    assert archs == sorted(archs)
    assert {"resnet18", "wide_resnet101_2", "resnext101_32x8d", "densenet201"} <= set(
        archs
    )
    assert {"resnext_tiny", "densenet_tiny"} <= set(archs)


def test_weights_table_has_the_ensemble_backbones():
    assert pretrained.weights_info("resnext101_32x8d") == pretrained.WeightsInfo(
        "timm/resnext101_32x8d.tv_in1k", "resnext101_32x8d-8ba56ff5.pth"
    )
    assert pretrained.weights_info("densenet201") == pretrained.WeightsInfo(
        "timm/densenet201.tv_in1k", "densenet201-c1103571.pth"
    )


def test_legacy_densenet_keys_are_renamed():
    legacy = {
        "features.denseblock1.denselayer1.norm.1.weight": 1,
        "features.denseblock1.denselayer1.norm.1.running_var": 2,
        "features.denseblock3.denselayer12.conv.2.weight": 3,
        "features.denseblock2.denselayer3.norm.2.num_batches_tracked": 4,
        "features.transition1.norm.weight": 5,
        "features.norm0.bias": 6,
        "layer1.0.downsample.1.weight": 7,
        "features.denseblock1.denselayer1.norm1.weight": 8,
    }
    assert pretrained.rename_legacy_densenet_keys(legacy) == {
        "features.denseblock1.denselayer1.norm1.weight": 8,  # already new-style
        "features.denseblock1.denselayer1.norm1.running_var": 2,
        "features.denseblock3.denselayer12.conv2.weight": 3,
        "features.denseblock2.denselayer3.norm2.num_batches_tracked": 4,
        "features.transition1.norm.weight": 5,
        "features.norm0.bias": 6,
        "layer1.0.downsample.1.weight": 7,
    }


def to_legacy_key(key):
    """Old torchvision DenseNet naming: `denselayerN.norm1.` was `denselayerN.norm.1.`."""
    if ".denselayer" not in key:
        return key
    for module in ("norm", "conv"):
        for index in ("1", "2"):
            key = key.replace(f".{module}{index}.", f".{module}.{index}.")
    return key


def test_load_densenet_from_files_ignores_unused_and_renames_legacy(tmp_path):
    from safetensors.numpy import save_file

    shapes = densenet_shapes(**TINY_DENSE, with_unused=True)
    full = random_state_dict(shapes, seed=6)
    full["features.norm0.num_batches_tracked"] = np.asarray(3, np.int64)
    expected = pretrained.state_dict_to_variables(
        {k: v for k, v in full.items() if k in densenet_shapes(**TINY_DENSE)},
        encoder_template("densenet_tiny"),
    )
    new_style = tmp_path / "dense.safetensors"
    save_file(full, str(new_style))
    legacy = tmp_path / "dense_legacy.npz"
    np.savez(legacy, **{to_legacy_key(k): v for k, v in full.items()})
    assert any(".norm.1." in k for k in np.load(legacy).files)
    template = encoder_template("densenet_tiny")
    for path in (new_style, legacy):
        got = pretrained.load_encoder_variables("densenet_tiny", str(path), template)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)


def test_load_densenet_reports_path_and_offending_key(tmp_path):
    from safetensors.numpy import save_file

    sd = random_state_dict(densenet_shapes(**TINY_DENSE), seed=7)
    sd["features.denseblock1.denselayer9.conv1.weight"] = np.zeros(
        (1, 1, 1, 1), np.float32
    )
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(pretrained.ConversionError) as info:
        pretrained.load_encoder_variables(
            "densenet_tiny", str(path), encoder_template("densenet_tiny")
        )
    assert str(path) in str(info.value)
    assert "denselayer9" in str(info.value)


def test_encoder_unused_per_arch():
    assert pretrained.encoder_unused("wide_resnet50_2") == pretrained.ENCODER_UNUSED
    assert pretrained.encoder_unused("resnext101_32x8d") == pretrained.ENCODER_UNUSED
    assert pretrained.encoder_unused("densenet201") == pretrained.DENSENET_UNUSED


def test_resnext_file_with_layer4_and_fc_loads(tmp_path):
    shapes = resnext_shapes(planes=(16, 32, 64), groups=4, width_per_group=8)
    sd = random_state_dict(shapes, seed=8)
    extra = {
        "layer4.0.conv1.weight": np.zeros((4, 256, 1, 1), np.float32),
        "fc.weight": np.zeros((10, 4), np.float32),
    }
    path = tmp_path / "resnext.npz"
    np.savez(path, **sd, **extra)
    template = encoder_template("resnext_tiny")
    got = pretrained.load_encoder_variables("resnext_tiny", str(path), template)
    expected = pretrained.state_dict_to_variables(sd, template)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
