"""Benchmark scripts: peaks on defects, the gallery picture, the CPU deploy table."""

import importlib.util
import os
import sys

import numpy as np
import pytest
from PIL import Image

from recontrast_jax import evaluate, reports
from recontrast_jax.models import reconpatch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")


def load(name):
    if BENCHMARKS not in sys.path:  # the scripts import each other, as run from there
        sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(BENCHMARKS, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_hits_counts_maxima_on_the_dilated_mask():
    maps = np.zeros((3, 10, 10), np.float32)
    masks = np.zeros((3, 10, 10), np.float32)
    masks[:, 4:6, 4:6] = 1
    maps[0, 5, 5] = 1  # on the mask
    maps[1, 0, 9] = 1  # far off it
    maps[2, 3, 3] = 1  # one pixel off: inside with slack 1
    result = evaluate.SplitResult(
        maps=maps, scores=maps.max((1, 2)), masks=masks,
        labels=np.array([1, 1, 1]), images=np.zeros((3, 10, 10, 3), np.uint8),
    )  # fmt: skip
    names = ["hole/000.png", "hole/001.png", "cut/000.png"]
    hits = load("peak_on_defect").peak_hits(result, names, slack=1)
    assert hits == {"hole": [True, False], "cut": [True]}
    assert load("peak_on_defect").peak_hits(result, names, slack=0)["cut"] == [False]


def test_gallery_picture_takes_the_most_anomalous_cards_in_order(tmp_path):
    for name, colour in (("a.png", 10), ("b.png", 200)):
        Image.new("RGB", (20, 10), (colour,) * 3).save(tmp_path / name)
    entries = [
        {
            "image": "a.png",
            "name": "good/a.png",
            "score": 1.0,
            "label": 0,
            "decision": 1,
        },
        {
            "image": "b.png",
            "name": "hole/b.png",
            "score": 2.0,
            "label": 1,
            "decision": 1,
        },
    ]
    reports.write_gallery(tmp_path, entries, "grass")
    with open(tmp_path / "index.html") as f:
        cards = load("gallery_picture").most_anomalous(f.read(), 2)
    assert cards == [("b.png", False), ("a.png", True)]
    framed = load("gallery_picture").framed(str(tmp_path / "a.png"), True)
    assert framed.shape == (18, 28, 3)
    assert tuple(framed[0, 0]) == (200, 30, 30) and tuple(framed[9, 14]) == (10, 10, 10)


def test_deploy_cpu_torch_patch_features_equal_the_project_ones():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    layer2 = rng.normal(size=(2, 8, 8, 12)).astype(np.float32)
    layer3 = rng.normal(size=(2, 4, 4, 20)).astype(np.float32)
    nchw = [torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in (layer2, layer3)]
    got = load("deploy_cpu").torch_patch_features(*nchw, 40, 24).numpy()
    expected = reconpatch.patch_features(layer2, layer3, 40, 24)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_deploy_cpu_table_reports_failures_and_marks_other_backbones():
    setting = {"arch": "resnet_tiny"}
    timing = {"load_s": 1.0, "first_call_s": 2.0, "images_per_s": 1.0,
              "peak_gib": 1.0, "imports_gib": 0.5, "setting": setting}  # fmt: skip
    results = [
        {"method": "patchcore", "runtime": "torch", "batch": 2, "seconds": 4.0,
         "torch_arch": "resnet18", **timing},
        {"method": "patchcore", "runtime": "jax", "batch": 2, "seconds": 1.0, **timing},
        {"method": "patchcore", "runtime": "openvino", "batch": 2,
         "error": "timed out after 600 s", "setting": setting},
    ]  # fmt: skip
    lines = load("deploy_cpu").table(results)
    assert all(line.count("|") == 11 for line in lines[:5])
    assert "| torch (resnet18) |" in lines[2] and lines[3].endswith("| 4.00* |")
    assert "| timed out after 600 s |" in lines[4] and lines[-1].startswith("* torch")
