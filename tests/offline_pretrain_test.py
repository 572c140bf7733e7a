"""The offline-pretrained encoder: its sources, its determinism, the shipped file."""

import os

import jax
import numpy as np
import pytest

from recontrast_jax import default_config, offline_pretrain, pretrained
from recontrast_jax.data import synthetic
from recontrast_jax.methods import recontrast as recontrast_method


def test_sources_are_bundled_and_exclude_the_embedded_textures():
    embedded = set(synthetic.CATEGORIES)
    assert (
        not {os.path.splitext(f)[0] for f in offline_pretrain.SOURCE_FILES} & embedded
    )
    images = offline_pretrain.source_images()
    assert len(images) == len(offline_pretrain.SOURCE_FILES)
    assert all(i.ndim == 3 and i.shape[-1] == 3 for i in images)


def test_pretraining_is_bit_for_bit_reproducible():
    first, _ = offline_pretrain.pretrain(steps=2, batch_size=4, size=32, seed=3)
    second, _ = offline_pretrain.pretrain(steps=2, batch_size=4, size=32, seed=3)
    other, _ = offline_pretrain.pretrain(steps=2, batch_size=4, size=32, seed=4)
    pairs = zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other), strict=True)
    )


def test_shipped_weights_load_as_offline():
    tx = recontrast_method.make_optimizer(default_config.get_config().optimizer)
    state = recontrast_method.create_train_state(
        "resnet_tiny", 32, tx, jax.random.key(0), pretrained="offline"
    )
    random = recontrast_method.create_train_state(
        "resnet_tiny", 32, tx, jax.random.key(0), pretrained=""
    )
    loaded = jax.tree.leaves(state.frozen["batch_stats"])
    initial = jax.tree.leaves(random.frozen["batch_stats"])
    # Trained running statistics, not the initial zeros and ones.
    assert not all(np.array_equal(a, b) for a, b in zip(loaded, initial, strict=True))
    assert os.path.getsize(pretrained.OFFLINE_WEIGHTS["resnet_tiny"]) < 5 * 2**20


def test_offline_for_another_arch_is_named():
    with pytest.raises(pretrained.PretrainedWeightsError, match="resnet18"):
        pretrained.resolve_source("resnet18", "offline")
