"""ReConPatch on BTAD (paper Table 7; spec reconpatch.md sections 2.7 and 3.3).

wide_resnet101_2 (torchvision IMAGENET1K_V1) at 480 px [R1], layer2 + layer3
patch features (PatchCore's 1024-d aggregate), f: 1024 -> 512 and g -> 128
trained with the relaxed contrastive loss (AdamP lr 1e-5, weight decay 1e-2,
cosine per epoch, 120 epochs per product), EMA target, 1% coreset of f(p),
Euclidean distances, image score = max, maps blurred with sigma 4. The
argument is a product (`01`, `02`, `03`) or `all`; the root holds BTAD's
products (`<product>/train/ok`, `test/ok`, `test/ko`, `ground_truth/ko`):

  python -m recontrast_jax.main --config configs/reconpatch_btad.py:all \
      --config.data.root=/data/BTech_Dataset_transformed --workdir runs/reconpatch_btad

or from the downloaded zip through the TFDS builder:

  python -m recontrast_jax.main --config configs/reconpatch_btad.py:all \
      --config.data.source=tfds --config.data.tfds_manual_dir=/downloads/btad \
      --workdir runs/reconpatch_btad

Paper (Table 7, image / pixel AUROC): 01 99.7 / 96.8, 02 87.7 / 96.6,
03 100 / 99.0, mean 95.8 / 97.5.

Assumed (not stated for BTAD): the resize recipe (Resize(480) with the aspect
kept, CenterCrop(480)), f = 512 and the single-model training of Table 5,
PatchCore's reference data and feature rules
(`default_config.use_patchcore_reference_pipeline`).
"""

from recontrast_jax import default_config


def get_config(product: str = "all"):
    config = default_config.btad_config(product)
    config.method = "reconpatch"
    config.model.arch = "wide_resnet101_2"
    config.data.image_size = 480
    config.data.crop_size = 480
    config.patchcore.coreset_ratio = 0.01
    config.reconpatch.feature_dim = 512
    config.reconpatch.epochs = 120
    config.reconpatch.lr = 1e-5
    config.reconpatch.weight_decay = 1e-2
    config.checkpoint.every = 2000
    config.report.title = "ReConPatch on BTAD"
    return config
