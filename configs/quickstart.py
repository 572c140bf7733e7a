"""Quickstart: ReContrast on the embedded dataset, with an offline-pretrained encoder.

Run (about 4 minutes on 2 CPU cores, all three categories):

  python -m recontrast_jax.main --config configs/quickstart.py --workdir runs/quickstart

The embedded dataset (brick, grass and gravel texture photographs from
scikit-image with drawn scratches, stains, holes, cuts and foreign patches) is
generated into ~/.cache/recontrast_jax on first use. The backbone is
`resnet_tiny`, a BasicBlock ResNet with one block per stage and 16/32/64
channels. ReContrast adapts a pretrained encoder, and ImageNet weights cannot be
assumed offline, so the encoder starts from `model.pretrained='offline'`: weights
shipped in the package, pretrained by `python -m recontrast_jax.offline_pretrain`
on scikit-image photographs that are none of the three textures. The anomaly
map's outer 8 pixels take the nearest inner values (`eval.border`), because at
96 px zero padding makes the edges of normal images hot. Everything else follows
the paper: losses, optimiser groups, alpha warm-up, anomaly maps, metrics; the
README lists what this config measured.
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.get_config()
    config.data.source = "embedded"
    config.data.categories = ("brick", "grass", "gravel")
    config.data.image_size = 96
    config.data.crop_size = 96
    config.model.arch = "resnet_tiny"
    config.model.pretrained = "offline"  # shipped in the package: nothing to download
    config.train.steps = 500
    config.train.batch_size = 16
    config.train.log_every = 10
    config.eval.every = 500
    config.eval.batch_size = 16
    config.eval.border = 8
    config.report.title = "ReContrast, quickstart config"
    return config
