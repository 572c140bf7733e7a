"""Stable ReContrast: PartialNorm, the optimiser restarts and pauses, a whole run.

Oracles: torch transcriptions of the spec (recontrast.md section 3.4) of
PartialNorm2D's train-mode forward, running statistics and gradients, and of
the stable scripts' two AdamW optimisers with `opt1.state` emptied and
`opt2.step()` skipped; the run uses configs/mvtec_stable.py on small data.
"""

import collections
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recontrast_jax import default_config, run
from recontrast_jax.methods import recontrast_steps
from recontrast_jax.models import layers

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
THRESH, EPS = 5e-4, 1e-6
SCALES = np.asarray([1.0, 0.01, 1.0, 0.001, 0.5, 0.02], np.float32)


def partial_norm_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(4, 5, 5, 6)) * SCALES).astype(np.float32)
    channels = len(SCALES)
    return {
        "x": x,
        "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "bias": rng.normal(0, 0.1, channels).astype(np.float32),
        "mean": rng.normal(0, 0.1, channels).astype(np.float32),
        "var": rng.uniform(1e-4, 1e-2, channels).astype(np.float32),  # pretrained
        "weights": rng.normal(size=x.shape).astype(np.float32),
    }


def flax_partial_norm(inputs, threshold=THRESH):
    module = layers.BatchNorm(epsilon=EPS, partial_var_threshold=threshold)

    def loss(x, scale, bias):
        out, updated = module.apply(
            {
                "params": {"scale": scale, "bias": bias},
                "batch_stats": {"mean": inputs["mean"], "var": inputs["var"]},
                "pretrained_stats": {"var": inputs["var"]},
            },
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(out * inputs["weights"]), (out, updated["batch_stats"])

    grads, (out, stats) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
        inputs["x"], inputs["scale"], inputs["bias"]
    )
    return out, stats, grads


def torch_partial_norm(torch, inputs):
    """PartialNorm2D's train-mode step, transcribed from spec section 3.4."""
    x = torch.tensor(inputs["x"].transpose(0, 3, 1, 2), requires_grad=True)
    w = torch.tensor(inputs["scale"], requires_grad=True)
    b = torch.tensor(inputs["bias"], requires_grad=True)
    running_mean = torch.tensor(inputs["mean"])
    running_var = torch.tensor(inputs["var"])
    min_var = torch.minimum(running_var.clone(), torch.tensor(THRESH))  # first forward
    mean = x.mean(dim=(0, 2, 3))
    unbiased = x.var(dim=(0, 2, 3), unbiased=True)
    biased = x.var(dim=(0, 2, 3), unbiased=False)
    normal = unbiased.detach() > min_var

    def shape(t):
        return t[None, :, None, None]

    standard = (x - shape(mean)) / torch.sqrt(shape(biased) + EPS)
    floored = (x - shape(mean)) / torch.sqrt(shape(min_var) + EPS)
    out = torch.where(shape(normal), standard, floored) * shape(w) + shape(b)
    with torch.no_grad():
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * torch.where(normal, unbiased, min_var)
    weights = torch.tensor(inputs["weights"].transpose(0, 3, 1, 2))
    (out * weights).sum().backward()
    return out, running_mean, running_var, (x.grad, w.grad, b.grad), normal


