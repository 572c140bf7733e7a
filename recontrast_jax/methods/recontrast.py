"""ReContrast: the method's training loop, checkpoints and data.

The method surface shared with the other methods (`methods/lookup.py`):
`fit` trains a category's model (resuming from its latest checkpoint),
`restore` loads a saved one, `compile_predict` jits `predict(model, images) ->
(maps, scores)` over the mesh, `configured_predict` is the same pure function
for export, `host_model` copies a model to the host and `model_step` says
which training step it is.

The state, the train step and predict are `methods/recontrast_steps.py`
(no TensorFlow there), imported here as part of the method's surface.
"""

from __future__ import annotations

import os
import time
import types
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from recontrast_jax import checkpointing, console, divergence, parallel, preemption
from recontrast_jax.data import input_pipeline
from recontrast_jax.methods import torch_adamw
from recontrast_jax.methods.recontrast_steps import (  # noqa: F401 (the method surface)
    TrainState,
    batch_step,
    compile_predict,
    compile_train_step,
    configured_predict,
    create_train_state,
    make_optimizer,
    parameter_groups,
    predict,
    train_step,
)
from recontrast_jax.models import backbones
from recontrast_jax.models import recontrast as recontrast_model


def frozen_feature_bytes(config: ml_collections.ConfigDict, num_images: int) -> int:
    """Memory of E_f's three feature maps for `num_images` training images."""
    channels_per_level = backbones.feature_channels(config.model.arch)
    side = config.data.crop_size
    per_image = sum(
        channels * (side // stride) ** 2
        for channels, stride in zip(channels_per_level, (4, 8, 16), strict=True)
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
        **input_pipeline.eval_transform(config.data),
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
        resize=config.data.resize,
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


def learning_rate(optimizer_config, group: str, step: int) -> float:
    """The rate `group` ('decoder' or 'encoder') used for update number `step`."""
    schedule = torch_adamw.multistep_lr(
        optimizer_config[f"lr_{group}"],
        tuple(optimizer_config.lr_milestones),
        optimizer_config.lr_gamma,
    )
    return float(schedule(step - 1)) if callable(schedule) else float(schedule)


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
        checkpoint_dir(workdir, category), config.checkpoint.max_to_keep, config
    )
    resuming = ckpt.latest_step() is not None
    state = fresh_state(config, mesh, "" if resuming else config.model.pretrained)
    if resuming:
        state = checkpointing.restore_latest(ckpt, state, set_aside=True)
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
    ckpt = checkpointing.existing_manager(directory, config=config)
    if ckpt.latest_step() is None:
        raise checkpointing.NoCheckpointError(
            f"No checkpoint in {ckpt.directory}: train first (mode 'train')."
        )
    step = config.checkpoint.step
    restored = checkpointing.restore(
        ckpt, inference_target(config, mesh), None if step in (None, -1) else step,
        partial=True,
    )  # fmt: skip
    return TrainState(opt_state=None, **restored)


INFERENCE_FIELDS = ("step", "params", "batch_stats", "frozen")


def inference_target(config: ml_collections.ConfigDict, mesh) -> dict:
    """Shapes and shardings of what inference reads from a checkpoint.

    Evaluate, predict and export never read the optimiser state (two more
    copies of the trainable weights in AdamW) and need no initialised model to
    restore into: the target is abstract, and only these fields are read.
    """
    tx = make_optimizer(config.optimizer)
    abstract = jax.eval_shape(
        lambda: create_train_state(
            config.model.arch, config.data.crop_size, tx, jax.random.key(0), ""
        )
    )
    replicated = parallel.replicated(mesh)
    return {
        name: jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
            getattr(abstract, name),
        )
        for name in INFERENCE_FIELDS
    }


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
    bar = console.progress_bar(total, f"{category} train", "step", initial=step)
    # Deterministic batches: resuming at `step` skips the batches already used.
    dataset = training_dataset(config, train_samples, start_batch=step)
    if step:
        console.say(f"{category}: resuming from step {step} of {total}")
    watch = divergence.DivergenceWatch()
    with bar, preemption.StopRequest() as stop:
        compiling = console.FirstCallNote(bar, "compiling the train step")
        batches = input_pipeline.iterate_numpy(dataset)
        for batch in parallel.prefetch_to_device(mesh, batches):
            state, step_metrics = step_fn(state, batch)
            step += 1
            watch.add(step, step_metrics["loss"])
            throughput.add(batch["image"].shape[0])
            compiling.done()
            bar.update(1)
            if step % config.train.log_every == 0 or step == total:
                watch.check(category)
                scalars = host_scalars(step_metrics)
                scalars["images_per_second"] = throughput.report()
                # Constant in the single-class recipe; logged so runs compare.
                for group in ("decoder", "encoder"):
                    scalars[f"lr_{group}"] = learning_rate(
                        config.optimizer, group, step
                    )
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
                watch.check(category)
                writer.scalars(
                    step, {f"eval/{k}": v for k, v in evaluate_fn(state).items()}
                )
            stopping = stop.reached(step, ckpt)
            if stopping or step % config.checkpoint.every == 0 or step == total:
                watch.check(category)  # a diverged state is never saved
                divergence.ensure_finite(state, category, step)
                checkpointing.save(ckpt, step, state)
            if stopping:
                raise stop.stop(category, step, ckpt.directory)
            if step >= total:
                break
    return state
