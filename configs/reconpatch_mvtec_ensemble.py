"""ReConPatch ensemble on MVTec AD (paper Table 6; spec reconpatch.md §2.5-2.7).

wide_resnet101_2 + resnext101_32x8d + densenet201 (torchvision IMAGENET1K_V1),
layer2/layer3 (DenseNet: denseblock2/denseblock3) patch features, Resize 366 then
CenterCrop 320 (PatchCore's 320 recipe), f: 1024 -> 384 per backbone, 60 epochs,
AdamP lr 1e-6, weight decay 1e-2, 1% coreset per backbone. Each backbone's image
scores and maps are modified-z-scored with the median and MAD of its own scores on
the training images and the three are averaged (the combiner and the map
normalisation are assumed; the paper states only the score normalisation).

  python -m recontrast_jax.main --config configs/reconpatch_mvtec_ensemble.py:bottle \
      --config.data.root=/path/to/mvtec_anomaly_detection --workdir runs/reconpatch_ens

Paper (ensemble, 320 px): image AUROC 99.67, pixel AUROC 98.36; at 480 px
(`--config.data.image_size=480 --config.data.crop_size=480`, resize recipe not
stated): 99.72 / 98.67.

Assumed, as for configs/reconpatch_mvtec.py: PatchCore's reference data and
feature rules (Resize(366) with the aspect kept, exact-1 masks, the BatchNorm
statistics forward of every backbone) and the paper's Euclidean distance.
"""

from recontrast_jax import default_config

ENSEMBLE = ("wide_resnet101_2", "resnext101_32x8d", "densenet201")


def get_config(category: str = "all"):
    config = default_config.mvtec_config(category)
    config.method = "reconpatch"
    config.data.image_size = 366
    config.data.crop_size = 320
    config.patchcore.ensemble = ENSEMBLE
    default_config.use_patchcore_reference_pipeline(config)
    config.patchcore.coreset_ratio = 0.01
    config.reconpatch.feature_dim = 384
    config.reconpatch.epochs = 60
    config.reconpatch.lr = 1e-6
    config.reconpatch.weight_decay = 1e-2
    config.checkpoint.every = 2000
    config.report.title = "ReConPatch ensemble on MVTec AD"
    return config
