"""bfloat16 compute: float32 parameters and statistics, bounded difference from float32."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from recontrast_jax import default_config, parallel
from recontrast_jax.methods import recontrast as recontrast_method
from recontrast_jax.models import layers


def test_batchnorm_keeps_float32_statistics_under_bfloat16():
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3)) * 3.0 + 5.0
    bn = layers.BatchNorm()
    variables = bn.init(jax.random.key(1), x, train=True)
    out32, upd32 = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    out16, upd16 = bn.apply(
        variables, x.astype(jnp.bfloat16), train=True, mutable=["batch_stats"]
    )
    assert (
        out16.dtype == jnp.bfloat16
        and upd16["batch_stats"]["mean"].dtype == jnp.float32
    )
    # Statistics from bf16 inputs (8-bit mantissa) match float32 ones to ~2^-8.
    np.testing.assert_allclose(
        upd16["batch_stats"]["mean"], upd32["batch_stats"]["mean"], rtol=1e-2
    )
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=3e-2)


def quick_config(dtype):
    config = default_config.get_config()
    config.model.arch = "resnet_tiny"
    config.model.dtype = dtype
    config.data.image_size = config.data.crop_size = 64
    config.train.steps = 10
    return config


def test_bfloat16_training_and_maps_stay_close_to_float32():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 64, 64, 3)).astype(np.float32)
    mesh = parallel.make_mesh()
    losses, states = {}, {}
    for dtype in ("float32", "bfloat16"):
        config = quick_config(dtype)
        tx = recontrast_method.make_optimizer(config.optimizer)
        state = parallel.replicate(
            mesh,
            recontrast_method.create_train_state(
                "resnet_tiny", 64, tx, jax.random.key(0)
            ),
        )
        step = recontrast_method.compile_train_step(
            config, tx, mesh, encoder_train=True
        )
        batch = parallel.global_batch(mesh, {"image": images})["image"]
        losses[dtype] = []
        for _ in range(10):
            state, metrics = step(state, batch)
            losses[dtype].append(float(metrics["loss"]))
        states[dtype] = state
        assert jax.tree_util.tree_leaves(state.params)[0].dtype == jnp.float32
    # The loss curves agree to a few percent over 10 steps.
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)
    # Same weights, both dtypes at inference: maps close, image ranking kept.
    maps = {}
    for dtype in ("float32", "bfloat16"):
        predict = recontrast_method.compile_predict(quick_config(dtype), mesh)
        maps[dtype], _ = predict(states["float32"], jnp.asarray(images))
    m32, m16 = (np.asarray(maps[d]) for d in ("float32", "bfloat16"))
    assert np.abs(m16 - m32).max() <= 0.05 * (m32.max() - m32.min())
    assert stats.spearmanr(m16.ravel(), m32.ravel()).statistic > 0.98
