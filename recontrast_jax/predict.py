"""Score a folder of images with a trained model: CSV, overlays, gallery.

`python -m recontrast_jax.main --config C --workdir W --config.mode=predict
--config.predict.input=DIR` restores the category's checkpoint, preprocesses
every image under DIR (recursively, any format PIL reads) like the test images,
and writes to `<workdir>/predictions/<category>/`:
  - `predictions.csv`: path, score, normalized_score (threshold -> 0.5),
    decision (1 = anomalous), anomalous_pixel_fraction (map >= pixel threshold);
  - `summary.json`: the thresholds and the rule that chose them;
  - one image | predicted mask | map | overlay PNG per image, on a fixed colour
    scale (normal pixels blue, the pixel threshold in the middle), and an
    `index.html` gallery, most anomalous first.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from recontrast_jax import evaluate, parallel, reports, run, thresholds
from recontrast_jax.data import folder, sources
from recontrast_jax.methods import lookup


def list_images(directory: str) -> list[str]:
    """Image files under `directory`, recursively, sorted."""
    if not os.path.isdir(directory):
        raise folder.DatasetError(f"predict.input {directory!r} is not a folder")
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        for name in names
        if folder.is_image_file(name)
    )
    if not paths:
        raise folder.DatasetError(f"no images under {directory}")
    return paths


def predict_category(
    config: ml_collections.ConfigDict, workdir: str, category: str
) -> str:
    """Scores `config.predict.input` with the model of `category`; returns the output dir."""
    paths = list_images(config.predict.input)
    samples = [folder.Sample(p, None, 0, "unknown") for p in paths]
    result = score_samples(config, workdir, category, samples)
    calibration = (
        {} if config.threshold.rule == "fixed" else thresholds.load(workdir, category)
    )
    chosen = thresholds.choose(calibration, config.threshold)
    output = config.predict.output or os.path.join(workdir, "predictions", category)
    rows = prediction_rows(paths, config.predict.input, result, chosen)
    if jax.process_index() == 0:
        reports.write_predictions(
            output, category, rows, result, chosen, calibration,
            config.predict.num_heatmaps,
        )  # fmt: skip
    return output


def score_samples(config, workdir: str, category: str, samples) -> evaluate.SplitResult:
    """Scores `samples` with the category's saved model (any method)."""
    mesh = parallel.make_mesh()
    method = lookup.get(config.method)
    model = method.restore(config, workdir, run.model_name(config, category), mesh)
    predict_fn = method.compile_predict(config, mesh)
    return evaluate.evaluate_split(predict_fn, model, samples, config, mesh)


def prediction_rows(paths, root, result, chosen) -> list[dict]:
    normalized = thresholds.normalize(result.scores, chosen["image"])
    return [
        {
            "path": os.path.relpath(path, root),
            "score": float(score),
            "normalized_score": float(norm),
            "decision": int(score >= chosen["image"]),
            "anomalous_pixel_fraction": float(np.mean(amap >= chosen["pixel"])),
        }
        for path, score, norm, amap in zip(
            paths, result.scores, normalized, result.maps, strict=True
        )
    ]


def predict(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Predict mode: every configured category's model scores the input folder."""
    if not config.predict.input:
        raise folder.DatasetError("set --config.predict.input to a folder of images")
    outputs = []
    for category in sources.category_names(config):
        outputs.append(predict_category(config, workdir, category))
        if jax.process_index() == 0:
            print(f"{category}: {outputs[-1]}/predictions.csv")
    return outputs
