"""PatchCore on the embedded dataset with a random-init tiny encoder (no training).

  python -m recontrast_jax.main --config configs/patchcore_quickstart.py \
      --workdir runs/patchcore_quickstart

Same data and backbone as configs/quickstart.py, so the two can be compared; with
a random encoder both are far from what pretrained features give.
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.get_config()
    config.method = "patchcore"
    config.data.source = "embedded"
    config.data.categories = ("brick", "grass", "gravel")
    config.data.image_size = 96
    config.data.crop_size = 96
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.patchcore.pretrain_dim = 256
    config.patchcore.target_dim = 256
    config.patchcore.coreset_ratio = 0.1
    config.eval.batch_size = 16
    config.report.title = "PatchCore quickstart (embedded dataset, random init)"
    return config
