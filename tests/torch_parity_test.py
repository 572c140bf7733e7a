"""Numerical parity with torchvision and the authors' checkpoint layout.

Runs only when torch and torchvision are installed (the `torch` extra).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from recontrast_jax import convert, pretrained  # noqa: E402
from recontrast_jax.models import recontrast, resnet  # noqa: E402

ARCHS = ["resnet18", "resnet34", "resnet50", "wide_resnet50_2", "wide_resnet101_2"]


def realistic_torchvision_model(arch, seed=0):
    """A torchvision model with random weights and the feature scale of a trained one.

    BN affine parameters are randomised, with small scales (0.1-0.3) on the BN
    that closes each residual branch, as in trained ResNets; running statistics
    then come from one train-mode pass with momentum 1. Stage outputs end up of
    order 1-10, like ImageNet-trained features, so an absolute tolerance means
    what it would mean for the real weights.
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    closing = (
        "bn3"
        if isinstance(model.layer1[0], torchvision.models.resnet.Bottleneck)
        else "bn2"
    )
    with torch.no_grad():
        for name, bn in model.named_modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                low, high = (0.1, 0.3) if name.endswith(closing) else (0.5, 1.5)
                bn.weight.uniform_(low, high)
                bn.bias.normal_(0, 0.1)
                bn.momentum = 1.0
        model.train()
        model(torch.randn(4, 3, 64, 64))
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = 0.1
    return model


