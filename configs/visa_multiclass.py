"""Multi-class (unified) ReContrast on VisA: one model for all 12 objects.

The authors' `recontrast_visa_multiclass.py`, the settings of
configs/mvtec_multiclass.py (spec recontrast.md sections 3.3 and 4.3) on the
official 1cls split (`VisA_pytorch/1cls`, or `--config.data.source=tfds` with
the `visa` builder): T = 5000 at batch 16, GELU decoder, encoder BatchNorm in
eval mode, AdamW eps 1e-10 with PyTorch's AMSGrad, MultiStepLR x0.2 at 4000,
mean of the six maps with the 5x5 Gaussian conv, top-1% mean image score.

  python -m recontrast_jax.main --config configs/visa_multiclass.py \
      --config.data.root=/data/VisA_pytorch/1cls --workdir runs/visa_multiclass

No published number (no logs in the authors' repository, spec section 5).
"""

from recontrast_jax import default_config


def get_config():
    config = default_config.visa_config("all")
    config.model.arch = "wide_resnet50_2"
    default_config.use_multiclass_protocol(config)
    config.report.title = "Multi-class ReContrast on VisA (1cls)"
    return config
