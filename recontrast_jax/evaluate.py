"""Evaluation: a method's jitted predict over a split, metrics on the host.

`evaluate_split` runs any method's `predict_fn(model, images) -> (maps,
scores)` (see `methods/`) over a finite, padded pipeline on one or many
processes, keeps the valid rows in order, and `compute_metrics` computes the
metrics in numpy float64.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from recontrast_jax import console, metrics, parallel
from recontrast_jax.data import input_pipeline


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
    predict_fn, model, samples, config: ml_collections.ConfigDict, mesh, desc=None
) -> SplitResult:
    """Runs `predict_fn(model, images)` over every sample exactly once.

    `model` is a method's model, replicated over the mesh (any number of
    processes); `desc` names a progress bar (none without it).
    """

    def score_batch(local_images):
        return predict_fn(
            model, parallel.global_batch(mesh, {"image": local_images})["image"]
        )

    return score_split(score_batch, samples, config, mesh, desc)


def score_split(
    score_batch, samples, config: ml_collections.ConfigDict, mesh, desc=None
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
      desc: names the progress bar; None shows none.

    Returns:
      Maps and scores with masks, labels and the de-normalised images; padding
      rows are dropped.
    """
    dataset = input_pipeline.eval_dataset(
        samples,
        batch_size=config.eval.batch_size,
        **input_pipeline.eval_transform(config.data),
    )
    parts = {k: [] for k in ("maps", "scores", "masks", "labels", "images")}
    bar = console.progress_bar(
        len(samples), desc or "", "img", leave=False, disable=desc is None
    )
    compiling = console.FirstCallNote(bar, "the first batch compiles")
    for batch in input_pipeline.iterate_numpy(dataset):
        maps, scores = score_batch(parallel.process_part(mesh, batch["image"]))
        valid = batch["valid"]
        compiling.done()
        bar.update(int(np.sum(valid)))
        rows = len(valid)  # rows past it pad the batch to the mesh size
        parts["maps"].append(parallel.to_host(maps)[:rows][valid])
        parts["scores"].append(parallel.to_host(scores)[:rows][valid])
        parts["masks"].append(batch["mask"][valid])
        parts["labels"].append(batch["label"][valid])
        parts["images"].append(denormalize(batch["image"][valid]))
    bar.close()
    return SplitResult(**{k: np.concatenate(v) for k, v in parts.items()})


def compute_metrics(result: SplitResult, has_masks: bool) -> dict[str, float]:
    """Segmentation metrics when pixel masks exist, else image-level metrics."""
    if has_masks:
        return metrics.segmentation_metrics(
            result.masks, result.maps, result.scores, result.labels
        )
    return metrics.classification_metrics(result.labels, result.scores)
