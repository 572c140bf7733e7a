"""The methods, each a module with the same small surface.

  fit(config, workdir, category, train_samples, mesh, writer, evaluate_fn=None)
      -> (model, info)        train (resuming) or fit the category's model
  restore(config, workdir, category, mesh) -> model
                              the saved model (`checkpoint.step`, -1: latest)
  compile_predict(config, mesh) -> predict_fn(model, images) -> (maps, scores)
                              jitted over the mesh (model replicated, images sharded)
  configured_predict(config) -> the same pure function, for export
  host_model(model)           host copy of what predict reads (export constants)
  model_step(model)           its training step (None if it has none)

`run.py` drives every method through this surface; `get` is the one place
that maps `config.method` to its module.
"""

from __future__ import annotations

import types

from recontrast_jax.methods import patchcore, reconpatch, recontrast

METHODS: dict[str, types.ModuleType] = {
    "recontrast": recontrast,
    "patchcore": patchcore,
    "reconpatch": reconpatch,
}


def get(name: str) -> types.ModuleType:
    """The module of method `name` (`config.method`)."""
    if name not in METHODS:
        raise ValueError(
            f"Unknown config.method {name!r}: use one of {sorted(METHODS)}."
        )
    return METHODS[name]