def torch_stage_features(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for layer in (model.layer1, model.layer2, model.layer3):
        x = layer(x)
        out.append(x)
    return out


def numpy_state_dict(model):
    """A copy: `.numpy()` shares memory with the (later updated) torch buffers."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def encoder_template(arch):
    variables, _ = jax.eval_shape(
        lambda r: recontrast.init_variables(arch, r, 64), jax.random.key(0)
    )
    return {c: variables[c]["encoder"] for c in ("params", "batch_stats")}


@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_features_match_torchvision(arch):
    model = realistic_torchvision_model(arch).eval()
    variables = pretrained.state_dict_to_variables(
        numpy_state_dict(model),
        encoder_template(arch),
        ignore=pretrained.ENCODER_UNUSED,
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = [
            f.numpy().transpose(0, 2, 3, 1) for f in torch_stage_features(model, x)
        ]
    got = resnet.ResNetEncoder(arch).apply(
        variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=False
    )
    for stage, (g, e) in enumerate(zip(got, expected, strict=True), start=1):
        diff = float(np.abs(np.asarray(g) - e).max())
        print(
            f"{arch} layer{stage}: max |flax - torch| = {diff:.2e} (max |torch| {np.abs(e).max():.1f})"
        )
        assert g.shape == e.shape
        assert diff <= 1e-4


@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2"])
def test_train_mode_running_statistics_match_pytorch(arch):
    model = realistic_torchvision_model(arch, seed=1)
    variables = pretrained.state_dict_to_variables(
        numpy_state_dict(model),
        encoder_template(arch),
        ignore=pretrained.ENCODER_UNUSED,
    )
    x = torch.randn(3, 3, 64, 64)
    model.train()
    with torch.no_grad():
        torch_stage_features(model, x)  # updates running stats (momentum 0.1, unbiased)
    _, updated = resnet.ResNetEncoder(arch).apply(
        variables,
        jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
        train=True,
        mutable=["batch_stats"],
    )
    expected = pretrained.state_dict_to_variables(
        numpy_state_dict(model),
        encoder_template(arch),
        ignore=pretrained.ENCODER_UNUSED,
    )["batch_stats"]
    worst = 0.0
    for g, e in zip(
        jax.tree_util.tree_leaves(updated["batch_stats"]),
        jax.tree_util.tree_leaves(expected),
        strict=True,
    ):
        worst = max(
            worst, float(np.max(np.abs(np.asarray(g) - e) / (np.abs(e) + 1e-3)))
        )
    print(f"{arch}: running stats max relative difference {worst:.2e}")
    assert worst < 1e-4


def authors_bottleneck_and_decoder_shapes():
    """Key names and shapes of the authors' wide_resnet50_2 BN_layer and decoder.

    Written out from the spec (recontrast.md 1.2-1.3), independently of the
    converter's name mapping.
    """
    shapes = {}

    def bn(name, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{leaf}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    def conv(name, o, i, k):
        shapes[f"{name}.weight"] = (o, i, k, k)

    b = "bottleneck."
    conv(b + "conv1", 512, 256, 3), bn(b + "bn1", 512)
    conv(b + "conv2", 1024, 512, 3), bn(b + "bn2", 1024)
    conv(b + "conv3", 1024, 512, 3), bn(b + "bn3", 1024)
    conv(b + "conv4", 2048, 4096, 1), bn(b + "bn4", 2048)  # unused by the forward
    for i in range(3):
        p = f"{b}bn_layer.{i}."
        conv(p + "conv1", 1024, 3072 if i == 0 else 2048, 1), bn(p + "bn1", 1024)
        conv(p + "conv2", 1024, 1024, 3), bn(p + "bn2", 1024)
        conv(p + "conv3", 2048, 1024, 1), bn(p + "bn3", 2048)
    (
        conv(b + "bn_layer.0.downsample.0", 2048, 3072, 1),
        bn(b + "bn_layer.0.downsample.1", 2048),
    )
    in_ch = 2048
    for layer, (planes, blocks) in enumerate(((256, 3), (128, 4), (64, 6)), start=1):
        width, out_ch = planes * 2, planes * 4
        for i in range(blocks):
            p = f"decoder.layer{layer}.{i}."
            (
                conv(p + "conv1", width, in_ch if i == 0 else out_ch, 1),
                bn(p + "bn1", width),
            )
            if i == 0:  # ConvTranspose2d weights are (in, out, kh, kw)
                shapes[p + "conv2.weight"] = (width, width, 2, 2)
                shapes[p + "upsample.0.weight"] = (in_ch, out_ch, 2, 2)
                bn(p + "upsample.1", out_ch)
            else:
                conv(p + "conv2", width, width, 3)
            bn(p + "bn2", width)
            conv(p + "conv3", out_ch, width, 1), bn(p + "bn3", out_ch)
        in_ch = out_ch
    for level, c in ((1, 256), (2, 512), (3, 1024)):
        for head in range(2):
            conv(f"decoder.out{level}.{head}", c, c, 1)
            shapes[f"decoder.out{level}.{head}.bias"] = (c,)
    return shapes


def test_authors_state_dict_shapes_match_the_spec_counts():
    shapes = authors_bottleneck_and_decoder_shapes()

    def count(prefix):
        return sum(
            int(np.prod(s))
            for k, s in shapes.items()
            if k.startswith(prefix) and (k.endswith("weight") or k.endswith("bias"))
        )

    assert count("bottleneck.") == 67_277_824
    assert count("decoder.") == 27_673_600


def test_authors_recontrast_state_dict_imports_and_runs(tmp_path):
    rng = np.random.default_rng(0)
    encoder = realistic_torchvision_model("wide_resnet50_2")
    encoder_sd = {
        k: v
        for k, v in numpy_state_dict(encoder).items()
        if not k.startswith(("layer4", "fc"))
    }
    state_dict = {f"encoder.{k}": v for k, v in encoder_sd.items()}
    state_dict |= {f"encoder_freeze.{k}": v for k, v in encoder_sd.items()}
    for key, shape in authors_bottleneck_and_decoder_shapes().items():
        if key.endswith("num_batches_tracked"):
            state_dict[key] = np.asarray(7, np.int64)
        elif key.endswith("running_var"):
            state_dict[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            state_dict[key] = (rng.normal(size=shape) * 0.02).astype(np.float32)
    path = tmp_path / "recontrast_bottle.pth"
    torch.save(
        {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path
    )

    variables, frozen = convert.recontrast_variables_from_state_dict(
        pretrained.read_state_dict(str(path)), "wide_resnet50_2", 64
    )
    np.testing.assert_array_equal(
        variables["params"]["decoder"]["layer1_0"]["upsample_0"]["kernel"],
        state_dict["decoder.layer1.0.upsample.0.weight"].transpose(2, 3, 1, 0),
    )
    x = jnp.asarray(rng.normal(size=(2, 64, 64, 3)).astype(np.float32))
    frozen_features = recontrast.frozen_encoder_features("wide_resnet50_2", frozen, x)
    targets, recons = recontrast.ReContrast("wide_resnet50_2").apply(
        variables, x, frozen_features, train=False, encoder_train=False
    )
    sides = [16, 8, 4] * 2
    channels = [256, 512, 1024] * 2
    for t, r, side, c in zip(targets, recons, sides, channels, strict=True):
        assert t.shape == r.shape == (2, side, side, c)
        assert np.isfinite(np.asarray(r)).all()


def test_pth_reading_matches_torch_tensors(tmp_path):
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    loaded = pretrained.read_state_dict(str(path))
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded[key], value.numpy())


def test_transposed_conv_matches_torch_conv_transpose2d():
    from recontrast_jax.models import layers

    torch.manual_seed(3)
    module = torch.nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2, bias=False)
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        expected = module(x).numpy().transpose(0, 2, 3, 1)
    kernel = pretrained.to_flax_layout(module.weight.detach().numpy())
    got = layers.transposed_conv2x2(4).apply(
        {"params": {"kernel": jnp.asarray(kernel)}},
        jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
    )
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)


@pytest.mark.parametrize("stride, size", [(1, 7), (2, 8), (2, 9)])
def test_conv3x3_and_its_gradients_match_torch_conv2d(stride, size):
    from recontrast_jax.models import layers

    torch.manual_seed(stride + size)
    module = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=False)
    x = torch.randn(2, 4, size, size + 1, requires_grad=True)
    out = module(x)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()

    def loss(x, kernel):
        y = layers.conv3x3(x, kernel, stride)
        return jnp.sum(y * jnp.asarray(probe.numpy().transpose(0, 2, 3, 1)))

    kernel = pretrained.to_flax_layout(module.weight.detach().numpy())
    x_nhwc = jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))
    value, (grad_x, grad_kernel) = jax.value_and_grad(loss, (0, 1))(
        x_nhwc, jnp.asarray(kernel)
    )
    np.testing.assert_allclose(value, float((out * probe).sum().detach()), rtol=1e-5)
    np.testing.assert_allclose(grad_x, x.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(
        grad_kernel, pretrained.to_flax_layout(module.weight.grad.numpy()), atol=1e-4
    )
