"""PatchCore on MVTec AD (the ReConPatch baseline), as PatchCore's reference code runs.

wide_resnet50_2 (torchvision IMAGENET1K_V1), layer2 + layer3 patch features
(3x3 neighbourhoods, 1024-d), torchvision Resize(256) (shorter side, aspect
kept) then CenterCrop(224), the BatchNorm statistics moved by PatchCore.load()'s
all-ones forward, a 10% approximate greedy coreset (the reference's WRN-50
IM224 baseline setting), squared L2 nearest-neighbour distances (faiss
IndexFlatL2), image score = max, maps upsampled and blurred with sigma 4, and
masks counted only where exactly 1 after resizing (spec reconpatch.md section 1;
`tests/patchcore_reference_test.py` checks these against a torch transcription).
No training.

  python -m recontrast_jax.main --config configs/patchcore_mvtec.py:bottle \
      --config.data.root=/data/mvtec_anomaly_detection --workdir runs/patchcore_bottle

Should reproduce the PatchCore column that ReConPatch's Table 5 cites (WRN-50,
224): image AUROC 99.1, pixel AUROC 98.1 (mean of 15 classes).
`--config.patchcore.coreset_ratio=0.01` is PatchCore's 1% setting.
"""

from recontrast_jax import default_config


def get_config(category: str = "all"):
    config = default_config.mvtec_config(category)
    config.method = "patchcore"
    config.data.image_size = 256
    config.data.crop_size = 224
    config.model.arch = "wide_resnet50_2"
    default_config.use_patchcore_reference_pipeline(config)
    config.patchcore.distance = "squared"
    config.patchcore.coreset_ratio = 0.1
    config.report.title = "PatchCore on MVTec AD"
    return config
