"""PatchCore on MVTec AD (the ReConPatch baseline), PatchCore reference settings.

wide_resnet50_2 (torchvision IMAGENET1K_V1), layer2 + layer3 patch features
(3x3 neighbourhoods, 1024-d), Resize 256 then CenterCrop 224, approximate greedy
coreset of 1% (`--config.patchcore.coreset_ratio=0.1` for PatchCore's own 10%
single-model setting), Euclidean nearest-neighbour distance, image score = max,
maps upsampled and blurred with sigma 4. No training.

  python -m recontrast_jax.main --config configs/patchcore_mvtec.py:bottle \
      --config.data.root=/data/mvtec_anomaly_detection --workdir runs/patchcore_bottle

Deviation: masks are binarised with `> 0` after resizing (ReContrast's rule); the
PatchCore code counts only pixels that stay exactly 1.
"""

from recontrast_jax import default_config


def get_config(category: str = "all"):
    config = default_config.mvtec_config(category)
    config.method = "patchcore"
    config.data.image_size = 256
    config.data.crop_size = 224
    config.model.arch = "wide_resnet50_2"
    config.report.title = "PatchCore on MVTec AD"
    return config
