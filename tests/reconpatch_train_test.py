"""ReConPatch training: step wiring, EMA, schedule, resume, 1 vs 2 devices.

Only the kernels of f and g are compared between runs. The biases shift every
projection by the same vector, so the loss (a function of pairwise distances)
has an exactly zero gradient for them; in float32 that gradient is rounding
noise (~1e-9), which Adam's normalisation turns into steps of up to lr whose
sign depends on summation order. They also cannot change any score: bank and
query features shift together.
"""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recontrast_jax import checkpointing, default_config, parallel
from recontrast_jax.methods import adamp, reconpatch_loss
from recontrast_jax.methods import reconpatch as reconpatch_method
from recontrast_jax.models import reconpatch


def small_config(epochs=3, batch=16, ema=0.9):
    config = default_config.get_config()
    cfg = config.reconpatch
    cfg.feature_dim, cfg.projection_dim = 6, 4
    cfg.epochs, cfg.batch_size, cfg.lr, cfg.ema = epochs, batch, 1e-2, ema
    config.train.log_every = 1
    config.checkpoint.every = 1000
    return config


def test_linear_init_matches_pytorch_bounds():
    params = reconpatch.Modulation(6, 4).init(jax.random.key(0), jnp.zeros((1, 100)))
    f, g = params["params"]["f"], params["params"]["g"]
    assert f["kernel"].shape == (100, 6) and g["kernel"].shape == (6, 4)
    # nn.Linear: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert np.abs(f["kernel"]).max() <= 0.1 and np.abs(f["bias"]).max() <= 0.1
    assert np.abs(g["kernel"]).max() <= 1 / math.sqrt(6)
    assert np.abs(f["kernel"]).max() > 0.09  # not a narrower distribution


def _numpy_projection(params, p):
    r = p @ np.asarray(params["f"]["kernel"]) + np.asarray(params["f"]["bias"])
    return r @ np.asarray(params["g"]["kernel"]) + np.asarray(params["g"]["bias"])


def test_step_uses_target_for_labels_online_for_loss_then_ema():
    config = small_config()
    cfg = config.reconpatch
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(16, 10)).astype(np.float32)
    tx = reconpatch_method.make_optimizer(cfg, steps_in_epoch=1)
    state = reconpatch_method.init_state(cfg, 10, tx, jax.random.key(0))
    # A target that differs from the online network, to see which one is used.
    target = jax.tree_util.tree_map(lambda x: x * 0.5 + 0.01, state.params)
    state = state.replace(target_params=target)
    new, metrics = jax.jit(
        lambda s, p: reconpatch_method.train_step(s, p, cfg=cfg, tx=tx)
    )(state, patches)

    labels = reconpatch_loss.reconpatch_labels(
        jnp.asarray(_numpy_projection(target, patches)), k=cfg.k
    )

    def loss_of(params):
        z = (patches @ params["f"]["kernel"] + params["f"]["bias"]) @ params["g"][
            "kernel"
        ] + params["g"]["bias"]
        return reconpatch_loss.relaxed_contrastive_loss(z, labels, cfg.margin)

    np.testing.assert_allclose(metrics["loss"], loss_of(state.params), rtol=1e-5)
    grads = jax.grad(loss_of)(state.params)
    updates, _ = adamp.adamp(cfg.lr, weight_decay=cfg.weight_decay).update(
        grads, adamp.adamp(cfg.lr).init(state.params), state.params
    )
    expected = jax.tree_util.tree_map(jnp.add, state.params, updates)
    for layer in ("f", "g"):
        np.testing.assert_allclose(
            new.params[layer]["kernel"], expected[layer]["kernel"], rtol=1e-5, atol=1e-7
        )
    # Eq. 8 after the update: target <- gamma * target + (1 - gamma) * online.
    for t_new, t_old, p_new in zip(
        jax.tree_util.tree_leaves(new.target_params),
        jax.tree_util.tree_leaves(target),
        jax.tree_util.tree_leaves(new.params),
        strict=True,
    ):
        np.testing.assert_allclose(t_new, 0.9 * t_old + 0.1 * p_new, rtol=1e-6)


