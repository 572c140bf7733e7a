"""ReConPatch on the embedded dataset with a random-init tiny encoder.

  python -m recontrast_jax.main --config configs/reconpatch_quickstart.py \
      --workdir runs/reconpatch_quickstart

Same data, backbone and patch features as configs/patchcore_quickstart.py, plus
the trained linear modulation f (256 -> 128) and projection g (128 -> 64). With so
few steps the paper's learning rate of 1e-5 would leave f at its random init, so
this quick run uses 1e-3.
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.embedded_memory_bank_config("reconpatch")
    config.reconpatch.feature_dim = 128
    config.reconpatch.projection_dim = 64
    config.reconpatch.epochs = 20
    config.reconpatch.batch_size = 1024
    config.reconpatch.lr = 1e-3
    config.checkpoint.every = 100
    config.train.log_every = 20
    config.report.title = "ReConPatch, quickstart config"
    return config
