"""Memory-bank methods: PatchCore (the baseline) and ReConPatch.

Both turn the frozen encoder's layer2/layer3 maps into locally aware patch
features (`models/reconpatch.py`, spec reconpatch.md section 1.3). PatchCore
keeps an approximate greedy coreset of the training patches as its memory bank;
ReConPatch first trains a linear modulation f of the features
(`methods/reconpatch.py`) and keeps a coreset of f(p). A test patch's score is
its Euclidean distance to the nearest bank entry (or the squared distance, as
PatchCore's reference code computes it); the image score is the max
patch score (optionally reweighted, Eq. 10); the map is the patch-score grid
upsampled bilinearly (align_corners=False) to the crop size and blurred with a
Gaussian of sigma 4.

A fitted model is a dict of arrays, checkpointed with Orbax like ReContrast's
states: `{'encoder': variables, 'head': {'f','g'} or {}, 'bank': [M, d],
'normalization': [4]}`. With an ensemble (`patchcore.ensemble`), each backbone
is one such model; `normalization` holds the median and MAD of its image scores
and map pixels on the training images, used for the modified z-score
`(s - median) / (1.4826 * MAD)` before the models are averaged.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from recontrast_jax import (
    anomaly_maps,
    checkpointing,
    console,
    evaluate,
    parallel,
    pretrained,
)
from recontrast_jax.data import input_pipeline
from recontrast_jax.methods import memory_bank
from recontrast_jax.models import backbones, reconpatch

DISTANCES = ("euclidean", "squared")  # patchcore.distance
MAD_SCALE = 1.4826  # makes the MAD a consistent estimate of a normal's std
IDENTITY_NORMALIZATION = (0.0, 1.0, 0.0, 1.0)  # image median, MAD; pixel median, MAD


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """Static settings of one model's feature extractor and scorer (hashable)."""

    arch: str
    pretrain_dim: int
    target_dim: int
    reweight_neighbors: int = 1
    reweight_per_patch: bool = False
    knn_memory_mb: int = 256
    squared_distance: bool = False


def feature_settings(config: ml_collections.ConfigDict, arch: str) -> FeatureSettings:
    pc = config.patchcore
    return FeatureSettings(
        arch=arch,
        pretrain_dim=int(pc.pretrain_dim),
        target_dim=int(pc.target_dim),
        reweight_neighbors=int(pc.reweight_neighbors),
        reweight_per_patch=bool(pc.reweight_per_patch),
        knn_memory_mb=int(pc.knn_memory_mb),
        squared_distance=distance_is_squared(pc.distance),
    )


def distance_is_squared(distance: str) -> bool:
    """`patchcore.distance`: 'euclidean' or 'squared' (faiss IndexFlatL2's)."""
    input_pipeline.check_choice("patchcore.distance", distance, DISTANCES)
    return distance == "squared"


