"""ReContrast one-class CIFAR-10: each class in turn normal, image AUROC.

The standard one-class protocol (the authors' code has no CIFAR-10 script,
spec recontrast.md section 3.1): train on the 5,000 training images of one
class, test on all 10,000 test images with that class normal and the other
nine anomalous, image AUROC per class and the mean over the 10 classes. The
data is TFDS's `cifar10` through the `cifar10_one_class/<class>` builder
(downloaded and prepared by TFDS on first use). The argument is a class name
or `all`:

  python -m recontrast_jax.main --config configs/cifar10.py:all --workdir runs/cifar10
  python -m recontrast_jax.main --config configs/cifar10.py:cat --workdir runs/cifar10_cat

Assumed (no source states them): the MVTec script's training (wide_resnet50_2
from IMAGENET1K_V1, the 32 px images resized to 256, batch 16, T = 2000, the
encoder's BatchNorm in train mode, alpha warm-up over 0.1 T), image score =
max of the blurred map, no held-out images (the thresholds come from the
training images and say so).

Expected: mean image AUROC 84.1, the CIFAR-10 figure of the results
aggregators (no log or code of the authors backs it).
"""

from recontrast_jax import default_config
from recontrast_jax.data import categories


def get_config(normal_class: str = "all"):
    classes = categories.CIFAR10_CLASSES
    if normal_class != "all" and normal_class not in classes:
        raise ValueError(
            f"Unknown CIFAR-10 class {normal_class!r}; use one of {classes} or 'all'."
        )
    config = default_config.get_config()
    config.data.source = "tfds"
    config.data.tfds_name = "cifar10_one_class"
    config.data.categories = classes if normal_class == "all" else (normal_class,)
    config.data.holdout_fraction = 0.0
    config.model.arch = "wide_resnet50_2"
    config.model.pretrained = "imagenet"
    config.train.steps = 2000
    config.train.batch_size = 16
    config.eval.every = 250
    config.eval.pixel_metrics = False  # image labels only
    config.report.title = "ReContrast on one-class CIFAR-10"
    return config
