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
    config = default_config.get_config()
    config.method = "reconpatch"
    config.data.source = "embedded"
    config.data.categories = ("brick", "grass", "gravel")
    config.data.image_size = 96
    config.data.crop_size = 96
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.patchcore.pretrain_dim = 256
    config.patchcore.target_dim = 256
    config.patchcore.coreset_ratio = 0.1
    config.reconpatch.feature_dim = 128
    config.reconpatch.projection_dim = 64
    config.reconpatch.epochs = 20
    config.reconpatch.batch_size = 1024
    config.reconpatch.lr = 1e-3
    config.eval.batch_size = 16
    config.checkpoint.every = 100
    config.train.log_every = 20
    config.report.title = "ReConPatch quickstart (embedded dataset, random init)"
    return config
