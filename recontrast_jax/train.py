"""ReContrast training: state, optimiser, the jitted train step and the loop.

The step is a pure module-level function, jitted once per run with the state
donated. The state is replicated over the device mesh and batches are sharded
along it (see `parallel.py`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging

from recontrast_jax import (
    checkpointing,
    default_config,
    evaluate,
    losses,
    parallel,
    reports,
    thresholds,
)
from recontrast_jax import pretrained as pretrained_lib
from recontrast_jax.data import input_pipeline, sources
from recontrast_jax.models import layers, recontrast, resnet


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
    image_size: int,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    pretrained: str = "",
) -> TrainState:
    """A fresh state; the frozen encoder is a copy of the encoder.

    Args:
      arch: encoder architecture.
      image_size: side of the (square) training images.
      tx: the optimiser.
      rng: initialisation key (bottleneck, decoder, and encoder if not pretrained).
      pretrained: '' for random initialisation, 'imagenet' for the torchvision
        IMAGENET1K_V1 weights, or a weights file (see `pretrained.py`).
    """
    variables, frozen = recontrast.init_variables(arch, rng, image_size)
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
        frozen_features = recontrast.frozen_encoder_features(arch, state.frozen, images)
    frozen_features = [f.astype(compute) for f in frozen_features]
    model = recontrast.ReContrast(arch)

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
        lambda frozen, images: recontrast.frozen_encoder_features(arch, frozen, images)
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


def prepare_workdir(workdir: str) -> None:
    """Creates the workdir and checks that it is writable, naming it if not."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"Workdir {workdir!r} is not writable: {e.strerror or e}"
        ) from e


class WorkdirError(OSError):
    """The workdir cannot be created or written."""


def encoder_bn_train_mode(config: ml_collections.ConfigDict, category: str) -> bool:
    """Whether E's BatchNorm runs in train mode for `category` (spec 1.1)."""
    return bool(config.model.encoder_bn_train) and (
        category not in tuple(config.model.encoder_bn_eval_categories)
    )


def category_dirs(workdir: str, category: str) -> dict[str, str]:
    """Where a category's checkpoints, TensorBoard logs and heatmaps go."""
    return {
        "checkpoints": os.path.join(workdir, "checkpoints", category),
        "tensorboard": os.path.join(workdir, "tensorboard", category),
        "heatmaps": os.path.join(workdir, "heatmaps", category),
    }


def train_category(
    config: ml_collections.ConfigDict,
    workdir: str,
    category: str,
    mesh,
) -> dict[str, float]:
    """Trains one model on `category`, evaluates it, writes its artifacts.

    Resumes from the category's latest checkpoint when there is one.

    Returns:
      The metrics of the last evaluation (at step T), plus timings.
    """
    files = sources.category_files(config, category)
    train_samples, held_out = thresholds.holdout_split(
        files.train, config.data.holdout_fraction, config.seed
    )
    dirs = category_dirs(workdir, category)
    tx = make_optimizer(config.optimizer)
    ckpt = checkpointing.manager(dirs["checkpoints"], config.checkpoint.max_to_keep)
    state = initial_state(config, tx, ckpt, mesh)
    predict_fn = evaluate.compile_predict(config, mesh)
    evaluator = functools.partial(evaluate_state, predict_fn, files.test, config, mesh)
    writer = SummaryWriter(dirs["tensorboard"])
    start = time.perf_counter()
    last = None
    if config.mode == "train" and int(jax.device_get(state.step)) < config.train.steps:
        cached = use_frozen_cache(config, len(train_samples))
        step_fn = compile_train_step(
            config, tx, mesh, encoder_bn_train_mode(config, category), cached
        )
        cache = (
            frozen_feature_cache(config, state, train_samples, mesh) if cached else None
        )
        step_fn = batch_step(step_fn, cache)

        state, last = run_training(
            config,
            category,
            train_samples,
            mesh,
            state,
            step_fn,
            evaluator,
            writer,
            ckpt,
        )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if last is None:  # evaluate mode, or resumed after the end
        last = evaluator(state)
    result, metrics = last
    normal, source = (
        (held_out, "held-out") if held_out else (train_samples, "training (in-sample)")
    )
    scored = evaluate.evaluate_split(predict_fn, state, normal, config, mesh)
    calibration = thresholds.calibration(
        scored, source, result, config.eval.pixel_metrics
    )
    calibration["step"] = int(jax.device_get(state.step))
    entries = write_category_reports(
        config, workdir, category, files, result, calibration
    )
    writer.heatmaps(int(jax.device_get(state.step)), dirs["heatmaps"], entries)
    writer.close()
    return {
        **metrics,
        "steps": float(jax.device_get(state.step)),
        "train_seconds": round(train_seconds, 2),
        "report_seconds": round(time.perf_counter() - start, 2),
    }


def choose_threshold(calibration: dict, config: ml_collections.ConfigDict) -> dict:
    """The configured threshold, falling back to fixed values if it cannot be had."""
    try:
        return thresholds.choose(calibration, config.threshold)
    except ValueError as e:
        logging.warning("%s; using the fixed thresholds instead.", e)
        fixed = ml_collections.ConfigDict(dict(config.threshold, rule="fixed"))
        return thresholds.choose(calibration, fixed)


