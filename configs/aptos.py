"""ReContrast on APTOS 2019 (diabetic retinopathy screening), paper protocol.

1000 grade-0 training images (Python `random.seed(1)` shuffle), 2662 test
images, fundus-cropped to 512x512; wide_resnet50_2 (IMAGENET1K_V1), Resize/crop
256, batch 32, 1000 iterations, encoder BatchNorm in train mode, score = max.
Root: the prepared `train/NORMAL`, `test/{NORMAL,ABNORMAL}` folder:

  python -m recontrast_jax.main --config configs/aptos.py \
      --config.data.root=/data/APTOS --workdir runs/aptos

or from the Kaggle download through the TFDS builder:

  python -m recontrast_jax.main --config configs/aptos.py --config.data.source=tfds \
      --config.data.tfds_manual_dir=/data/aptos2019 --workdir runs/aptos

Expected (authors' log): AUROC 97.51, F1 95.27, accuracy 93.35 (F1/accuracy at
the F1-optimal threshold chosen on the test set, as the reference does).
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.medical_config("aptos")
    config.data.tfds_name = "aptos2019"
    config.report.title = "ReContrast on APTOS 2019"
    return config
