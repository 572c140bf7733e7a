"""ReContrast vs PatchCore vs ReConPatch on the embedded dataset (quickstart configs).

Trains (or reuses) the three quickstart runs under --root, then restores each
category's model and times a second pass over its test split (the first pass
compiles), so the inference rate excludes compilation but includes the input
pipeline and map post-processing. Training time is the run's own
`train_seconds` (compilation included; for PatchCore it is feature extraction
plus the coreset).

Usage:  python benchmarks/method_comparison.py [--root runs/compare]

Prints a markdown table of the mean metrics and the times; asserts nothing.
"""

import argparse
import importlib.util
import json
import os
import time

import jax

from recontrast_jax import evaluate, parallel, run
from recontrast_jax.data import sources
from recontrast_jax.methods import lookup

CONFIGS = {
    "ReContrast": "configs/quickstart.py",
    "PatchCore": "configs/patchcore_quickstart.py",
    "ReConPatch": "configs/reconpatch_quickstart.py",
}


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("config_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def ensure_trained(config, workdir: str) -> dict:
    metrics_file = os.path.join(workdir, "metrics.json")
    if not os.path.exists(metrics_file):
        run.run(config, workdir)
    with open(metrics_file) as f:
        return json.load(f)


def inference_seconds(config, workdir: str, category: str, mesh) -> tuple[float, int]:
    """Seconds for the second (compiled) pass over the test split, and its size."""
    config = config.copy_and_resolve_references()
    test = sources.category_files(config, category).test
    method = lookup.get(config.method)
    model = method.restore(config, workdir, category, mesh)
    predict_fn = method.compile_predict(config, mesh)
    score = lambda: evaluate.evaluate_split(predict_fn, model, test, config, mesh)  # noqa: E731
    score()
    start = time.perf_counter()
    score()
    return time.perf_counter() - start, len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/compare")
    args = parser.parse_args()
    mesh = parallel.make_mesh()
    print(
        "| method | image AUROC | pixel AUROC | AUPRO | train (all categories) | inference |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, path in CONFIGS.items():
        config = load_config(path)
        workdir = os.path.join(args.root, name.lower())
        summary = ensure_trained(config, workdir)
        mean = summary["mean"]
        train_s = sum(m["train_seconds"] for m in summary["categories"].values())
        seconds, images = 0.0, 0
        for category in sources.category_names(config):
            s, n = inference_seconds(config, workdir, category, mesh)
            seconds, images = seconds + s, images + n
        print(
            f"| {name} | {100 * mean['image_auroc']:.2f} | {100 * mean['pixel_auroc']:.2f} "
            f"| {100 * mean['aupro']:.2f} | {train_s:.0f} s | {images / seconds:.1f} img/s |"
        )
    jax.clear_caches()


if __name__ == "__main__":
    main()
