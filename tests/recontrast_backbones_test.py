"""ReContrast on encoders other than ResNets: bottleneck and decoder sized from
`backbones.feature_channels`, so each reconstruction has its target's shape and
a training step moves every part of the model.
"""

import functools

import jax
import numpy as np
import optax
import pytest

from recontrast_jax.methods import recontrast_steps
from recontrast_jax.models import backbones, de_resnet, resnet
from recontrast_jax.models import recontrast as recontrast_model

SIDE = 32


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "densenet_tiny"])
def test_reconstructions_have_the_encoder_feature_shapes(arch):
    variables, frozen = recontrast_model.init_variables(arch, jax.random.key(0), SIDE)
    images = jax.random.normal(jax.random.key(1), (2, SIDE, SIDE, 3))
    features = recontrast_model.frozen_encoder_features(arch, frozen, images)
    targets, recons = recontrast_model.ReContrast(arch).apply(
        variables, images, features, train=False, encoder_train=False
    )
    channels = backbones.feature_channels(arch)
    expected = [
        (2, SIDE // stride, SIDE // stride, c)
        for stride, c in zip((4, 8, 16), channels, strict=True)
    ] * 2
    assert [t.shape for t in targets] == expected
    assert [r.shape for r in recons] == expected


def test_resnets_keep_the_authors_decoder_shape():
    for arch in resnet.ARCHS:
        assert de_resnet.decoder_spec(arch) is resnet.get_arch(arch)
    spec = de_resnet.decoder_spec("efficientnet_lite0")
    assert spec.block == "basic"
    assert spec.stage_channels == backbones.feature_channels("efficientnet_lite0")


def test_a_train_step_on_efficientnet_changes_every_part():
    arch = "efficientnet_lite0"
    tx = optax.adam(1e-3)
    state = recontrast_steps.create_train_state(arch, SIDE, tx, jax.random.key(0))
    step = jax.jit(
        functools.partial(
            recontrast_steps.train_step,
            arch=arch,
            tx=tx,
            total_steps=10,
            warmup_fraction=0.1,
            mining_factor=0.0,
            encoder_train=True,
        )
    )
    images = jax.random.normal(jax.random.key(2), (4, SIDE, SIDE, 3))
    new, metrics = step(state, images)
    assert np.isfinite(float(metrics["loss"]))
    for part in ("encoder", "bottleneck", "decoder"):
        before = jax.tree_util.tree_leaves(state.params[part])
        after = jax.tree_util.tree_leaves(new.params[part])
        assert any(
            not np.array_equal(a, b) for a, b in zip(before, after, strict=True)
        ), part
    # E_f never moves.
    for a, b in zip(
        jax.tree_util.tree_leaves(state.frozen),
        jax.tree_util.tree_leaves(new.frozen),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
