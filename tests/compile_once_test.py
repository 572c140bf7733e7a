"""Categories of one run share their compiled train step (`compile_once`)."""

import jax
import jax.numpy as jnp

from recontrast_jax import default_config, parallel
from recontrast_jax.methods import recontrast_steps


def lowered_step(config, mesh, encoder_train: bool):
    """A fresh jit object, as each category's `run_training` builds one."""
    tx = recontrast_steps.make_optimizer(config.optimizer)
    state = recontrast_steps.create_train_state(
        config.model.arch, 32, tx, jax.random.key(0)
    )
    step = recontrast_steps.compile_train_step(config, tx, mesh, encoder_train)
    images = jnp.zeros((2, 32, 32, 3), jnp.float32)
    return step.lower(parallel.replicate(mesh, state), images)


def test_the_same_program_compiles_once_and_another_does_not_reuse_it():
    config = default_config.get_config()
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    mesh = parallel.make_mesh()
    before = len(recontrast_steps._EXECUTABLES)
    first = recontrast_steps.compile_once(lowered_step(config, mesh, True))
    again = recontrast_steps.compile_once(lowered_step(config, mesh, True))
    assert again is first
    assert len(recontrast_steps._EXECUTABLES) == before + 1
    other = recontrast_steps.compile_once(lowered_step(config, mesh, False))
    assert other is not first
    assert len(recontrast_steps._EXECUTABLES) == before + 2
