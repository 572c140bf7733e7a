"""Every config loads, states its command and what it should give; CIFAR-10 runs.

The one-class CIFAR-10 config runs end to end on TFDS's mock data (random
images in the real `cifar10` format, no download) with a tiny model.
"""

import ast
import glob
import importlib.util
import json
import os

import pytest
import tensorflow_datasets as tfds

from recontrast_jax import run

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
PATHS = sorted(glob.glob(os.path.join(CONFIGS, "*.py")))
OUTCOME_WORDS = ("Expected", "Paper", "Should reproduce", "No published number")


def load(path, *args):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def docstring(path):
    with open(path, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read()))


@pytest.mark.parametrize("path", PATHS, ids=os.path.basename)
def test_config_loads_and_states_its_command(path):
    config = load(path)
    assert config.method in ("recontrast", "patchcore", "reconpatch")
    command = f"python -m recontrast_jax.main --config configs/{os.path.basename(path)}"
    assert command in docstring(path)


@pytest.mark.parametrize(
    "path", [p for p in PATHS if "quickstart" not in p], ids=os.path.basename
)
def test_paper_config_says_what_it_should_give(path):
    assert any(word in docstring(path) for word in OUTCOME_WORDS)


def test_cifar10_config_rejects_unknown_classes():
    with pytest.raises(ValueError, match="kitten"):
        load(os.path.join(CONFIGS, "cifar10.py"), "kitten")


def test_cifar10_one_class_runs_end_to_end_on_mock_data(tmp_path):
    config = load(os.path.join(CONFIGS, "cifar10.py"), "cat")
    assert config.data.categories == ("cat",)
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    config.data.image_size = config.data.crop_size = 32
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.train.steps = 3
    config.train.batch_size = 4
    config.eval.every = 3
    config.eval.batch_size = 4
    config.checkpoint.every = 3
    config.report.num_heatmaps = 0
    workdir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=12, data_dir=config.data.tfds_data_dir):
        run.run(config, str(workdir))
    with open(workdir / "metrics.json") as f:
        metrics = json.load(f)["categories"]["cat"]
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert "pixel_auroc" not in metrics
    assert metrics["steps"] == 3.0