def test_cosine_schedule_is_per_epoch_like_cosine_annealing_lr():
    schedule = reconpatch_method.cosine_per_epoch(1e-3, epochs=4, steps_in_epoch=5)
    # CosineAnnealingLR(T_max=4), stepped per epoch: lr * (1 + cos(pi e / 4)) / 2.
    for step in range(20):
        epoch = step // 5
        expected = 1e-3 * (1 + math.cos(math.pi * epoch / 4)) / 2
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)


def test_batches_cover_the_pool_once_per_epoch():
    order = reconpatch_method.epoch_order(3, 1, 50)
    mesh = parallel.make_mesh()
    seen = np.concatenate(
        [reconpatch_method.local_batch(np.arange(50)[:, None], order, i, 16, mesh)[:, 0]
         for i in range(reconpatch_method.steps_per_epoch(50, 16))]
    )  # fmt: skip
    assert len(seen) == 48 and len(set(seen.tolist())) == 48
    assert not np.array_equal(order, reconpatch_method.epoch_order(3, 2, 50))


class Interrupted(Exception):
    pass


def test_resume_after_interruption_gives_identical_parameters(tmp_path):
    config = small_config(epochs=3)
    config.checkpoint.every = 4
    pool = np.random.default_rng(1).normal(size=(40, 10)).astype(np.float32)
    mesh = parallel.make_mesh()

    def run(directory, interrupt_at=None):
        ckpt = checkpointing.manager(str(directory), 2)

        def save(step, state):
            checkpointing.save(ckpt, step, {"modulation": state})
            if step == interrupt_at:
                raise Interrupted

        return reconpatch_method.train_modulation(config, pool, mesh, ckpt, save)

    straight, info = run(tmp_path / "a")
    assert info["steps"] == 3 * 2  # 40 patches, batch 16: 2 steps per epoch
    with pytest.raises(Interrupted):
        run(tmp_path / "b", interrupt_at=4)
    resumed, _ = run(tmp_path / "b")
    for a, b in zip(jax.tree_util.tree_leaves(straight),
                    jax.tree_util.tree_leaves(resumed), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


RUN_STEPS = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from recontrast_jax import checkpointing, default_config, parallel
    from recontrast_jax.methods import reconpatch as reconpatch_method

    config = default_config.get_config()
    cfg = config.reconpatch
    cfg.feature_dim, cfg.projection_dim = 6, 4
    cfg.epochs, cfg.batch_size, cfg.lr, cfg.ema = 2, 16, 1e-2, 0.9
    cfg.eps = 1e-3  # see test_one_and_two_devices_agree
    config.checkpoint.every = 1000
    assert jax.device_count() == int(sys.argv[2]), jax.devices()
    pool = np.random.default_rng(1).normal(size=(48, 10)).astype(np.float32)
    ckpt = checkpointing.manager(sys.argv[1] + "_ckpt")
    params, info = reconpatch_method.train_modulation(
        config, pool, parallel.make_mesh(), ckpt, lambda *a: None)
    np.savez(sys.argv[1], loss=info["loss"], f=params["f"]["kernel"],
             g=params["g"]["kernel"])
    """
)


def test_one_and_two_devices_agree(tmp_path):
    """The same training on 1 and 2 simulated devices.

    AdamP runs with eps 1e-3 here: with 1e-8 the biases' gradient, which is
    exactly zero in exact arithmetic (see the module docstring) but float32
    noise that depends on the reduction order, becomes +-lr steps. Unlike the
    distances, the L2-normalised pairwise labels do see the biases, so that
    noise would make the two runs drift apart for a reason unrelated to the
    data-parallel code.
    """
    results = []
    for devices in (1, 2):
        out = tmp_path / f"run_{devices}.npz"
        env = dict(os.environ, JAX_PLATFORMS="cpu")  # conftest's XLA_FLAGS, plus:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
        subprocess.run(
            [sys.executable, "-c", RUN_STEPS, str(out), str(devices)],
            check=True, env=env, timeout=300,
        )  # fmt: skip
        results.append(np.load(out))
    one, two = results
    assert set(one.files) == set(two.files)
    for name in one.files:
        np.testing.assert_allclose(one[name], two[name], rtol=1e-4, atol=1e-6)
