"""`config_checks.validate`: each bad value is named before any work starts."""

import re

import pytest

from recontrast_jax import config_checks, default_config


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("method", "padim", "config.method='padim' is not one of"),
        ("data.resize", "stretch", "config.data.resize='stretch'"),
        ("data.mask_rule", "half", "config.data.mask_rule='half'"),
        ("model.arch", "vgg16", "config.model.arch='vgg16'"),
        ("eval.map_rule", "median", "config.eval.map_rule='median'"),
        ("patchcore.distance", "cosine", "config.patchcore.distance='cosine'"),
        ("train.steps", 0, "config.train.steps=0 must be >= 1"),
        ("data.holdout_fraction", 1.0, "holdout_fraction=1.0 must be in [0, 1)"),
        ("eval.max_ratio", 2.0, "config.eval.max_ratio=2.0 must be in [0, 1]"),
        ("eval.border", 128, "config.eval.border=128 must be in [0, 128)"),
        ("eval.border", -1, "config.eval.border=-1 must be in [0, 128)"),
    ],
)
def test_bad_value_is_named(field, value, expected):
    config = default_config.get_config()
    group, _, key = field.rpartition(".")
    (config[group] if group else config)[key] = value
    with pytest.raises(config_checks.ConfigError, match=re.escape(expected)):
        config_checks.validate(config)


def test_crop_larger_than_the_resize_is_named():
    config = default_config.get_config()
    config.data.image_size, config.data.crop_size = 64, 96
    with pytest.raises(config_checks.ConfigError, match="crop_size=96 is larger"):
        config_checks.validate(config)


def test_the_defaults_are_valid():
    config_checks.validate(default_config.get_config())
