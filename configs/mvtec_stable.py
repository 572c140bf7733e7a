"""Stable ReContrast on MVTec AD: PartialNorm and optimiser restarts (per category).

The authors' `recontrast_mvtec_stable.py` (spec recontrast.md section 3.4):
wide_resnet50_2 (torchvision IMAGENET1K_V1), Resize/crop 256, batch 16 with
`drop_last`, T = 2000, the trainable encoder built with PartialNorm (variance
threshold 5e-4, floors from the pretrained running variance, eps 1e-6; E_f and
the bottleneck keep BatchNorm) and always in train mode, two AdamW groups with
eps 1e-10, the bottleneck + decoder optimiser's state emptied every 500
iterations and the encoder's update paused for the 100 that follow, alpha
warm-up over 0.2 T, an evaluation every 500 iterations (the last reported),
image score = mean of the top 1% of the map. The argument is a category or
`all`:

  python -m recontrast_jax.main --config configs/mvtec_stable.py:all \
      --config.data.root=/path/to/mvtec_anomaly_detection --workdir runs/mvtec_stable

No published number: the repository has no logs of the stable scripts (spec
section 5).
"""

from recontrast_jax import default_config


def get_config(category: str = "all"):
    config = default_config.mvtec_config(category)
    config.model.arch = "wide_resnet50_2"
    default_config.use_stable_protocol(
        config, steps=2000, encoder_pause=100, max_ratio=0.01
    )
    config.report.title = "Stable ReContrast on MVTec AD"
    return config
