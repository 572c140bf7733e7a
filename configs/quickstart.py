"""Quickstart: ReContrast on the embedded dataset, from random initialisation.

Run (about N minutes on 2 CPU cores):

  python -m recontrast_jax.main --config configs/quickstart.py --workdir runs/quickstart

The embedded dataset (brick, grass, gravel textures from scikit-image with drawn
defects) is generated into ~/.cache/recontrast_jax on first use. No pretrained
weights are used, so the numbers are far below the paper's; see the README.
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.get_config()
    config.data.source = "embedded"
    config.data.categories = ("brick", "grass", "gravel")
    config.data.image_size = 64
    config.data.crop_size = 64
    config.model.arch = "resnet18"
    config.train.steps = 200
    config.train.batch_size = 16
    config.train.log_every = 10
    config.eval.every = 200
    config.eval.batch_size = 16
    config.report.title = "ReContrast quickstart (embedded dataset, random init)"
    return config
