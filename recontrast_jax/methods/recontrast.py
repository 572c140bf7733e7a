"""ReContrast: the method's state, train step, training loop and predict.

The method surface shared with the other methods (`methods/__init__.py`):
`fit` trains a category's model (resuming from its latest checkpoint),
`restore` loads a saved one, `compile_predict` jits `predict(model, images) ->
(maps, scores)` over the mesh, `configured_predict` is the same pure function
for export, `host_model` copies a model to the host and `model_step` says
which training step it is.

The step is a pure module-level function, jitted with the state donated. The
state is replicated over the device mesh and batches are sharded along it
(see `parallel.py`).
"""

from __future__ import annotations

import functools
import os
import time
import types
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging

from recontrast_jax import anomaly_maps, checkpointing, losses, parallel
from recontrast_jax import pretrained as pretrained_lib
from recontrast_jax.data import input_pipeline
from recontrast_jax.models import layers, resnet
from recontrast_jax.models import recontrast as recontrast_model


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    Attributes:
      step: number of updates done so far.
      params: trainable parameters {'encoder', 'bottleneck', 'decoder'}.
      batch_stats: BatchNorm running statistics of the same modules.
      opt_state: optimiser state.
      frozen: variables of the frozen encoder E_f (never optimised).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    frozen: Any


