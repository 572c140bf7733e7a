"""PatchCore on the embedded dataset with a random-init tiny encoder (no training).

  python -m recontrast_jax.main --config configs/patchcore_quickstart.py \
      --workdir runs/patchcore_quickstart

Same data and backbone as configs/quickstart.py, so the two can be compared; with
a random encoder both are far from what pretrained features give.
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.embedded_memory_bank_config("patchcore")
    config.report.title = "PatchCore, quickstart config"
    return config
