"""Every method exposes the same surface, and `config.method` picks it in one place."""

import inspect

import pytest

from recontrast_jax import default_config, run
from recontrast_jax.methods import lookup

SURFACE = {
    "fit": ["config", "workdir", "category", "train_samples", "mesh", "writer"],
    "restore": ["config", "workdir", "category", "mesh"],
    "compile_predict": ["config", "mesh"],
    "configured_predict": ["config"],
    "host_model": [],
    "model_step": [],
}


@pytest.mark.parametrize("name", sorted(lookup.METHODS))
def test_each_method_has_the_surface(name):
    module = lookup.get(name)
    for function, leading in SURFACE.items():
        parameters = list(inspect.signature(getattr(module, function)).parameters)
        assert parameters[: len(leading)] == leading, (name, function, parameters)


def test_the_three_methods_are_registered():
    assert sorted(lookup.METHODS) == ["patchcore", "reconpatch", "recontrast"]
    assert lookup.get("reconpatch").fit is not lookup.get("patchcore").fit


def test_an_unknown_method_fails_before_any_work(tmp_path):
    config = default_config.get_config()
    config.method = "padim"
    with pytest.raises(ValueError, match="'padim'.*patchcore"):
        run.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
