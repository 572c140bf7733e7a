"""PatchCore on the embedded dataset with an ImageNet EfficientNet-Lite0 (no training).

  python -m recontrast_jax.main --config configs/patchcore_quickstart.py \
      --workdir runs/patchcore_quickstart

Same data as configs/quickstart.py, at 128 px; the encoder's ImageNet weights
come with an installed package, so nothing is downloaded. Patch features from
its stride-8 and stride-16 maps, projected to 256 dimensions, and a 10%
coreset; the README lists what this config measured.
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.embedded_memory_bank_config("patchcore")
    config.report.title = "PatchCore, quickstart config"
    return config
