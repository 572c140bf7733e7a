"""Metrics of a trained model on each deployment runtime, against the in-process run.

For every category of a trained workdir: the test split scored in process (the
checkpoint, jitted XLA; the oracle), then by the exported `model.onnx` on ONNX
Runtime, OpenVINO float32 and, where the CPU has AVX-512 BF16 or AMX, OpenVINO
bfloat16. Prints the largest relative difference of maps and scores to the
in-process ones and the image/pixel AUROC of each. Exports first when the
workdir has no `model.onnx`.

  python benchmarks/deploy_auroc.py --config configs/quickstart.py --workdir runs/quickstart

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform

import numpy as np
from method_comparison import load_config

from recontrast_jax import evaluate, export, predict, runtimes
from recontrast_jax.data import sources


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [x.split(":", 1)[1].strip() for x in f if x.startswith("model name")]
    return names[0] if names else platform.machine()


def deploy_runtimes() -> list[tuple[str, str]]:
    chosen = [("onnxruntime", "float32"), ("openvino", "float32")]
    if runtimes.openvino_bfloat16_supported():
        chosen.append(("openvino", "bfloat16"))
    return chosen


def relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def category_rows(config, workdir: str, category: str) -> list[dict]:
    files = sources.category_files(config, category)
    with contextlib.redirect_stderr(io.StringIO()):
        reference = predict.score_samples(config, workdir, category, files.test)
    rows = [row(category, "jax (in process)", reference, reference)]
    directory = config.export.directory or os.path.join(workdir, "export", category)
    for runtime, precision in deploy_runtimes():
        model, metadata = runtimes.load(directory, runtime, precision)
        result = predict.score_exported(
            model, metadata, files.test, config.eval.batch_size
        )
        result = dataclasses.replace(
            result, masks=reference.masks, labels=reference.labels
        )
        rows.append(row(category, f"{runtime} {precision}", result, reference))
    return rows


def row(category: str, runtime: str, result, reference) -> dict:
    metrics = evaluate.compute_metrics(result, True)
    return {
        "category": category,
        "runtime": runtime,
        "image_auroc": 100 * metrics["image_auroc"],
        "pixel_auroc": 100 * metrics["pixel_auroc"],
        "maps_relative_difference": relative(result.maps, reference.maps),
        "scores_relative_difference": relative(result.scores, reference.scores),
    }


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| category | runtime | image AUROC | pixel AUROC | maps: max rel. diff | "
        "scores: max rel. diff |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['category']} | {r['runtime']} | {r['image_auroc']:.2f} | "
            f"{r['pixel_auroc']:.2f} | {r['maps_relative_difference']:.1e} | "
            f"{r['scores_relative_difference']:.1e} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    config = load_config(args.config)
    categories = sources.category_names(config)
    first = config.export.directory or os.path.join(
        args.workdir, "export", categories[0]
    )
    if not os.path.isfile(os.path.join(first, export.ONNX_FILE)):
        with contextlib.redirect_stderr(io.StringIO()):
            export.export_categories(config, args.workdir)
    print(f"host: {cpu_name()}, {os.cpu_count()} CPUs")
    rows = [r for c in categories for r in category_rows(config, args.workdir, c)]
    print("\n".join(table(rows)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
