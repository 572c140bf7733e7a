"""Score a folder of images with a trained model: CSV, overlays, gallery.

`python -m recontrast_jax.main --config C --workdir W --config.mode=predict
--config.predict.input=DIR` restores the category's checkpoint, preprocesses
every image under DIR (recursively, any format PIL reads) like the test images,
and writes to `<workdir>/predictions/<category>/`:
  - `predictions.csv`: path, score, normalized_score (threshold -> 0.5),
    decision (1 = anomalous), anomalous_pixel_fraction (map >= pixel threshold);
  - `summary.json`: the thresholds and the rule that chose them (with a note
    when the calibration set was small), and the images that could not be
    read (`skipped`: path and error; they are left out, not scored);
  - one image | predicted mask | map | overlay PNG per image, on a fixed colour
    scale (normal pixels blue, the pixel threshold in the middle), and an
    `index.html` gallery, most anomalous first.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from recontrast_jax import (
    console,
    evaluate,
    export,
    export_format,
    parallel,
    reports,
    run,
    runtimes,
    thresholds,
)
from recontrast_jax.data import folder, input_pipeline, sources
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


def readable_images(paths: list[str]) -> tuple[list[str], list[dict]]:
    """(the images PIL can decode, {'path', 'error'} of the others).

    Unlike training and evaluation, which stop at a bad dataset image, predict
    scores what it can: a folder of field images may hold a truncated upload.
    """
    good, skipped = [], []
    for path in paths:
        try:
            folder.load_rgb(path)
        except folder.DatasetError as e:
            console.say(f"warning: skipping {e}")
            skipped.append({"path": path, "error": str(e)})
        else:
            good.append(path)
    if not good:
        raise folder.DatasetError(
            f"none of the {len(paths)} images can be read (each is named above)"
        )
    return good, skipped


def predict_category(
    config: ml_collections.ConfigDict, workdir: str, category: str, paths, skipped
) -> str:
    """Scores `paths` with the model of `category`; returns the output dir."""
    samples = [folder.Sample(p, None, 0, "unknown") for p in paths]
    result = score_samples(config, workdir, category, samples)
    chosen, calibration = category_thresholds(config, workdir, category)
    run.say_threshold(category, chosen)
    output = config.predict.output or os.path.join(workdir, "predictions", category)
    rows = prediction_rows(paths, config.predict.input, result, chosen)
    relative = [
        {**s, "path": os.path.relpath(s["path"], config.predict.input)} for s in skipped
    ]
    if jax.process_index() == 0:
        reports.remove_stale_temporaries(output)
        reports.write_predictions(
            output, category, rows, result, chosen, calibration,
            config.predict.num_heatmaps, relative,
        )  # fmt: skip
    flagged = sum(r["decision"] for r in rows)
    console.say(
        f"{category}: {len(rows)} images scored, {flagged} anomalous, "
        f"{len(skipped)} unreadable skipped"
    )
    return output


def category_thresholds(config, workdir: str, category: str) -> tuple[dict, dict]:
    """The chosen thresholds and the calibration they were chosen from.

    On an exported runtime without a calibration in `workdir` (a deploy machine
    that holds only the export directory), the thresholds that export mode
    chose and wrote into the metadata are used, whatever rule is configured now.
    """
    if config.threshold.rule == "fixed":
        return thresholds.choose({}, config.threshold), {}
    try:
        calibration = thresholds.load(workdir, category)
    except FileNotFoundError:
        exported = exported_thresholds(config, workdir, category)
        if exported is None:
            raise
        console.say(
            f"{category}: no calibration in {workdir}; using the thresholds chosen "
            "at export (the --config.threshold settings are not applied)"
        )
        return exported, {}
    return thresholds.choose(calibration, config.threshold), calibration


def exported_thresholds(config, workdir: str, category: str) -> dict | None:
    """The thresholds in the export's metadata, if predict runs an export that has them."""
    path = os.path.join(
        export.export_directory(config, workdir, category), export_format.METADATA_FILE
    )
    if config.predict.runtime == "jax" or not os.path.isfile(path):
        return None
    return export_format.read_metadata(path).get("thresholds")


def score_samples(config, workdir: str, category: str, samples) -> evaluate.SplitResult:
    """Scores `samples` with the category's saved model (any method).

    `predict.runtime` 'jax' runs the checkpoint in process; 'onnxruntime' and
    'openvino' run the category's exported `model.onnx`.
    """
    if config.predict.runtime != "jax":
        model, metadata = runtimes.load(
            export.export_directory(config, workdir, category),
            config.predict.runtime,
            config.predict.precision,
        )
        return score_exported(model, metadata, samples, config.eval.batch_size)
    mesh = parallel.make_mesh()
    method = lookup.get(config.method)
    model = method.restore(config, workdir, run.model_name(config, category), mesh)
    predict_fn = method.compile_predict(config, mesh)
    return evaluate.evaluate_split(predict_fn, model, samples, config, mesh)


def score_exported(
    model, metadata: dict, samples, batch_size: int
) -> evaluate.SplitResult:
    """Scores `samples` with an exported model, fed as its metadata describes."""
    size, crop = metadata["image_size"], metadata["crop_size"]
    top = input_pipeline.center_crop_offsets(size, crop)
    parts = {"maps": [], "scores": [], "images": []}
    for start in range(0, len(samples), batch_size):
        images = np.stack([
            export.preprocess_for_export(
                folder.load_rgb(s.path), size, metadata["resize"], crop
            )
            for s in samples[start : start + batch_size]
        ])  # fmt: skip
        maps, scores = model(images)
        parts["maps"].append(np.asarray(maps, np.float32))
        parts["scores"].append(np.asarray(scores, np.float32))
        parts["images"].append(images[:, top : top + crop, top : top + crop])
    maps = np.concatenate(parts["maps"])
    return evaluate.SplitResult(
        maps=maps,
        scores=np.concatenate(parts["scores"]),
        masks=np.zeros(maps.shape, bool),
        labels=np.zeros(len(maps), np.int64),
        images=np.concatenate(parts["images"]),
    )


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


def runner_description(config: ml_collections.ConfigDict) -> str:
    """'1 CPU device', or the runtime that runs the exported models."""
    if config.predict.runtime == "jax":
        return console.devices_description()
    names = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
    return (
        f"{names[config.predict.runtime]} ({config.predict.precision}, exported models)"
    )


def predict(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Predict mode: every configured category's model scores the input folder."""
    if not config.predict.input:
        raise folder.DatasetError("set --config.predict.input to a folder of images")
    paths, skipped = readable_images(list_images(config.predict.input))
    console.start_run()
    console.say(
        f"{config.method}: predicting {len(paths)} images under "
        f"{config.predict.input} with the models in {workdir} on "
        f"{runner_description(config)}"
    )
    outputs = []
    for category in sources.category_names(config):
        outputs.append(predict_category(config, workdir, category, paths, skipped))
        if jax.process_index() == 0:
            print(f"{category}: {outputs[-1]}/predictions.csv")
    return outputs