def write_category_reports(
    config, workdir, category, files, result, calibration
) -> list:
    """Calibration file, heatmap panels, histogram and gallery (process 0 only).

    Returns:
      The gallery entries of the panels written.
    """
    if jax.process_index() != 0:
        return []
    thresholds.save(workdir, category, calibration)
    directory = category_dirs(workdir, category)["heatmaps"]
    names = [f"{s.defect_type}/{os.path.basename(s.path)}" for s in files.test]
    entries = evaluate.write_heatmaps(
        result, directory, config.report.num_heatmaps, names
    )
    chosen = choose_threshold(calibration, config)
    evaluate.write_report(result, directory, entries, chosen, category)
    return entries


def restore_for_inference(config, workdir: str, category: str, mesh) -> TrainState:
    """The category's checkpoint (config.checkpoint.step, default the latest)."""
    directory = category_dirs(workdir, category)["checkpoints"]
    tx = make_optimizer(config.optimizer)
    return initial_state(config, tx, checkpointing.manager(directory), mesh)


def initial_state(config: ml_collections.ConfigDict, tx, ckpt, mesh) -> TrainState:
    """The checkpoint to continue from or evaluate, else a new (pretrained) state.

    Training resumes from the latest checkpoint; the other modes restore
    `config.checkpoint.step` (-1: the latest) and need one to exist.
    """
    resuming = ckpt.latest_step() is not None
    if config.mode != "train" and not resuming:
        raise checkpointing.NoCheckpointError(
            f"No checkpoint in {ckpt.directory}: train first (mode 'train')."
        )
    state = create_train_state(
        config.model.arch,
        config.data.crop_size,
        tx,
        jax.random.key(config.seed),
        "" if resuming else config.model.pretrained,
    )
    state = parallel.replicate(mesh, state)
    if not resuming:
        return state
    step = None if config.mode == "train" else config.checkpoint.step
    return checkpointing.restore(ckpt, state, None if step in (None, -1) else step)


def evaluate_state(predict_fn, test_samples, config, mesh, state):
    """Evaluates `state` on the test split: (SplitResult, metrics dict)."""
    result = evaluate.evaluate_split(predict_fn, state, test_samples, config, mesh)
    return result, evaluate.compute_metrics(result, config.eval.pixel_metrics)


def run_training(
    config, category, train_samples, mesh, state, step_fn, evaluator, writer, ckpt
):
    """Steps from `state.step` to `config.train.steps`, logging, evaluating, saving.

    Returns:
      The final state and the last `(result, metrics)` evaluation, or None when
      there was nothing left to train.
    """
    total = config.train.steps
    step = int(jax.device_get(state.step))
    if step >= total:
        return state, None
    last = None
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
            if step % config.eval.every == 0 or step == total:
                last = evaluator(state)
                writer.scalars(step, {f"eval/{k}": v for k, v in last[1].items()})
            if step % config.checkpoint.every == 0 or step == total:
                checkpointing.save(ckpt, step, state)
            if step >= total:
                break
    return state, last


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


class SummaryWriter:
    """TensorBoard scalars (process 0 only), through tf.summary."""

    def __init__(self, logdir: str):
        self._writer = None
        if jax.process_index() == 0:
            import tensorflow as tf

            self._tf = tf
            self._writer = tf.summary.create_file_writer(logdir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default():
            for name, value in values.items():
                self._tf.summary.scalar(name, value, step=step)
        self._writer.flush()

    def heatmaps(self, step: int, directory: str, entries: list[dict]) -> None:
        """A few heatmap panels as TensorBoard images."""
        if self._writer is None or not entries:
            return
        from PIL import Image

        with self._writer.as_default():
            for entry in entries[:4]:
                panel = np.asarray(Image.open(os.path.join(directory, entry["image"])))
                name = f"heatmaps/{entry['name']}"
                self._tf.summary.image(name, panel[None], step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


REPORTED_METRICS = (
    "image_auroc",
    "f1",
    "accuracy",
    "pixel_auroc",
    "aupro",
    "aupro_recontrast_per_image",
    "pixel_ap",
    "image_f1_max",
)


def summarize(results: dict[str, dict[str, float]]) -> dict:
    """Per-category metrics plus their mean over categories."""
    names = sorted({k for r in results.values() for k in r})
    mean = {
        k: float(np.mean([r[k] for r in results.values() if k in r])) for k in names
    }
    return {"categories": results, "mean": mean}


def write_results(
    workdir: str, results: dict[str, dict[str, float]], title: str
) -> None:
    """Writes metrics.json and results.md atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    reports.atomic_write_json(os.path.join(workdir, "metrics.json"), summarize(results))
    present = {k for r in results.values() for k in r}
    names = [k for k in REPORTED_METRICS if k in present] or sorted(present)
    table = reports.results_markdown(results, names, title)
    reports.atomic_write_text(os.path.join(workdir, "results.md"), table)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains and evaluates one model per category; returns the summary dict."""
    prepare_workdir(workdir)
    if jax.process_index() == 0:
        reports.atomic_write_text(
            os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
        )
    mesh = parallel.make_mesh()
    results = {}
    for category in sources.category_names(config):
        if config.method in default_config.MEMORY_BANK_METHODS:
            from recontrast_jax import patchcore

            results[category] = patchcore.run_category(config, workdir, category, mesh)
        elif config.method == "recontrast":
            results[category] = train_category(config, workdir, category, mesh)
        else:
            raise ValueError(
                f"Unknown config.method {config.method!r}: use 'recontrast', "
                "'patchcore' or 'reconpatch'."
            )
        write_results(workdir, results, config.report.title)
    return summarize(results)
