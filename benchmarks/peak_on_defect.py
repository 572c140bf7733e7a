"""Where a trained run's anomaly maps peak: on the defect, or elsewhere?

For every anomalous test image of a run, whether the maximum of its anomaly
map lies on the ground-truth mask (grown by `--slack` pixels in every direction,
a square, since the map is blurred), counted per category and defect type. It restores each
category's model from the workdir and scores its test split once.

Usage:  python benchmarks/peak_on_defect.py configs/quickstart.py runs/quickstart

Prints a markdown table; asserts nothing.
"""

import argparse
import collections

import numpy as np
import scipy.ndimage
from method_comparison import load_config

from recontrast_jax import evaluate, parallel, run
from recontrast_jax.data import sources
from recontrast_jax.methods import lookup


def peak_hits(result: evaluate.SplitResult, names, slack: int) -> dict[str, list]:
    """Per defect type, one bool per anomalous image: does the map peak on it?"""
    hits = collections.defaultdict(list)
    for image_map, mask, label, name in zip(
        result.maps, result.masks, result.labels, names, strict=True
    ):
        if not label:
            continue
        region = scipy.ndimage.maximum_filter(mask, size=2 * slack + 1) > 0.5
        row, col = np.unravel_index(np.argmax(image_map), image_map.shape)
        hits[name.split("/")[0]].append(bool(region[row, col]))
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("workdir")
    parser.add_argument("--slack", type=int, default=4)
    args = parser.parse_args()
    config = load_config(args.config)
    mesh = parallel.make_mesh()
    method = lookup.get(config.method)
    predict_fn = method.compile_predict(config, mesh)
    print("| category | defect | map peaks on the defect |")
    print("|---|---|---:|")
    for category in sources.category_names(config):
        files = sources.category_files(config, category)
        model = method.restore(config, args.workdir, category, mesh)
        result = evaluate.evaluate_split(predict_fn, model, files.test, config, mesh)
        for defect, hits in sorted(
            peak_hits(result, run.test_names(files), args.slack).items()
        ):
            print(f"| {category} | {defect} | {sum(hits)} of {len(hits)} |")


if __name__ == "__main__":
    main()
