"""ReContrast on MVTec AD with the paper's protocol (spec section 3.1).

wide_resnet50_2 encoder, Resize/crop 256, batch 16, 2000 iterations per category,
AdamW 2e-3 (bottleneck + decoder) / 1e-5 (encoder), weight decay 1e-5, alpha
warm-up over the first 10% of iterations, evaluation every 250 iterations and the
last evaluation reported; encoder BatchNorm in eval mode for toothbrush, leather,
grid, tile, wood and screw, in train mode elsewhere. Image score = max of the
blurred map. The argument is a category name or `all`:

  python -m recontrast_jax.main --config configs/mvtec.py:bottle \
      --config.data.root=/path/to/mvtec_anomaly_detection --workdir runs/mvtec_bottle
  python -m recontrast_jax.main --config configs/mvtec.py:all \
      --config.data.root=/path/to/mvtec_anomaly_detection --workdir runs/mvtec

The encoder starts from the torchvision IMAGENET1K_V1 wide_resnet50_2 weights
(`config.model.pretrained='imagenet'`, downloaded once from the Hugging Face Hub;
offline, point the field at the downloaded file).

Expected (the authors' final-iteration logs, mean of 15 categories): image
AUROC 99.45, pixel AUROC 98.37, per-image AUPRO (`aupro_recontrast_per_image`)
95.20; e.g. bottle 100 / 98.99 / 97.09.
"""

from recontrast_jax import default_config


def get_config(category: str = "all"):
    config = default_config.mvtec_config(category)
    config.model.arch = "wide_resnet50_2"
    config.model.encoder_bn_train = True
    config.model.encoder_bn_eval_categories = default_config.MVTEC_ENCODER_BN_EVAL
    config.train.steps = 2000
    config.train.batch_size = 16
    config.eval.every = 250
    config.report.title = "ReContrast on MVTec AD"
    return config
