"""A quickstart config over several seeds: per-category mean and spread.

One training run tells little on 2 CPU cores (a category can move by points
between two hosts), so the README reports each quickstart as the mean and the
spread (max - min) over seeds. Each seed runs in its own workdir under --root
(an existing `metrics.json` is reused, so an interrupted sweep continues).

Usage:
  python benchmarks/seed_spread.py configs/quickstart.py --seeds 0 1 2 \
      [--root runs/seeds] [--override train.steps=100 ...]

Prints a markdown table (percent) and the wall time of each run; asserts nothing.
"""

import argparse
import json
import os
import time

import numpy as np
from method_comparison import load_config

from recontrast_jax import run

METRICS = ("image_auroc", "pixel_auroc", "anomalous_flagged", "normal_flagged")


def apply_overrides(config, overrides: list[str]):
    """`field.sub=value` strings, parsed as the field's current type."""
    for item in overrides:
        path, value = item.split("=", 1)
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = type(node[leaf])(value)
    return config


def run_seed(config_path: str, seed: int, root: str, overrides: list[str]) -> dict:
    """The run's metrics.json (training it first unless it exists), and its time."""
    workdir = os.path.join(root, f"seed_{seed}")
    metrics_file = os.path.join(workdir, "metrics.json")
    seconds = None
    if not os.path.exists(metrics_file):
        config = apply_overrides(load_config(config_path), overrides)
        config.seed = seed
        start = time.perf_counter()
        run.run(config, workdir)
        seconds = time.perf_counter() - start
    with open(metrics_file) as f:
        return {"summary": json.load(f), "seconds": seconds}


def spread_table(summaries: list[dict]) -> list[str]:
    """Markdown rows: per category and for the mean, `mean (spread)` per metric."""
    rows = ["| category | " + " | ".join(METRICS) + " |"]
    rows.append("|---" * (len(METRICS) + 1) + "|")
    categories = list(summaries[0]["categories"]) + ["mean"]
    for category in categories:
        cells = []
        for metric in METRICS:
            values = 100 * np.array(
                [
                    s["mean"][metric]
                    if category == "mean"
                    else s["categories"][category][metric]
                    for s in summaries
                ]
            )
            cells.append(f"{values.mean():.2f} ({np.ptp(values):.2f})")
        rows.append(f"| {category} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="runs/seeds")
    parser.add_argument("--override", nargs="*", default=[])
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        result = run_seed(args.config, seed, args.root, args.override)
        results.append(result)
        took = "reused" if result["seconds"] is None else f"{result['seconds']:.0f} s"
        mean = result["summary"]["mean"]
        print(
            f"seed {seed}: image AUROC {100 * mean['image_auroc']:.2f}, pixel AUROC "
            f"{100 * mean['pixel_auroc']:.2f} ({took})",
            flush=True,
        )
    print(f"\n{args.config}, seeds {args.seeds}: mean (spread = max - min), %")
    print("\n".join(spread_table([r["summary"] for r in results])))


if __name__ == "__main__":
    main()
