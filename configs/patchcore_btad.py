"""PatchCore on BTAD, as PatchCore's reference code runs (the Table 7 baseline).

wide_resnet50_2 (torchvision IMAGENET1K_V1), layer2 + layer3 patch features,
Resize(256) with the aspect kept then CenterCrop(224), PatchCore.load()'s
BatchNorm statistics forward, squared L2 distances (faiss IndexFlatL2), masks
counted where exactly 1, image score = max, maps blurred with sigma 4
(configs/patchcore_mvtec.py on BTAD's layout). The argument is a product
(`01`, `02`, `03`) or `all`:

  python -m recontrast_jax.main --config configs/patchcore_btad.py:all \
      --config.data.root=/data/BTech_Dataset_transformed --workdir runs/patchcore_btad

Should reproduce the PatchCore column that ReConPatch's Table 7 cites (image /
pixel AUROC): 01 98.0 / 96.9, 02 81.6 / 95.8, 03 99.8 / 99.1, mean
93.1 / 97.3. Assumed: the setting behind that citation is not stated; this is
the reference's WRN-50 IM224 baseline with its 10% coreset.
"""

from recontrast_jax import default_config


def get_config(product: str = "all"):
    config = default_config.btad_config(product)
    config.method = "patchcore"
    config.model.arch = "wide_resnet50_2"
    config.data.image_size = 256
    config.data.crop_size = 224
    config.patchcore.distance = "squared"
    config.patchcore.coreset_ratio = 0.1
    config.report.title = "PatchCore on BTAD"
    return config