def parameter_groups(params) -> dict[str, str]:
    """Labels each top-level module with its optimiser group."""
    return {name: "encoder" if name == "encoder" else "decoder" for name in params}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Two AdamW groups as in the reference scripts.

    Decoder + bottleneck at `lr_decoder`, encoder at `lr_encoder`; decoupled
    weight decay on every parameter (BatchNorm affine and biases included); no
    schedule, no clipping. optax.adamw matches torch.optim.AdamW here.
    """

    def adamw(lr):
        return optax.adamw(
            lr,
            b1=config.beta1,
            b2=config.beta2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )

    return optax.partition(
        {"encoder": adamw(config.lr_encoder), "decoder": adamw(config.lr_decoder)},
        parameter_groups,
    )


def create_train_state(
    arch: str,
    crop_size: int,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    pretrained: str = "",
) -> TrainState:
    """A fresh state; the frozen encoder is a copy of the encoder.

    Args:
      arch: encoder architecture.
      crop_size: side of the (square, centre-cropped) images the model sees.
      tx: the optimiser.
      rng: initialisation key (bottleneck, decoder, and encoder if not pretrained).
      pretrained: '' for random initialisation, 'imagenet' for the torchvision
        IMAGENET1K_V1 weights, or a weights file (see `pretrained.py`).
    """
    variables, frozen = recontrast_model.init_variables(arch, rng, crop_size)
    params, batch_stats = dict(variables["params"]), dict(variables["batch_stats"])
    if pretrained:
        template = {"params": params["encoder"], "batch_stats": batch_stats["encoder"]}
        encoder = pretrained_lib.load_encoder_variables(arch, pretrained, template)
        params["encoder"] = jax.tree_util.tree_map(jnp.asarray, encoder["params"])
        batch_stats["encoder"] = jax.tree_util.tree_map(
            jnp.asarray, encoder["batch_stats"]
        )
        # E_f = deepcopy(E): separate buffers, since the state is donated.
        frozen = jax.tree_util.tree_map(jnp.array, encoder)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        frozen=frozen,
    )


def train_step(
    state: TrainState,
    images: jax.Array,
    *,
    arch: str,
    tx: optax.GradientTransformation,
    total_steps: int,
    warmup_fraction: float,
    mining_factor: float,
    encoder_train: bool,
    frozen_features: list[jax.Array] | None = None,
    dtype: str = "float32",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One ReContrast update (pure; jit it with the static keyword arguments bound).

    Args:
      state: current state.
      images: normalised images (B, H, W, 3), sharded along the batch.
      frozen_features: E_f's features of `images` if already known (see
        `frozen_feature_cache`); computed here when None.
      dtype: compute dtype, 'float32' or 'bfloat16' (parameters, BatchNorm
        statistics, loss and updates stay float32).
      arch: encoder architecture.
      tx: the optimiser.
      total_steps: T, for the alpha warm-up.
      warmup_fraction: alpha rises from -3 to 1 over this fraction of T.
      mining_factor: gradient factor for easy points (0 in the paper).
      encoder_train: BatchNorm mode of the trainable encoder.

    Returns:
      The new state and {'loss', 'alpha'}.
    """
    alpha = losses.alpha_schedule(state.step, total_steps, warmup_fraction)
    compute = layers.compute_dtype(dtype)
    images = images.astype(compute)
    if frozen_features is None:
        frozen_features = recontrast_model.frozen_encoder_features(
            arch, state.frozen, images
        )
    frozen_features = [f.astype(compute) for f in frozen_features]
    model = recontrast_model.ReContrast(arch)

    def loss_fn(params):
        (targets, recons), updated = model.apply(
            {
                "params": layers.cast_floating(params, compute),
                "batch_stats": state.batch_stats,
            },
            images,
            frozen_features,
            train=True,
            encoder_train=encoder_train,
            mutable=["batch_stats"],
        )
        targets, recons = (
            [x.astype(jnp.float32) for x in maps] for maps in (targets, recons)
        )
        loss = losses.recontrast_loss(targets, recons, alpha, mining_factor)
        return loss, updated["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, {"loss": loss, "alpha": alpha}


def compile_train_step(
    config: ml_collections.ConfigDict,
    tx,
    mesh,
    encoder_train: bool,
    cached_features: bool = False,
):
    """Binds the static arguments and jits `train_step` over the mesh.

    The state is donated and stays replicated; the batch is sharded. The
    returned function is `step(state, images)`; with `cached_features` it is
    `step(state, images, index, cache)`, where `cache` (replicated) holds E_f's
    features of every training image and `index` (sharded like the images)
    picks their rows, so E_f does not run in the step.
    """
    step_fn = functools.partial(
        train_step,
        arch=config.model.arch,
        tx=tx,
        total_steps=config.train.steps,
        warmup_fraction=config.train.alpha_warmup_fraction,
        mining_factor=config.train.mining_factor,
        encoder_train=encoder_train,
        dtype=config.model.dtype,
    )
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    if cached_features:

        def cached_step(state, images, index, cache):
            rows = [level.at[index].get(out_sharding=sharded) for level in cache]
            return step_fn(state, images, frozen_features=rows)

        return jax.jit(
            cached_step,
            in_shardings=(replicated, sharded, sharded, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
    return jax.jit(
        step_fn,
        in_shardings=(replicated, sharded),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def batch_step(step_fn, cache: list[jax.Array] | None):
    """`step(state, global_batch_dict)` over a compiled (cached or plain) step."""
    if cache is None:
        return lambda state, batch: step_fn(state, batch["image"])
    return lambda state, batch: step_fn(state, batch["image"], batch["index"], cache)


def frozen_feature_bytes(config: ml_collections.ConfigDict, num_images: int) -> int:
    """Memory of E_f's three feature maps for `num_images` training images."""
    spec = resnet.get_arch(config.model.arch)
    side = config.data.crop_size
    per_image = sum(
        channels * (side // stride) ** 2
        for channels, stride in zip(spec.stage_channels, (4, 8, 16), strict=True)
    )
    return 4 * per_image * num_images


def use_frozen_cache(config: ml_collections.ConfigDict, num_images: int) -> bool:
    """Whether to precompute E_f's features (`train.frozen_cache`: auto/on/off).

    There is no augmentation, so E_f (inference-mode BatchNorm, never updated)
    maps each training image to the same features at every step. 'auto' caches
    them when they fit in `train.frozen_cache_mb` per device.
    """
    mode = config.train.frozen_cache
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"train.frozen_cache must be auto, on or off, got {mode!r}")
    if mode == "auto":
        budget = config.train.frozen_cache_mb * 1024 * 1024
        return frozen_feature_bytes(config, num_images) <= budget
    return mode == "on"


def frozen_feature_cache(config, state: TrainState, samples, mesh) -> list[jax.Array]:
    """E_f's features of every training image, in `samples` order, replicated."""
    arch = config.model.arch
    features_fn = jax.jit(
        lambda frozen, images: recontrast_model.frozen_encoder_features(
            arch, frozen, images
        )
    )
    dataset = input_pipeline.eval_dataset(
        samples,
        batch_size=config.eval.batch_size,
        image_size=config.data.image_size,
        crop_size=config.data.crop_size,
    )
    levels: list[list[np.ndarray]] = [[], [], []]
    # One copy on this process's default device, not a host copy sent per batch.
    frozen = jax.device_put(jax.device_get(state.frozen))
    for batch in input_pipeline.iterate_numpy(dataset):
        valid = batch["valid"]
        for level, f in zip(levels, features_fn(frozen, batch["image"]), strict=True):
            level.append(np.asarray(f)[valid])
    return parallel.replicate(mesh, [np.concatenate(level) for level in levels])


class Throughput:
    """Images per second over the steps since the last report."""

    def __init__(self):
        self._start = time.perf_counter()
        self._images = 0

    def add(self, images: int) -> None:
        self._images += images

    def report(self) -> float:
        now = time.perf_counter()
        rate = self._images / max(now - self._start, 1e-9)
        self._start, self._images = now, 0
        return rate


def host_scalars(metrics: dict[str, jax.Array]) -> dict[str, float]:
    """Fetches scalar metrics to the host (a synchronisation point)."""
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def encoder_bn_train_mode(config: ml_collections.ConfigDict, category: str) -> bool:
    """Whether E's BatchNorm runs in train mode for `category` (spec 1.1)."""
    return bool(config.model.encoder_bn_train) and (
        category not in tuple(config.model.encoder_bn_eval_categories)
    )


def training_dataset(config: ml_collections.ConfigDict, samples, start_batch: int = 0):
    """The endless, per-process training pipeline for `samples`."""
    processes = jax.process_count()
    if config.train.batch_size % processes:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} must divide over {processes} processes."
        )
    return input_pipeline.train_dataset(
        samples,
        batch_size=config.train.batch_size // processes,
        image_size=config.data.image_size,
        crop_size=config.data.crop_size,
        seed=config.seed,
        batch_multiple=jax.local_device_count(),
        # Hosts must agree on every global batch shape, so several processes
        # always drop each epoch's partial last batch.
        drop_remainder=config.train.drop_last or processes > 1,
        cache=config.data.cache,
        process_index=jax.process_index(),
        process_count=processes,
        start_batch=start_batch,
    )


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
    frozen_features = recontrast_model.frozen_encoder_features(
        arch, state.frozen, images_c
    )
    targets, recons = recontrast_model.ReContrast(arch).apply(
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


def checkpoint_dir(workdir: str, category: str) -> str:
    """Where a category's ReContrast checkpoints go."""
    return os.path.join(workdir, "checkpoints", category)


def fresh_state(config: ml_collections.ConfigDict, mesh, pretrained: str) -> TrainState:
    """A new state for the config, replicated over the mesh."""
    tx = make_optimizer(config.optimizer)
    state = create_train_state(
        config.model.arch,
        config.data.crop_size,
        tx,
        jax.random.key(config.seed),
        pretrained,
    )
    return parallel.replicate(mesh, state)


def fit(
    config: ml_collections.ConfigDict,
    workdir: str,
    category: str,
    train_samples,
    mesh,
    writer,
    evaluate_fn: Callable[[TrainState], dict] | None = None,
) -> tuple[TrainState, dict]:
    """Trains `category`'s model to `train.steps`, resuming from its latest checkpoint.

    Args:
      config: run config.
      workdir: run directory (checkpoints under `checkpoints/<category>`).
      category: the category (picks E's BatchNorm mode, spec 1.1).
      train_samples: the normal images to train on.
      mesh: the data mesh.
      writer: a `reports.MetricWriter` for the training scalars.
      evaluate_fn: `evaluate_fn(state) -> metrics`, run every `eval.every`
        steps before the last (the pipeline evaluates the final model itself).

    Returns:
      The trained state and {'steps': T, 'train_seconds': time spent training}.
    """
    ckpt = checkpointing.manager(
        checkpoint_dir(workdir, category), config.checkpoint.max_to_keep
    )
    resuming = ckpt.latest_step() is not None
    state = fresh_state(config, mesh, "" if resuming else config.model.pretrained)
    if resuming:
        state = checkpointing.restore(ckpt, state)
    start = time.perf_counter()  # training alone: set-up and restore excluded
    if int(jax.device_get(state.step)) < config.train.steps:
        state = run_training(
            config, category, train_samples, mesh, state, writer, ckpt, evaluate_fn
        )
    return state, {
        "steps": float(jax.device_get(state.step)),
        "train_seconds": round(time.perf_counter() - start, 2),
    }


def restore(config: ml_collections.ConfigDict, workdir: str, category: str, mesh):
    """The category's checkpoint (`checkpoint.step`, -1: the latest), replicated."""
    directory = checkpoint_dir(workdir, category)
    ckpt = checkpointing.manager(directory)
    if ckpt.latest_step() is None:
        raise checkpointing.NoCheckpointError(
            f"No checkpoint in {ckpt.directory}: train first (mode 'train')."
        )
    step = config.checkpoint.step
    state = fresh_state(config, mesh, "")
    return checkpointing.restore(ckpt, state, None if step in (None, -1) else step)


def model_step(state: TrainState) -> int:
    """The number of updates the model has had."""
    return int(jax.device_get(state.step))


def host_model(state: TrainState) -> types.SimpleNamespace:
    """The variables `predict` reads, as host numpy arrays.

    Copying to the host drops any device sharding, so closed-over values become
    plain constants of an exported module; the optimiser state is left out.
    """
    return types.SimpleNamespace(
        params=jax.device_get(state.params),
        batch_stats=jax.device_get(state.batch_stats),
        frozen=jax.device_get(state.frozen),
    )


def run_training(
    config, category, train_samples, mesh, state, writer, ckpt, evaluate_fn=None
) -> TrainState:
    """Steps from `state.step` to `config.train.steps`, logging, evaluating, saving."""
    total = config.train.steps
    step = int(jax.device_get(state.step))
    tx = make_optimizer(config.optimizer)
    cached = use_frozen_cache(config, len(train_samples))
    step_fn = compile_train_step(
        config, tx, mesh, encoder_bn_train_mode(config, category), cached
    )
    cache = frozen_feature_cache(config, state, train_samples, mesh) if cached else None
    step_fn = batch_step(step_fn, cache)
    throughput = Throughput()
    bar = tqdm.tqdm(
        total=total,
        initial=step,
        desc=f"{category} train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    # Deterministic batches: resuming at `step` skips the batches already used.
    dataset = training_dataset(config, train_samples, start_batch=step)
    if step:
        logging.info("%s: resuming from step %d", category, step)
    with bar:
        batches = input_pipeline.iterate_numpy(dataset)
        for batch in parallel.prefetch_to_device(mesh, batches):
            state, step_metrics = step_fn(state, batch)
            step += 1
            throughput.add(batch["image"].shape[0])
            bar.update(1)
            if step % config.train.log_every == 0 or step == total:
                scalars = host_scalars(step_metrics)
                scalars["images_per_second"] = throughput.report()
                # Constant in the paper's recipe; logged so runs can be compared.
                scalars["lr_decoder"] = config.optimizer.lr_decoder
                scalars["lr_encoder"] = config.optimizer.lr_encoder
                bar.set_postfix(
                    loss=f"{scalars['loss']:.4f}",
                    img_s=f"{scalars['images_per_second']:.1f}",
                )
                writer.scalars(step, {f"train/{k}": v for k, v in scalars.items()})
            if (
                evaluate_fn is not None
                and step % config.eval.every == 0
                and step < total
            ):
                writer.scalars(
                    step, {f"eval/{k}": v for k, v in evaluate_fn(state).items()}
                )
            if step % config.checkpoint.every == 0 or step == total:
                checkpointing.save(ckpt, step, state)
            if step >= total:
                break
    return state
