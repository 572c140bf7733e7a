"""PatchCore (the ReConPatch baseline): memory bank of patch features, kNN scores.

No training: the (pretrained) encoder's layer2/layer3 maps become locally aware
patch features (`models/reconpatch.py`), an approximate greedy coreset of the
training patches is the memory bank, and a test patch's score is its Euclidean
distance to the nearest bank entry. Image score = max patch score (optionally
reweighted, Eq. 10); the map is the patch-score grid upsampled bilinearly
(align_corners=False) to the crop size and blurred with a Gaussian of sigma 4.
"""

from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from recontrast_jax import anomaly_maps, evaluate, memory_bank
from recontrast_jax.data import input_pipeline
from recontrast_jax.models import reconpatch, resnet


@functools.partial(jax.jit, static_argnames=("arch", "pretrain_dim", "target_dim"))
def patch_features(variables, images, *, arch: str, pretrain_dim: int, target_dim: int):
    """[B, h2*w2, target_dim] patch features and nothing else (frozen encoder)."""
    _, layer2, layer3 = resnet.ResNetEncoder(arch).apply(variables, images, train=False)
    return reconpatch.patch_features(layer2, layer3, pretrain_dim, target_dim)


def _features(variables, images, config):
    return patch_features(
        variables,
        jnp.asarray(images),
        arch=config.model.arch,
        pretrain_dim=config.patchcore.pretrain_dim,
        target_dim=config.patchcore.target_dim,
    )


def build_memory_bank(variables, train_samples, config, key) -> jax.Array:
    """The coreset of all training patch features: [M, target_dim]."""
    dataset = input_pipeline.eval_dataset(
        train_samples,
        batch_size=config.eval.batch_size,
        image_size=config.data.image_size,
        crop_size=config.data.crop_size,
    )
    features = np.concatenate(
        [
            np.asarray(_features(variables, batch["image"], config))[batch["valid"]]
            for batch in input_pipeline.iterate_numpy(dataset)
        ]
    )
    features = jnp.asarray(features.reshape(-1, config.patchcore.target_dim))
    indices = memory_bank.approximate_greedy_coreset(
        features, config.patchcore.coreset_ratio, key
    )
    return features[indices]


def score_split(variables, bank, samples, config) -> evaluate.SplitResult:
    """Maps, image scores, masks and labels of `samples` against `bank`."""
    crop = config.data.crop_size

    def score_batch(images):
        feats = _features(variables, images, config)
        b, n, d = feats.shape
        side = int(round(n**0.5))
        dist, idx = memory_bank.nearest_neighbors(feats.reshape(-1, d), bank, k=1)
        patch_scores = dist[:, 0].reshape(b, n)
        if config.patchcore.reweight_neighbors > 1:
            scores = memory_bank.reweighted_image_score(
                patch_scores,
                idx[:, 0].reshape(b, n),
                bank,
                feats,
                b=config.patchcore.reweight_neighbors,
            )
        else:
            scores = patch_scores.max(axis=1)
        grid = patch_scores.reshape(b, side, side, 1)
        maps = reconpatch.upsample_unfolded(grid, (crop, crop))[..., 0]
        return anomaly_maps.gaussian_blur(maps, config.eval.sigma), scores

    return evaluate.score_split(score_batch, samples, config)


def encoder_variables(config: ml_collections.ConfigDict, key) -> dict:
    """The frozen encoder: pretrained when configured, else randomly initialised."""
    from recontrast_jax import pretrained

    dummy = jnp.zeros((1, config.data.crop_size, config.data.crop_size, 3), jnp.float32)
    variables = resnet.ResNetEncoder(config.model.arch).init(key, dummy, train=False)
    if config.model.pretrained:
        variables = pretrained.load_encoder_variables(
            config.model.arch, config.model.pretrained, variables
        )
    return jax.tree_util.tree_map(jnp.asarray, variables)


def run_category(
    config: ml_collections.ConfigDict, workdir: str, category: str
) -> dict:
    """Builds the memory bank of `category`, evaluates, writes bank and reports."""
    import os
    import time

    from recontrast_jax import reports, thresholds, train
    from recontrast_jax.data import sources

    start = time.perf_counter()
    files = sources.category_files(config, category)
    train_samples, held_out = thresholds.holdout_split(
        files.train, config.data.holdout_fraction, config.seed
    )
    init_key, coreset_key = jax.random.split(jax.random.key(config.seed))
    variables = encoder_variables(config, init_key)
    bank = build_memory_bank(variables, train_samples, config, coreset_key)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(bank))
    reports.atomic_write_bytes(
        os.path.join(workdir, "memory_bank", f"{category}.npy"), buffer.getvalue()
    )
    bank_seconds = time.perf_counter() - start
    result = score_split(variables, bank, files.test, config)
    metrics = evaluate.compute_metrics(result, config.eval.pixel_metrics)
    normal = score_split(variables, bank, held_out or train_samples, config)
    source = "held-out" if held_out else "training (in-sample)"
    calibration = thresholds.calibration(
        normal, source, result, config.eval.pixel_metrics
    )
    train.write_category_reports(config, workdir, category, files, result, calibration)
    return {
        **metrics,
        "memory_bank_size": float(bank.shape[0]),
        "train_seconds": round(bank_seconds, 2),
    }
