"""Multi-class (unified) ReContrast on MVTec AD: one model for all 15 categories.

The authors' `recontrast_mvtec_multiclass.py` (spec recontrast.md sections 3.3
and 4.3): wide_resnet50_2 (torchvision IMAGENET1K_V1), Resize/crop 256, one
model trained on the training images of every category together for T = 5000
iterations at batch 16 with `drop_last`, seed 1, every decoder ReLU replaced by
exact-erf GELU, the encoder's BatchNorm in eval mode, AdamW with the two groups
(2e-3 bottleneck + decoder, 1e-5 encoder), weight decay 1e-5, eps 1e-10 and
PyTorch's AMSGrad, MultiStepLR x0.2 at 0.8 T, alpha warm-up over 0.1 T, an
evaluation every 1000 iterations (the last one reported). Evaluation: the mean
of the six cosine maps, a 5x5 zero-padded Gaussian conv (sigma 4), image score
= mean of the top 1% of the map; image and pixel AUROC and AP per category and
their mean (AUPRO is computed too; the script does not report it).

  python -m recontrast_jax.main --config configs/mvtec_multiclass.py \
      --config.data.root=/path/to/mvtec_anomaly_detection --workdir runs/mvtec_multiclass

No published number: the multi-class results of the authors' README have no
logs in their repository (spec section 5).
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.mvtec_config("all")
    config.model.arch = "wide_resnet50_2"
    default_config.use_multiclass_protocol(config)
    config.report.title = "Multi-class ReContrast on MVTec AD"
    return config
