"""Decision thresholds from normal data, and scores normalised around them.

At the end of training a held-out slice of the normal training images is scored
(`calibration`); its image scores and a summary of its pixel scores are stored per
category. `choose` turns them into image- and pixel-level thresholds by the
configured rule:

  - 'quantile': the `threshold.quantile` quantile of the normal scores; with
    fewer than 1 / (1 - quantile) of them (100 for 0.99) the empirical quantile
    is their maximum, so the image threshold is that quantile of a normal fit
    instead, and the result carries a `note` saying so;
  - 'mean_std': mean + `threshold.k` * std of the normal scores;
  - 'fixed': `threshold.image_value` / `threshold.pixel_value`;
  - 'f1_optimal_on_test': the F1-optimal threshold on the labelled test set.
    It needs anomalous examples and is tuned on the data it is judged on, so it
    is named as what it is.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import ml_collections
import numpy as np
from absl import logging

from recontrast_jax import metrics, reports

RULES = ("quantile", "mean_std", "fixed", "f1_optimal_on_test")
# Pixel quantiles stored from the held-out maps (a full pixel list would be large).
PIXEL_QUANTILES = tuple(
    np.round(
        np.concatenate([np.linspace(0.5, 0.99, 50), np.linspace(0.991, 0.9999, 90)]), 6
    )
)


def holdout_split(samples, fraction: float, seed: int):
    """Splits normal training samples into (train, held_out), deterministically.

    Every image is either trained on or held out, never both; with fraction 0
    nothing is held out.
    """
    samples = list(samples)
    count = int(round(fraction * len(samples)))
    if fraction > 0 and len(samples) > 1:
        count = min(max(count, 1), len(samples) - 1)
    order = np.random.default_rng(seed).permutation(len(samples))
    held = set(order[:count].tolist())
    train = tuple(s for i, s in enumerate(samples) if i not in held)
    return train, tuple(s for i, s in enumerate(samples) if i in held)


def summarize_normal_scores(
    image_scores: np.ndarray, maps: np.ndarray, source: str
) -> dict:
    """What is stored per category: image scores and pixel-score statistics."""
    pixels = np.asarray(maps, np.float64).ravel()
    return {
        "source": source,
        "image_scores": [float(s) for s in image_scores],
        "pixel_mean": float(pixels.mean()),
        "pixel_std": float(pixels.std()),
        "pixel_quantiles": dict(
            zip(
                map(str, PIXEL_QUANTILES),
                np.quantile(pixels, PIXEL_QUANTILES).tolist(),
                strict=True,
            )
        ),
    }


def f1_optimal_on_test(labels, image_scores, masks=None, maps=None) -> dict:
    """F1-optimal image (and pixel) thresholds on a labelled test set."""
    out = {}
    if 0 < np.sum(labels) < len(labels):
        out["image"] = metrics.f1_max(labels, image_scores)[1]
    if masks is not None and np.any(masks) and not np.all(masks):
        out["pixel"] = metrics.f1_max(np.ravel(masks), np.ravel(maps))[1]
    return out


def calibration(normal_result, source: str, test_result, pixel_metrics: bool) -> dict:
    """What is stored per category: normal scores and the test F1-optimal thresholds.

    Args:
      normal_result: the scored normal images (an `evaluate.SplitResult`).
      source: where they come from, e.g. 'held-out' (shown with the threshold).
      test_result: the scored test set.
      pixel_metrics: whether the test set has pixel masks.
    """
    masks = test_result.masks if pixel_metrics else None
    return {
        "normal": summarize_normal_scores(
            normal_result.scores, normal_result.maps, source
        ),
        "f1_optimal_on_test": f1_optimal_on_test(
            test_result.labels, test_result.scores, masks, test_result.maps
        ),
    }


def calibration_path(workdir: str, category: str) -> str:
    return os.path.join(workdir, "calibration", f"{category}.json")


def save(workdir: str, category: str, calibration: dict) -> None:
    reports.atomic_write_json(calibration_path(workdir, category), calibration)


def load(workdir: str, category: str) -> dict:
    path = calibration_path(workdir, category)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: thresholds are calibrated at the end of training "
            "(train first, or use --config.threshold.rule=fixed)."
        )
    with open(path) as f:
        return json.load(f)


def _pixel_quantile(normal: dict, q: float) -> float:
    stored = np.array([float(k) for k in normal["pixel_quantiles"]])
    values = np.array(list(normal["pixel_quantiles"].values()))
    return float(np.interp(q, stored, values))


def images_for_quantile(q: float) -> int:
    """The fewest scores whose empirical `q` quantile is not just their maximum.

    Below 1 / (1 - q) scores (100 for 0.99) the quantile interpolates between
    the two largest, so it says how large the sample happened to be, not where
    the normal scores end.
    """
    return math.ceil(round(1.0 / (1.0 - q), 6)) if q < 1 else math.inf


def small_set_quantile(scores: np.ndarray, q: float, where: str) -> dict:
    """The `q` quantile of a normal distribution fitted to few scores.

    mean + z_q std (z_q = 2.33 for 0.99), never below the largest score, so
    that no calibration image is flagged; the note says why.
    """
    z = statistics.NormalDist().inv_cdf(q)
    std = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    image = max(float(scores.mean() + z * std), float(scores.max()))
    note = (
        f"{len(scores)} calibration images are too few for an empirical {q} "
        f"quantile (it needs {images_for_quantile(q)}): the image threshold is "
        f"mean + {z:.2f} std of their scores, at least their maximum; hold out "
        "more normal images (data.holdout_fraction) for a sharper threshold"
    )
    return {
        "image": image,
        "rule": f"{q} quantile of a normal fit to the scores of {where}",
        "note": note,
    }


def choose(calibration: dict, cfg: ml_collections.ConfigDict) -> dict:
    """Image and pixel thresholds by the configured rule, with a description.

    Returns:
      {'image': float, 'pixel': float, 'rule': str}, plus 'note' when the
      calibration set is too small for the rule as configured.
    """
    rule = cfg.rule
    normal = calibration.get("normal")
    if rule == "fixed":
        return {
            "image": cfg.image_value,
            "pixel": cfg.pixel_value,
            "rule": "fixed values",
        }
    if rule == "f1_optimal_on_test":
        found = calibration.get("f1_optimal_on_test", {})
        if "image" not in found:
            raise ValueError(
                "No F1-optimal threshold: the test set had no anomalous images."
            )
        return {
            "image": found["image"],
            "pixel": found.get("pixel", float("nan")),
            "rule": "F1-optimal on the labelled test set (tuned on the evaluation data)",
        }
    if normal is None:
        raise ValueError(
            f"Threshold rule {rule!r} needs normal scores, and none were stored."
        )
    scores = np.asarray(normal["image_scores"], np.float64)
    where = f"{len(scores)} {normal['source']} normal images"
    if rule == "quantile":
        pixel = _pixel_quantile(normal, cfg.quantile)
        if len(scores) < images_for_quantile(cfg.quantile):
            return {"pixel": pixel, **small_set_quantile(scores, cfg.quantile, where)}
        return {
            "image": float(np.quantile(scores, cfg.quantile)),
            "pixel": pixel,
            "rule": f"{cfg.quantile} quantile of the scores of {where}",
        }
    if rule == "mean_std":
        std = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
        return {
            "image": float(scores.mean() + cfg.k * std),
            "pixel": normal["pixel_mean"] + cfg.k * normal["pixel_std"],
            "rule": f"mean + {cfg.k} std of the scores of {where}",
        }
    raise ValueError(f"Unknown threshold rule {rule!r}; use one of {RULES}.")


def choose_or_fixed(calibration: dict, cfg: ml_collections.ConfigDict) -> dict:
    """`choose`, falling back to the fixed thresholds when the rule cannot be met."""
    try:
        return choose(calibration, cfg)
    except ValueError as e:
        logging.warning("%s; using the fixed thresholds instead.", e)
        return choose(calibration, ml_collections.ConfigDict(dict(cfg, rule="fixed")))


def normalize(scores, threshold: float):
    """Maps scores so that the threshold becomes 0.5 (0 stays 0), clipped to [0, 1].

    The maps are sums of cosine distances, so scores are non-negative.
    """
    return np.clip(
        0.5 * np.asarray(scores, np.float64) / max(threshold, 1e-12), 0.0, 1.0
    )
