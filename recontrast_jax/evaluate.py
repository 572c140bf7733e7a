"""Evaluation: anomaly maps and scores on device, metrics and reports on the host.

`compile_predict` jits the model + anomaly map + image score into one function
over the device mesh; `evaluate_split` runs it over a finite, padded test
pipeline, keeps the valid rows, and computes the metrics in numpy float64.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from recontrast_jax import anomaly_maps, metrics, parallel, reports
from recontrast_jax.data import input_pipeline
from recontrast_jax.models import layers, recontrast


def predict(
    state,
    images: jax.Array,
    *,
    arch: str,
    sigma: float,
    score_rule: str,
    max_ratio: float,
    dtype: str = "float32",
) -> tuple[jax.Array, jax.Array]:
    """Anomaly maps (B, H, W) and image scores (B,) for normalised images.

    Both reconstruction directions are used: the map is the sum of the six
    cosine-distance maps, upsampled with align_corners and Gaussian-blurred.
    The networks run in `dtype`; the maps are computed in float32.
    """
    compute = layers.compute_dtype(dtype)
    cast = functools.partial(layers.cast_floating, dtype=compute)
    variables = {"params": cast(state.params), "batch_stats": state.batch_stats}
    images_c = images.astype(compute)
    frozen_features = recontrast.frozen_encoder_features(arch, state.frozen, images_c)
    targets, recons = recontrast.ReContrast(arch).apply(
        variables, images_c, frozen_features, train=False, encoder_train=False
    )
    targets, recons = ([x.astype(jnp.float32) for x in m] for m in (targets, recons))
    maps = anomaly_maps.anomaly_map(targets, recons, images.shape[1:3], sigma)
    return maps, anomaly_maps.image_scores(maps, score_rule, max_ratio)


def configured_predict(config: ml_collections.ConfigDict):
    """`predict(state, images)` with the config's static settings bound."""
    return functools.partial(
        predict,
        arch=config.model.arch,
        sigma=float(config.eval.sigma),
        score_rule=config.eval.score_rule,
        max_ratio=float(config.eval.max_ratio),
        dtype=config.model.dtype,
    )


def compile_predict(config: ml_collections.ConfigDict, mesh):
    """Jits `predict` with the config's static settings over the mesh."""
    return jax.jit(
        configured_predict(config),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(parallel.batch_sharding(mesh), parallel.batch_sharding(mesh)),
    )


@dataclasses.dataclass
class SplitResult:
    """Per-image outputs of one evaluation pass, in test-set order."""

    maps: np.ndarray  # (N, H, W) float32 anomaly maps
    scores: np.ndarray  # (N,) image scores
    masks: np.ndarray  # (N, H, W) bool ground truth
    labels: np.ndarray  # (N,) int, 1 if the mask has any anomalous pixel
    images: np.ndarray  # (N, H, W, 3) uint8 preprocessed images (for reports)


def denormalize(images: np.ndarray) -> np.ndarray:
    """Inverts the ImageNet normalisation back to uint8 RGB."""
    mean = np.asarray(input_pipeline.IMAGENET_MEAN, np.float32)
    std = np.asarray(input_pipeline.IMAGENET_STD, np.float32)
    return np.clip(np.rint((images * std + mean) * 255.0), 0, 255).astype(np.uint8)


def evaluate_split(
    predict_fn, state, samples, config: ml_collections.ConfigDict, mesh
) -> SplitResult:
    """Runs `predict_fn` over every test sample exactly once (any number of processes)."""

    def score_batch(local_images):
        return predict_fn(
            state, parallel.global_batch(mesh, {"image": local_images})["image"]
        )

    return score_split(score_batch, samples, config, mesh)


