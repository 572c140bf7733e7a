"""The frozen encoder's feature cache: same training, known size, auto rule."""

import jax
import numpy as np
import pytest
from train_test import tiny_config

from recontrast_jax import checkpointing, parallel, run
from recontrast_jax.data import folder
from recontrast_jax.methods import recontrast as recontrast_method


def final_params(config, workdir):
    run.run(config, str(workdir))
    ckpt = checkpointing.manager(str(workdir / "checkpoints" / "brick"))
    tx = recontrast_method.make_optimizer(config.optimizer)
    template = recontrast_method.create_train_state(
        "resnet_tiny", 32, tx, jax.random.key(0)
    )
    return jax.device_get(checkpointing.restore_latest(ckpt, template).params)


def test_cached_and_recomputed_frozen_features_train_alike(tmp_path, tiny_dataset):
    """Bit-identical when E_f sees batches of the same size in both paths.

    With full batches only (drop_last) and the cache built at the same batch
    size (eval.batch_size == train.batch_size), XLA computes every image's
    features exactly as in the step. Other batch sizes change the rounding of
    the features (~1e-7), which Adam's normalisation can amplify in entries
    whose gradient is itself only rounding noise.
    """
    results = {}
    for mode in ("on", "off"):
        config = tiny_config(tiny_dataset, steps=4)
        config.data.categories = ("brick",)
        config.train.drop_last = True
        config.train.frozen_cache = mode
        results[mode] = final_params(config, tmp_path / mode)
    for a, b in zip(jax.tree_util.tree_leaves(results["on"]),
                    jax.tree_util.tree_leaves(results["off"]), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_cache_holds_the_frozen_features_of_every_image(tiny_dataset):
    config = tiny_config(tiny_dataset)
    samples = folder.scan_category(tiny_dataset, "brick").train
    tx = recontrast_method.make_optimizer(config.optimizer)
    state = recontrast_method.create_train_state(
        "resnet_tiny", 32, tx, jax.random.key(0)
    )
    mesh = parallel.make_mesh()
    cache = recontrast_method.frozen_feature_cache(config, state, samples, mesh)
    assert [c.shape for c in cache] == [(6, 8, 8, 16), (6, 4, 4, 32), (6, 2, 2, 64)]
    assert recontrast_method.frozen_feature_bytes(config, 6) == sum(
        c.nbytes for c in cache
    )
    # Row i is E_f applied to image i alone.
    from recontrast_jax.data import input_pipeline
    from recontrast_jax.models import recontrast

    image = input_pipeline.preprocess_image(
        folder.load_sample_image(samples[3]), 32, 32
    )[None]
    alone = recontrast.frozen_encoder_features("resnet_tiny", state.frozen, image)
    for level, expected in zip(cache, alone, strict=True):
        np.testing.assert_allclose(level[3], expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mode, budget_mb, expected", [("auto", 1, True), ("auto", 0, False),
                                  ("on", 0, True), ("off", 100, False)]
)  # fmt: skip
def test_auto_caches_when_it_fits(mode, budget_mb, expected):
    config = tiny_config()
    config.train.frozen_cache, config.train.frozen_cache_mb = mode, budget_mb
    # 6 images of 32 px: (16*64 + 32*16 + 64*4) * 4 bytes * 6 = 43,008 bytes < 1 MB.
    assert recontrast_method.use_frozen_cache(config, 6) == expected
