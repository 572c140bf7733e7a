"""ReContrast on ISIC2018 Task 3 (skin lesions; NV normal), paper protocol.

Training: the NV images of the Task 3 training set (6705); test: the Task 3
validation set (193). wide_resnet50_2 (IMAGENET1K_V1), Resize 256 then
CenterCrop **224**, batch 32, 2000 iterations, encoder BatchNorm in train mode,
image score = **mean** of the map. Root: the prepared `train/NORMAL`,
`test/{NORMAL,ABNORMAL}` folder:

  python -m recontrast_jax.main --config configs/isic2018.py \
      --config.data.root=/data/ISIC2018 --workdir runs/isic2018

Expected (authors' log): AUROC 90.15, F1 81.12, accuracy 86.01.
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.medical_config("isic2018")
    config.data.tfds_name = "isic2018"
    config.data.crop_size = 224
    config.train.steps = 2000
    config.eval.score_rule = "mean"
    config.report.title = "ReContrast on ISIC2018"
    return config
