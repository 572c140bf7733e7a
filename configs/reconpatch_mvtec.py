"""ReConPatch on MVTec AD, single model (paper Table 5 right; spec reconpatch.md §2).

wide_resnet50_2 (torchvision IMAGENET1K_V1), layer2 + layer3 patch features with
3x3 neighbourhoods (PatchCore's 1024-d aggregate), Resize(256) then CenterCrop(224),
a linear modulation f: 1024 -> 512 and projection g: 512 -> 128 trained with the
relaxed contrastive loss for 120 epochs per category (AdamP, lr 1e-5, weight decay
1e-2, cosine annealing per epoch), EMA target, 1% approximate greedy coreset of
f(p), Euclidean nearest-neighbour scores, image score = max, maps upsampled and
blurred with sigma 4. The argument is a category name or `all`:

  python -m recontrast_jax.main --config configs/reconpatch_mvtec.py:bottle \
      --config.data.root=/path/to/mvtec_anomaly_detection --workdir runs/reconpatch_bottle

Settings the paper does not state are fields of `config.reconpatch` marked
"assumed" in default_config.py (g dimension 128, EMA 0.999, alpha 0.5, sigma 1 on
L2-normalised projections, k 5, margin 1, batch 1024 patches). Eq. 10
reweighting is off (`--config.patchcore.reweight_neighbors=9` turns it on).

Paper (WRN-50, 224): image AUROC 99.56, pixel AUROC 98.18 (mean of 15 classes).

Assumed (the paper builds on PatchCore's pipeline and does not say more): the
PatchCore reference's data and feature rules, i.e. Resize(256) with the aspect
kept, masks counted where exactly 1, and PatchCore.load()'s BatchNorm
statistics forward (`default_config.use_patchcore_reference_pipeline`); the
distance stays the paper's Euclidean D (Eq. 9), not faiss's squared L2.
"""

from recontrast_jax import default_config


def get_config(category: str = "all"):
    config = default_config.mvtec_config(category)
    config.method = "reconpatch"
    config.data.image_size = 256
    config.data.crop_size = 224
    config.model.arch = "wide_resnet50_2"
    config.patchcore.pretrain_dim = 1024
    config.patchcore.target_dim = 1024
    default_config.use_patchcore_reference_pipeline(config)
    config.patchcore.coreset_ratio = 0.01
    config.reconpatch.feature_dim = 512
    config.reconpatch.epochs = 120
    config.reconpatch.lr = 1e-5
    config.reconpatch.weight_decay = 1e-2
    config.checkpoint.every = 2000
    config.report.title = "ReConPatch on MVTec AD"
    return config
