"""Numerical parity of the ensemble backbones with torchvision.

torchvision `resnext101_32x8d()` and `densenet201()` with random weights and
random BatchNorm statistics are written to disk (safetensors; for DenseNet also
a `.pth` with the old torchvision key names), loaded with
`pretrained.load_encoder_variables` and run at 64 px. The three Flax maps are
compared with torchvision's own intermediate outputs. Runs only when torch and
torchvision are installed.
"""

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from backbones_test import to_legacy_key  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from recontrast_jax import pretrained  # noqa: E402
from recontrast_jax.models import backbones  # noqa: E402

SIDE = 64


def randomise_batch_norms(model, closing_suffix=None):
    """Random BN affine parameters, then running statistics from one batch.

    BNs whose name ends with `closing_suffix` (the last BN of a residual branch)
    get small scales, as in trained ResNets, so features stay of order 1-10.
    """
    with torch.no_grad():
        for name, bn in model.named_modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                small = closing_suffix is not None and name.endswith(closing_suffix)
                bn.weight.uniform_(*((0.1, 0.3) if small else (0.5, 1.5)))
                bn.bias.normal_(0, 0.1)
                bn.momentum = 1.0
        model.train()
        model(torch.randn(4, 3, SIDE, SIDE))
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = 0.1
    return model.eval()


def numpy_state_dict(model):
    """Contiguous copies (safetensors needs them; torch buffers are shared)."""
    return {
        k: np.ascontiguousarray(v.detach().numpy().copy())
        for k, v in model.state_dict().items()
    }


def flax_template(arch):
    module = backbones.make_encoder(arch)
    return jax.eval_shape(
        lambda: module.init(
            jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3)), train=False
        )
    )


def run_flax(arch, variables, x_nchw):
    x = jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1))
    return [
        np.asarray(m)
        for m in backbones.make_encoder(arch).apply(variables, x, train=False)
    ]


def hooked_outputs(model, modules, x):
    """Outputs of `modules` during a full torchvision forward pass, as NHWC."""
    captured = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: captured.append(out))
        for m in modules
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return [c.numpy().transpose(0, 2, 3, 1) for c in captured]


def count(tensors):
    return sum(int(t.numel()) for t in tensors)


def check_counts(arch, variables, covered_modules):
    """Flax params / batch stats vs the torchvision submodules they cover."""
    torch_params = count(p for m in covered_modules for p in m.parameters())
    torch_stats = count(
        b
        for m in covered_modules
        for name, b in m.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    )
    flax_params = count_leaves(variables["params"])
    flax_stats = count_leaves(variables["batch_stats"])
    print(f"{arch}: params flax {flax_params:,} / torch {torch_params:,}")
    assert flax_params == torch_params
    assert flax_stats == torch_stats


def count_leaves(tree):
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree))


def compare_maps(arch, got, expected, strides=(4, 8, 16)):
    for k, (g, e, s) in enumerate(zip(got, expected, strides, strict=True), start=1):
        diff = float(np.abs(g - e).max())
        scale = float(np.abs(e).max())
        print(
            f"{arch} map{k} {e.shape}: max |flax - torch| = {diff:.2e} (max |torch| {scale:.1f})"
        )
        assert g.shape == e.shape
        assert e.shape[1] == SIDE // s
        assert diff <= 1e-4


def test_resnext101_32x8d_matches_torchvision(tmp_path):
    start = time.perf_counter()
    torch.manual_seed(0)
    model = randomise_batch_norms(
        torchvision.models.resnext101_32x8d(weights=None), closing_suffix="bn3"
    )
    path = tmp_path / "resnext101_32x8d.safetensors"
    save_file(numpy_state_dict(model), str(path))  # includes layer4 and fc
    variables = pretrained.load_encoder_variables(
        "resnext101_32x8d", str(path), flax_template("resnext101_32x8d")
    )
    check_counts(
        "resnext101_32x8d",
        variables,
        [model.conv1, model.bn1, model.layer1, model.layer2, model.layer3],
    )
    x = torch.randn(2, 3, SIDE, SIDE)
    expected = hooked_outputs(model, [model.layer1, model.layer2, model.layer3], x)
    got = run_flax("resnext101_32x8d", variables, x)
    compare_maps("resnext101_32x8d", got, expected)
    assert [g.shape[-1] for g in got] == list(
        backbones.feature_channels("resnext101_32x8d")
    )
    print(f"resnext101_32x8d parity: {time.perf_counter() - start:.1f} s")


def test_densenet201_matches_torchvision_including_legacy_pth(tmp_path):
    start = time.perf_counter()
    torch.manual_seed(1)
    model = randomise_batch_norms(torchvision.models.densenet201(weights=None))
    state_dict = numpy_state_dict(model)
    new_style = tmp_path / "densenet201.safetensors"
    save_file(state_dict, str(new_style))
    legacy = tmp_path / "densenet201_legacy.pth"
    legacy_keys = {to_legacy_key(k): v for k, v in state_dict.items()}
    assert "features.denseblock3.denselayer48.conv.2.weight" in legacy_keys
    torch.save({k: torch.from_numpy(v) for k, v in legacy_keys.items()}, legacy)

    template = flax_template("densenet201")
    variables = pretrained.load_encoder_variables(
        "densenet201", str(new_style), template
    )
    from_legacy = pretrained.load_encoder_variables(
        "densenet201", str(legacy), template
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_legacy, variables)

    f = model.features
    check_counts(
        "densenet201",
        variables,
        [
            f.conv0,
            f.norm0,
            f.denseblock1,
            f.transition1,
            f.denseblock2,
            f.transition2,
            f.denseblock3,
        ],
    )
    x = torch.randn(2, 3, SIDE, SIDE)
    expected = hooked_outputs(model, [f.denseblock1, f.denseblock2, f.denseblock3], x)
    got = run_flax("densenet201", variables, x)
    compare_maps("densenet201", got, expected)
    assert [g.shape[-1] for g in got] == [256, 512, 1792]
    print(f"densenet201 parity: {time.perf_counter() - start:.1f} s")