def score_split(
    score_batch, samples, config: ml_collections.ConfigDict, mesh
) -> SplitResult:
    """Every sample once, in order, on one or many processes.

    Every process reads the same batches in the same order, pads each to a
    multiple of the mesh size, and passes only its own rows
    (`parallel.process_part`) to `score_batch(local_images) -> (maps, scores)`,
    which must return global arrays over the padded batch. The outputs are
    gathered so that every process holds the full, ordered maps and scores.

    Args:
      score_batch: scores this process's rows of a padded batch.
      samples: the samples to score (the same list on every process).
      config: reads `eval.batch_size`, `data.image_size`, `data.crop_size`.
      mesh: the data mesh.

    Returns:
      Maps and scores with masks, labels and the de-normalised images; padding
      rows are dropped.
    """
    dataset = input_pipeline.eval_dataset(
        samples,
        batch_size=config.eval.batch_size,
        image_size=config.data.image_size,
        crop_size=config.data.crop_size,
    )
    parts = {k: [] for k in ("maps", "scores", "masks", "labels", "images")}
    for batch in input_pipeline.iterate_numpy(dataset):
        maps, scores = score_batch(parallel.process_part(mesh, batch["image"]))
        valid = batch["valid"]
        rows = len(valid)  # rows past it pad the batch to the mesh size
        parts["maps"].append(parallel.to_host(maps)[:rows][valid])
        parts["scores"].append(parallel.to_host(scores)[:rows][valid])
        parts["masks"].append(batch["mask"][valid])
        parts["labels"].append(batch["label"][valid])
        parts["images"].append(denormalize(batch["image"][valid]))
    return SplitResult(**{k: np.concatenate(v) for k, v in parts.items()})


def compute_metrics(result: SplitResult, has_masks: bool) -> dict[str, float]:
    """Segmentation metrics when pixel masks exist, else image-level metrics."""
    if has_masks:
        return metrics.segmentation_metrics(result.masks, result.maps, result.scores)
    return metrics.classification_metrics(result.labels, result.scores)


def select_heatmap_indices(result: SplitResult, count: int) -> list[int]:
    """The highest-scored anomalous and the highest-scored normal images."""
    order = np.argsort(-result.scores, kind="stable")
    anomalous = [int(i) for i in order if result.labels[i]][
        : max(count - count // 3, 1)
    ]
    normal = [int(i) for i in order if not result.labels[i]][: count // 3]
    return sorted(anomalous + normal)


def write_heatmaps(
    result: SplitResult, directory: str, count: int, names: list[str]
) -> list[dict]:
    """Writes image | ground truth | map | overlay panels for some test images.

    All panels of a category share one colour scale (the test maps' range), so
    normal images do not look hot.

    Returns:
      Gallery entries (see `reports.write_gallery`) of the panels written.
    """
    if count <= 0 or len(result.scores) == 0:
        return []
    vmin, vmax = float(result.maps.min()), float(result.maps.max())
    entries = []
    for i in select_heatmap_indices(result, count):
        panel = reports.heatmap_panel(
            result.images[i],
            result.masks[i],
            result.maps[i],
            float(result.scores[i]),
            vmin,
            vmax,
            title=names[i],
        )
        file_name = os.path.splitext(names[i])[0].replace(os.sep, "_") + ".png"
        reports.save_png(os.path.join(directory, file_name), panel)
        entries.append(
            {
                "image": file_name,
                "name": names[i],
                "score": float(result.scores[i]),
                "label": int(result.labels[i]),
            }
        )
    return entries


def write_report(
    result: SplitResult,
    directory: str,
    entries: list[dict],
    threshold: dict,
    title: str,
) -> None:
    """The score histogram (normal vs anomalous, threshold drawn) and the gallery."""
    labels = result.labels.astype(bool)
    histogram = reports.score_histogram(
        result.scores[~labels],
        result.scores[labels],
        {threshold["rule"].split(" of ")[0]: threshold["image"]},
        title=title,
    )
    reports.save_png(os.path.join(directory, reports.GALLERY_HISTOGRAM), histogram)
    for entry in entries:
        entry["decision"] = int(entry["score"] >= threshold["image"])
    reports.write_gallery(
        directory, entries, title, subtitle=f"threshold: {threshold['rule']}"
    )