def ensemble_archs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The backbones of the run: the ensemble, or the single `model.arch`."""
    return tuple(config.patchcore.ensemble) or (config.model.arch,)


# ----------------------------------------------------------------------------
# Pure functions (jitted)


def frozen_patch_features(encoder, images, settings: FeatureSettings) -> jax.Array:
    """`[B, h2*w2, target_dim]` PatchCore features of normalised images."""
    maps = backbones.make_encoder(settings.arch).apply(encoder, images, train=False)
    return reconpatch.patch_features(
        maps[1], maps[2], settings.pretrain_dim, settings.target_dim
    )


def embed(model: dict, images, settings: FeatureSettings) -> jax.Array:
    """Bank-space features: f(p) for ReConPatch, p itself for PatchCore."""
    features = frozen_patch_features(model["encoder"], images, settings)
    if model.get("head"):
        features = reconpatch.represent(model["head"], features)
    return features


def score_features(model, features, settings: FeatureSettings, crop: int, sigma):
    """Maps `[B, crop, crop]` and image scores `[B]` of bank-space features.

    Images are searched one at a time (`lax.map`), so the kNN blocks have static
    shapes even when the batch size is symbolic (exported models).
    """
    bank = model["bank"]
    budget = settings.knn_memory_mb * 1024 * 1024

    def score_image(image_features):
        dist, idx = memory_bank.nearest_neighbors(
            image_features, bank, k=1, memory_budget_bytes=budget,
            squared=settings.squared_distance,
        )  # fmt: skip
        score = memory_bank.reweighted_image_score(
            dist[:, 0], idx[:, 0], bank, image_features,
            b=settings.reweight_neighbors, per_patch=settings.reweight_per_patch,
            memory_budget_bytes=budget,
        )  # fmt: skip
        return dist[:, 0], score

    patch_scores, scores = jax.lax.map(score_image, features)
    batch, patches = patch_scores.shape
    side = int(round(patches**0.5))
    grid = patch_scores.reshape(batch, side, side, 1)
    maps = reconpatch.upsample_bilinear(grid, (crop, crop))[..., 0]
    return anomaly_maps.gaussian_blur(maps, sigma), scores


def zscore(values, median, mad):
    """Modified z-score `(v - median) / (1.4826 * MAD)`."""
    return (values - median) / (MAD_SCALE * jnp.maximum(mad, 1e-12))


def predict(
    models: list[dict],
    images: jax.Array,
    *,
    settings: tuple[FeatureSettings, ...],
    crop: int,
    sigma: float,
) -> tuple[jax.Array, jax.Array]:
    """Maps and image scores of normalised images; ensembles are z-scored and averaged."""
    outputs = [
        score_features(m, embed(m, images, s), s, crop, sigma)
        for m, s in zip(models, settings, strict=True)
    ]
    if len(outputs) == 1:
        return outputs[0]
    maps = [zscore(mp, m["normalization"][2], m["normalization"][3])
            for (mp, _), m in zip(outputs, models, strict=True)]  # fmt: skip
    scores = [zscore(sc, m["normalization"][0], m["normalization"][1])
              for (_, sc), m in zip(outputs, models, strict=True)]  # fmt: skip
    return jnp.mean(jnp.stack(maps), axis=0), jnp.mean(jnp.stack(scores), axis=0)


def configured_predict(config: ml_collections.ConfigDict, archs=None):
    """`predict(models, images)` with the config's static settings bound.

    Args:
      config: run config.
      archs: the backbones of `models` (default: those of the config).
    """
    return functools.partial(
        predict,
        settings=tuple(feature_settings(config, a) for a in archs or ensemble_archs(config)),
        crop=int(config.data.crop_size),
        sigma=float(config.eval.sigma),
    )  # fmt: skip


def compile_predict(config: ml_collections.ConfigDict, mesh, archs=None):
    """`predict` jitted over the mesh: models replicated, images sharded.

    Every device scores its own images against the whole bank (`shard_map`), so
    the nearest-neighbour search needs no communication.
    """
    batch = jax.sharding.PartitionSpec(parallel.DATA_AXIS)
    per_device = jax.shard_map(
        configured_predict(config, archs),
        mesh=mesh,
        in_specs=(jax.sharding.PartitionSpec(), batch),
        out_specs=batch,
        check_vma=False,  # the kNN scan's carry starts unvarying; results are per device
    )
    return jax.jit(per_device)


_jit_features = jax.jit(frozen_patch_features, static_argnames=("settings",))
_jit_represent = jax.jit(reconpatch.represent)


# ----------------------------------------------------------------------------
# Fitting


def encoder_variables(config: ml_collections.ConfigDict, arch: str, key) -> dict:
    """The frozen encoder: pretrained when configured, else randomly initialised.

    With `patchcore.bn_stats_forward`, its BatchNorm statistics are then moved
    as `PatchCore.load()` moves them (`bn_statistics_forward`).
    """
    crop = config.data.crop_size
    dummy = jnp.zeros((1, crop, crop, 3), jnp.float32)
    variables = backbones.make_encoder(arch).init(key, dummy, train=False)
    if config.model.pretrained:
        variables = pretrained.load_encoder_variables(
            arch, config.model.pretrained, variables
        )
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    if config.patchcore.bn_stats_forward:
        variables = bn_statistics_forward(arch, variables, crop)
    return variables


def bn_statistics_forward(arch: str, variables: dict, crop: int) -> dict:
    """`variables` after one train-mode forward of a raw all-ones image.

    PatchCore's reference measures its feature shapes by running
    `torch.ones([1, 3, crop, crop])` (not normalised) through the backbone
    before anything sets eval mode, so every BatchNorm up to the last hooked
    layer updates its running mean and (unbiased) variance once with momentum
    0.1 (spec reconpatch.md section 1.2); all its features come from the
    changed statistics. The encoders here stop at that layer too.
    """
    ones = jnp.ones((1, crop, crop, 3), jnp.float32)
    _, updates = backbones.make_encoder(arch).apply(
        variables, ones, train=True, mutable=["batch_stats"]
    )
    return {**variables, "batch_stats": updates["batch_stats"]}


def extract_pool(encoder, samples, config, settings: FeatureSettings) -> np.ndarray:
    """`[N_images * patches, target_dim]` frozen features of `samples` (host)."""
    dataset = input_pipeline.eval_dataset(
        samples,
        batch_size=config.eval.batch_size,
        **input_pipeline.eval_transform(config.data),
    )
    parts = [
        np.asarray(_jit_features(encoder, jnp.asarray(b["image"]), settings))[b["valid"]]
        for b in input_pipeline.iterate_numpy(dataset)
    ]  # fmt: skip
    return np.concatenate(parts).reshape(-1, settings.target_dim)


def represent_pool(head, pool: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """f(p) for every row of the pool, in chunks."""
    return np.concatenate(
        [np.asarray(_jit_represent(head, jnp.asarray(pool[i : i + chunk])))
         for i in range(0, len(pool), chunk)]
    )  # fmt: skip


def build_bank(features: np.ndarray, ratio: float, key) -> np.ndarray:
    """The approximate greedy coreset rows of `features` (at least one row)."""
    if memory_bank.coreset_size(len(features), ratio) == 0:
        logging.warning(
            "coreset_ratio=%s of %d training patches selects nothing; keeping 1 row.",
            ratio, len(features),
        )  # fmt: skip
        ratio = 1.0 / len(features)
    indices = memory_bank.approximate_greedy_coreset(jnp.asarray(features), ratio, key)
    return features[np.asarray(indices)]


def normalization_stats(result: evaluate.SplitResult) -> np.ndarray:
    """Median and MAD of image scores and of map pixels (for the z-score)."""

    def median_mad(values):
        median = np.median(values)
        return [median, np.median(np.abs(values - median))]

    return np.asarray(
        median_mad(result.scores) + median_mad(result.maps.ravel()), np.float32
    )


def model_dir(workdir: str, category: str, arch: str, ensemble: bool) -> str:
    """Checkpoints of one model: one directory per backbone in an ensemble."""
    base = os.path.join(workdir, "checkpoints", category)
    return os.path.join(base, arch) if ensemble else base


def saved_model(ckpt, step=None) -> dict | None:
    """The fitted model in `ckpt` (None if it holds only training states)."""
    latest = ckpt.latest_step() if step in (None, -1) else step
    if latest is None:
        return None
    if not checkpointing.holds_item(ckpt, latest, "model"):
        return None
    return checkpointing.restore_as_saved(ckpt, latest)["model"]


HeadTrainer = Callable[..., tuple[dict, dict]]


def fit_model(
    config, arch, train_samples, ckpt, mesh, ensemble: bool, writer, train_head=None,
    label: str = "",
):  # fmt: skip
    """Fits (or restores) one backbone's model; returns (host model, info).

    Args:
      label: what the console lines and bars name (the category, and the
        backbone in an ensemble); default the backbone.
      train_head: None for PatchCore (the bank holds the raw features);
        ReConPatch passes `train_head(config, pool, mesh, ckpt, writer, desc)
        -> (head, scalars)`, and the bank then holds f(p).
    """
    label = label or arch
    existing = saved_model(ckpt)
    if existing is not None:
        console.say(f"{label}: using the fitted model in {ckpt.directory}")
        return existing, {"restored": 1.0}
    start = time.perf_counter()
    settings = feature_settings(config, arch)
    init_key, coreset_key = jax.random.split(jax.random.key(config.seed))
    encoder = encoder_variables(config, arch, init_key)
    console.say(f"{label}: {arch} patch features of {len(train_samples)} images")
    pool = extract_pool(encoder, train_samples, config, settings)
    info: dict = {"train_patches": float(len(pool))}
    head: dict = {}
    if train_head is not None:
        head, scalars = train_head(
            config, pool, mesh, ckpt, writer, f"{label} {config.method}"
        )
        info.update({f"train_{k}": v for k, v in scalars.items()})
        pool = represent_pool(head, pool)
    ratio = config.patchcore.coreset_ratio
    console.say(f"{label}: coreset of {ratio:g} of {len(pool)} patches")
    bank = build_bank(pool, ratio, coreset_key)
    model = {
        "encoder": jax.device_get(encoder),
        "head": head,
        "bank": bank,
        "normalization": np.asarray(IDENTITY_NORMALIZATION, np.float32),
    }
    if ensemble:
        predict_fn = compile_predict(config, mesh, archs=(arch,))
        replicated = parallel.replicate(mesh, [model])
        train_result = evaluate.evaluate_split(
            predict_fn, replicated, train_samples, config, mesh
        )
        model["normalization"] = normalization_stats(train_result)
    info.update({"memory_bank_size": float(len(bank)),
                 "fit_seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
    step = int(info.get("train_steps", 0))
    checkpointing.save(ckpt, step + 1, {"model": model})
    return model, info


def fit(
    config, workdir: str, category: str, train_samples, mesh, writer,
    evaluate_fn=None, train_head: HeadTrainer | None = None,
) -> tuple[list[dict], dict]:  # fmt: skip
    """Fits (or restores) every backbone's model of `category`.

    Returns:
      The models (replicated over the mesh) and what fitting measured.
    """
    del evaluate_fn  # nothing to evaluate before the bank exists
    archs = ensemble_archs(config)
    models, info = [], {}
    for arch in archs:
        directory = model_dir(workdir, category, arch, len(archs) > 1)
        ckpt = checkpointing.manager(
            directory, config.checkpoint.max_to_keep, config=config
        )
        label = f"{category} {arch}" if len(archs) > 1 else category
        model, model_info = fit_model(
            config, arch, train_samples, ckpt, mesh, len(archs) > 1, writer,
            train_head, label,
        )  # fmt: skip
        models.append(model)
        info.update(model_info)
    return parallel.replicate(mesh, models), info


def restore(config, workdir: str, category: str, mesh) -> list[dict]:
    """The fitted models of `category` (`checkpoint.step`, default the latest)."""
    archs = ensemble_archs(config)
    models = []
    for arch in archs:
        directory = model_dir(workdir, category, arch, len(archs) > 1)
        ckpt = checkpointing.existing_manager(directory, config=config)
        model = saved_model(ckpt, config.checkpoint.step)
        if model is None:
            raise checkpointing.NoCheckpointError(
                f"No fitted {config.method} model in {directory}: run mode 'train' first."
            )
        models.append(model)
    return parallel.replicate(mesh, models)


def model_step(models) -> None:
    """Memory-bank models have no training step of their own."""
    del models


def host_model(models) -> list[dict]:
    """The models as host numpy arrays (constants of an exported module)."""
    return jax.device_get(models)
