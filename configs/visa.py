"""ReContrast on VisA (official 1cls split) with the paper's protocol.

wide_resnet50_2 (torchvision IMAGENET1K_V1), Resize/crop 256, batch 16, 3000
iterations per object, evaluation every 250 and the last one reported, encoder
BatchNorm in eval mode for cashew and pcb1 (train mode elsewhere), score = max.
The root is the prepared `VisA_pytorch/1cls` layout (`<object>/train/good`,
`test/{good,bad}`, `ground_truth/bad/<stem>.png`); the argument is an object or
`all`:

  python -m recontrast_jax.main --config configs/visa.py:all \
      --config.data.root=/data/VisA_pytorch/1cls --workdir runs/visa

or straight from the raw VisA download through the TFDS builder:

  python -m recontrast_jax.main --config configs/visa.py:candle \
      --config.data.source=tfds --config.data.tfds_manual_dir=/data/VisA \
      --workdir runs/visa_candle

Expected (authors' final-iteration logs, mean of 12 objects): image AUROC 97.50,
pixel AUROC 98.21, per-image AUPRO 92.62; e.g. candle 97.20 / 99.15 / 94.77.
"""

from recontrast_jax import default_config


def get_config(category: str = "all"):
    config = default_config.visa_config(category)
    config.model.arch = "wide_resnet50_2"
    config.model.encoder_bn_eval_categories = default_config.VISA_ENCODER_BN_EVAL
    config.train.steps = 3000
    config.train.batch_size = 16
    config.eval.every = 250
    config.report.title = "ReContrast on VisA (1cls)"
    return config
