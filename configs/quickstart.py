"""Quickstart: ReContrast on the embedded dataset, from random initialisation.

Run (about 3-4 minutes on 2 CPU cores, all three categories):

  python -m recontrast_jax.main --config configs/quickstart.py --workdir runs/quickstart

The embedded dataset (brick, grass and gravel texture photographs from
scikit-image with drawn scratches, stains, holes, cuts and foreign patches) is
generated into ~/.cache/recontrast_jax on first use. The backbone is
`resnet_tiny`, a BasicBlock ResNet with one block per stage and 16/32/64
channels, trained from random initialisation (no pretrained weights), so the
numbers are far below the paper's; the README lists what this config measured.
Everything else follows the paper: losses, optimiser groups, alpha warm-up,
anomaly maps, metrics.
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.get_config()
    config.data.source = "embedded"
    config.data.categories = ("brick", "grass", "gravel")
    config.data.image_size = 96
    config.data.crop_size = 96
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""  # random init: nothing to download
    config.train.steps = 500
    config.train.batch_size = 16
    config.train.log_every = 10
    config.eval.every = 500
    config.eval.batch_size = 16
    config.report.title = "ReContrast, quickstart config"
    return config