def test_partial_norm_matches_torch_transcription():
    torch = pytest.importorskip("torch")
    inputs = partial_norm_inputs()
    out, stats, grads = flax_partial_norm(inputs)
    t_out, t_mean, t_var, t_grads, normal = torch_partial_norm(torch, inputs)
    assert 0 < int(normal.sum()) < len(SCALES)  # both kinds of channel occur
    np.testing.assert_allclose(out, t_out.detach().numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(stats["mean"], t_mean.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(stats["var"], t_var.numpy(), rtol=1e-5, atol=1e-9)
    grad_x, grad_w, grad_b = (t.numpy() for t in t_grads)
    np.testing.assert_allclose(
        grads[0], grad_x.transpose(0, 2, 3, 1), rtol=2e-4, atol=1e-3
    )
    np.testing.assert_allclose(grads[1], grad_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[2], grad_b, rtol=1e-5, atol=1e-5)


def test_plain_batch_norm_differs_on_low_variance_channels():
    inputs = partial_norm_inputs()
    partial, _, _ = flax_partial_norm(inputs)
    plain, _, _ = flax_partial_norm(inputs, threshold=0.0)
    low = SCALES < 0.05
    assert np.abs(np.asarray(partial - plain))[..., low].max() > 1e-1
    np.testing.assert_allclose(partial[..., ~low], plain[..., ~low], rtol=1e-5)


def test_partial_norm_without_pretrained_statistics_is_named():
    module = layers.BatchNorm(partial_var_threshold=THRESH)
    x = jnp.ones((2, 3, 3, 2))
    variables = module.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="pretrained_stats"):
        module.apply(variables, x, train=True, mutable=["batch_stats"])


PERIOD, PAUSE, STEPS, LR, WD = 3, 2, 10, 1e-2, 1e-5


def stable_optimizer_config():
    config = default_config.get_config().optimizer
    config.lr_decoder, config.lr_encoder, config.weight_decay = LR, LR / 4, WD
    config.eps = 1e-10
    config.reset_decoder_every, config.encoder_pause_after_reset = PERIOD, PAUSE
    return config


def test_restarts_and_pauses_match_torch_optimisers():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    start = {"decoder": rng.normal(size=(3,)).astype(np.float32),
             "encoder": rng.normal(size=(3,)).astype(np.float32)}  # fmt: skip
    grads = [{k: rng.normal(size=(3,)).astype(np.float32) for k in start}
             for _ in range(STEPS)]  # fmt: skip
    dec = torch.nn.Parameter(torch.tensor(start["decoder"]))
    enc = torch.nn.Parameter(torch.tensor(start["encoder"]))
    opt1 = torch.optim.AdamW([dec], lr=LR, eps=1e-10, weight_decay=WD)
    opt2 = torch.optim.AdamW([enc], lr=LR / 4, eps=1e-10, weight_decay=WD)
    expected, paused_until = [], 0
    for it, g in enumerate(grads, start=1):
        dec.grad, enc.grad = torch.tensor(g["decoder"]), torch.tensor(g["encoder"])
        opt1.step()
        if it > paused_until:
            opt2.step()
        if it % PERIOD == 0:  # opt1.state emptied; opt2 skipped for PAUSE steps
            opt1.state = collections.defaultdict(dict)
            paused_until = it + PAUSE
        expected.append((dec.detach().numpy().copy(), enc.detach().numpy().copy()))

    tx = recontrast_steps.make_optimizer(stable_optimizer_config())
    params = {k: jnp.asarray(v) for k, v in start.items()}
    state = tx.init(params)
    for step, g in enumerate(grads):
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["decoder"], expected[step][0], rtol=1e-5,
                                   err_msg=f"decoder, update {step + 1}")  # fmt: skip
        np.testing.assert_allclose(params["encoder"], expected[step][1], rtol=1e-5,
                                   err_msg=f"encoder, update {step + 1}")  # fmt: skip


@pytest.mark.parametrize("name", ["mvtec_stable", "visa_stable"])
def test_stable_run_end_to_end(tmp_path, tiny_dataset, name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(CONFIGS, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("all")
    config.data.root = str(tiny_dataset)
    config.data.categories = ("brick",)
    config.data.image_size = config.data.crop_size = 32
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.optimizer.reset_decoder_every, config.optimizer.encoder_pause_after_reset = (
        2,
        1,
    )
    config.train.steps, config.train.batch_size = 4, 4
    config.eval.every = config.checkpoint.every = 4
    config.eval.batch_size = 4
    config.report.num_heatmaps = 0
    run.run(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.json") as f:
        metrics = json.load(f)["categories"]["brick"]
    assert metrics["steps"] == 4.0 and 0.0 <= metrics["pixel_auroc"] <= 1.0
