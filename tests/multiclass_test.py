"""Multi-class (unified) ReContrast: its map, its decoder, and a whole run.

The 5x5 Gaussian conv is checked against scipy (and torch's `Conv2d` with the
authors' `get_gaussian_kernel` transcribed, when installed), the GELU decoder
block against torch, and the run on the embedded dataset's three categories:
one model on their training images together, evaluated per category.
"""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from recontrast_jax import anomaly_maps, run
from recontrast_jax.models import de_resnet

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def reference_kernel(size=5, sigma=4.0):
    """The authors' get_gaussian_kernel: 2-D Gaussian on the grid, sum 1."""
    coords = np.arange(size, dtype=np.float64)
    xx, yy = np.meshgrid(coords, coords)
    mean, var = (size - 1) / 2.0, sigma**2
    kernel = np.exp(-((xx - mean) ** 2 + (yy - mean) ** 2) / (2 * var))
    kernel /= 2 * math.pi * var
    return kernel / kernel.sum()


def test_conv5_equals_zero_padded_correlation():
    maps = np.random.default_rng(0).random((2, 11, 9)).astype(np.float32)
    got = np.asarray(anomaly_maps.gaussian_conv5(jnp.asarray(maps), 4.0))
    expected = np.stack([
        scipy.ndimage.correlate(m.astype(np.float64), reference_kernel(), mode="constant")
        for m in maps
    ])  # fmt: skip
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_conv5_matches_torch_conv2d():
    torch = pytest.importorskip("torch")
    maps = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32)
    conv = torch.nn.Conv2d(1, 1, 5, padding=2, bias=False)
    conv.weight.data = torch.from_numpy(reference_kernel().astype(np.float32))[
        None, None
    ]
    with torch.no_grad():
        expected = conv(torch.from_numpy(maps)[:, None])[:, 0].numpy()
    got = np.asarray(anomaly_maps.gaussian_conv5(jnp.asarray(maps), 4.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_mean_rule_averages_the_pairs_before_the_conv():
    rng = np.random.default_rng(2)
    enc = [jnp.asarray(rng.normal(size=(1, 4, 4, 3)), jnp.float32) for _ in range(6)]
    dec = [jnp.asarray(rng.normal(size=(1, 4, 4, 3)), jnp.float32) for _ in range(6)]
    total = anomaly_maps.distance_maps(enc, dec, (8, 8))
    got = anomaly_maps.anomaly_map(enc, dec, (8, 8), 4.0, "mean_conv5")
    expected = anomaly_maps.gaussian_conv5(total / 6, 4.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="eval.map_rule"):
        anomaly_maps.anomaly_map(enc, dec, (8, 8), 4.0, "median")


def test_gelu_decoder_block_matches_torch():
    """DeBottleneck(stride 1) with every ReLU an exact GELU, in eval mode."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    x = np.random.default_rng(3).normal(size=(2, 5, 5, 32)).astype(np.float32)
    block = de_resnet.DeBottleneck(8, activation="gelu")
    variables = block.init(jax.random.key(0), jnp.asarray(x), train=False)
    variables = jax.tree_util.tree_map(
        lambda v: v + 0.3 * jax.random.uniform(jax.random.key(1), v.shape), variables
    )
    got = np.asarray(block.apply(variables, jnp.asarray(x), train=False))
    p, s = variables["params"], variables["batch_stats"]

    def conv(t, name, padding):
        kernel = np.array(p[name]["kernel"]).transpose(3, 2, 0, 1).copy()
        return functional.conv2d(t, torch.from_numpy(kernel), padding=padding)

    def bn(t, name):
        def tensor(v):
            return torch.from_numpy(np.array(v))

        return functional.batch_norm(
            t, tensor(s[name]["mean"]), tensor(s[name]["var"]),
            tensor(p[name]["scale"]), tensor(p[name]["bias"]), eps=1e-5,
        )  # fmt: skip

    gelu = torch.nn.GELU()  # approximate='none': the erf form
    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    out = gelu(bn(conv(t, "conv1", 0), "bn1"))
    out = gelu(bn(conv(out, "conv2", 1), "bn2"))
    out = gelu(bn(conv(out, "conv3", 0), "bn3") + t)
    np.testing.assert_allclose(got, out.numpy().transpose(0, 2, 3, 1), atol=2e-5)
    relu = de_resnet.DeBottleneck(8).apply(variables, jnp.asarray(x), train=False)
    assert np.abs(np.asarray(relu) - got).max() > 1e-2


def multiclass_config(data, name="mvtec_multiclass"):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(CONFIGS, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.source = "folder"  # the embedded layout, generated small
    config.data.root = str(data)
    config.data.categories = ("brick", "grass", "gravel")
    config.data.image_size = config.data.crop_size = 32
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.train.steps = 6
    config.train.batch_size = 4
    config.optimizer.lr_milestones = (4,)
    config.eval.every = 3
    config.eval.batch_size = 4
    config.checkpoint.every = 3
    config.report.num_heatmaps = 0
    return config


def test_visa_multiclass_config_has_the_same_protocol(tiny_dataset):
    """Only the data differs from the MVTec config, which runs end to end below."""
    mvtec = multiclass_config(tiny_dataset).to_dict()
    visa = multiclass_config(tiny_dataset, "visa_multiclass").to_dict()
    differing = {
        (group, key)
        for group in mvtec
        if isinstance(mvtec[group], dict)
        for key in mvtec[group]
        if mvtec[group][key] != visa[group][key]
    }
    assert differing == {("data", "tfds_name"), ("report", "title")}


def test_multiclass_run_trains_one_model_for_every_category(tmp_path, tiny_dataset):
    config = multiclass_config(tiny_dataset)
    workdir = str(tmp_path / "run")
    summary = run.run(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["multiclass"]
    with open(os.path.join(workdir, "metrics.json")) as f:
        per_category = json.load(f)["categories"]
    assert sorted(per_category) == ["brick", "grass", "gravel"]
    for metrics in per_category.values():
        assert metrics["train_images"] == 18.0  # 6 per category, together
        assert metrics["steps"] == 6.0
        assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    # Evaluate mode restores the shared model and gives the same numbers.
    again = run.run(config, workdir, fit=False)
    for name in per_category:
        assert again["categories"][name]["image_auroc"] == pytest.approx(
            summary["categories"][name]["image_auroc"]
        )
