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

`run.py` drives every method through this surface; `lookup.get` is the one
place that maps `config.method` to its module. This `__init__` imports nothing:
the method modules import their neighbours from this package, so importing
them here would be a cycle.
"""
