"""The figure-making benchmark scripts: peaks on defects and the gallery picture."""

import importlib.util
import os
import sys

import numpy as np
from PIL import Image

from recontrast_jax import evaluate, reports

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
