"""Data parallelism: the same steps on 1 and 2 simulated CPU devices agree.

Each run happens in a subprocess because the device count is fixed when JAX
starts (`XLA_FLAGS=--xla_force_host_platform_device_count=N`).

The runs use Adam eps=1e-2 instead of the paper's 1e-8, and 64 px images (so
the tiny model's deepest BatchNorm sees more than one pixel per image). Adam
divides each gradient entry by its own magnitude plus eps: an entry whose
gradient is small turns float32 summation noise (which differs between 1 and 2
devices because the reduction order differs, ~1e-7 relative) into a visible
step difference. With eps=1e-4 that left parameter differences of up to 2e-4
after 4 steps in a few decoder entries; with eps=1e-2 the runs agree to 2.4e-7,
which is what the data-parallel code itself must deliver. The amplification is
a property of the optimiser in float32 (PyTorch shows it across GPU counts too).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np

RUN_STEPS = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    import ml_collections
    from recontrast_jax import default_config, parallel
    from recontrast_jax.methods import recontrast as recontrast_method

    config = default_config.get_config()
    config.model.arch = "resnet_tiny"
    config.train.steps = 20
    config.optimizer.eps = 1e-2
    mesh = parallel.make_mesh()
    assert jax.device_count() == int(sys.argv[2]), jax.devices()
    tx = recontrast_method.make_optimizer(config.optimizer)
    state = recontrast_method.create_train_state("resnet_tiny", 64, tx, jax.random.key(0))
    state = parallel.replicate(mesh, state)
    step = recontrast_method.compile_train_step(config, tx, mesh, encoder_train=True)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(4):
        images = rng.normal(size=(8, 64, 64, 3)).astype(np.float32)
        batch = parallel.global_batch(mesh, {"image": images})
        state, metrics = step(state, batch["image"])
        losses.append(float(metrics["loss"]))
    leaves = jax.tree_util.tree_leaves(jax.device_get((state.params, state.batch_stats)))
    np.savez(sys.argv[1], losses=np.array(losses), *leaves)
    """
)


def run_with_devices(tmp_path, devices):
    out = tmp_path / f"run_{devices}.npz"
    env = dict(os.environ)
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    subprocess.run(
        [sys.executable, "-c", RUN_STEPS, str(out), str(devices)],
        check=True,
        env=env,
        timeout=600,
    )
    return np.load(out)


def test_one_and_two_devices_give_the_same_training(tmp_path):
    one = run_with_devices(tmp_path, 1)
    two = run_with_devices(tmp_path, 2)
    print(
        f"max |loss_1dev - loss_2dev| = {np.abs(one['losses'] - two['losses']).max():.3g}"
    )
    np.testing.assert_allclose(one["losses"], two["losses"], atol=1e-5, rtol=0)
    assert len(one.files) == len(two.files) > 10
    worst = 0.0
    for name in one.files:
        if name == "losses":
            continue
        worst = max(worst, float(np.abs(one[name] - two[name]).max()))
    print(f"max |params_1dev - params_2dev| = {worst:.3g}")
    assert worst < 1e-5
