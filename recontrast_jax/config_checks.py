"""Checks a run config before any work, so that a bad value fails in one line.

`default_config.py` declares the fields; this module knows what each may hold
(it imports the modules that define the choices, which the config files must
not).
"""

from __future__ import annotations

import ml_collections

from recontrast_jax import anomaly_maps, default_config, export_format, thresholds
from recontrast_jax.data import sources
from recontrast_jax.methods import lookup, patchcore
from recontrast_jax.models import backbones, de_resnet


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the config before any work, so a bad value fails in one line.

    Raises:
      ConfigError: naming the first field that is wrong and what it may be.
    """
    choices = {
        "method": tuple(lookup.METHODS),
        "mode": default_config.MODES,
        "data.source": sources.SOURCES,
        "data.resize": default_config.RESIZE_MODES,
        "data.mask_rule": default_config.MASK_RULES,
        "model.arch": tuple(backbones.known_archs()),
        "model.decoder_activation": tuple(de_resnet.ACTIVATIONS),
        "eval.score_rule": anomaly_maps.SCORE_RULES,
        "eval.map_rule": anomaly_maps.MAP_RULES,
        "patchcore.distance": patchcore.DISTANCES,
        "threshold.rule": thresholds.RULES,
        "predict.runtime": export_format.RUNTIMES,
        "predict.precision": export_format.PRECISIONS,
    }
    for field, allowed in choices.items():
        if _field(config, field) not in allowed:
            raise ConfigError(
                f"config.{field}={_field(config, field)!r} is not one of "
                f"{', '.join(map(str, allowed))}"
            )
    for field in ("data.image_size", "data.crop_size", "train.steps",
                  "train.batch_size", "eval.batch_size", "eval.every"):  # fmt: skip
        if int(_field(config, field)) < 1:
            raise ConfigError(f"config.{field}={_field(config, field)} must be >= 1")
    if config.data.crop_size > config.data.image_size:
        raise ConfigError(
            f"config.data.crop_size={config.data.crop_size} is larger than "
            f"config.data.image_size={config.data.image_size}: the centre crop is "
            "cut from the resized image; lower the crop or raise the size"
        )
    if not 0.0 <= config.data.holdout_fraction < 1.0:
        raise ConfigError(
            f"config.data.holdout_fraction={config.data.holdout_fraction} must be "
            "in [0, 1)"
        )
    side = config.data.crop_size
    if not 0 <= config.eval.border < side // 2:
        raise ConfigError(
            f"config.eval.border={config.eval.border} must be in [0, {side // 2}) "
            f"for config.data.crop_size={side}"
        )
    if not 0.0 <= config.eval.max_ratio <= 1.0:
        raise ConfigError(
            f"config.eval.max_ratio={config.eval.max_ratio} must be in [0, 1]"
        )


def _field(config: ml_collections.ConfigDict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value
