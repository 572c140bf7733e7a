"""ReConPatch: PatchCore's pipeline with a contrastively trained modulation f.

The method surface (`fit`, `restore`, `compile_predict`, ...) is PatchCore's
(`methods/patchcore.py`), with `train_head` training f and g on the patch pool
before the memory bank is built from f(p).

The frozen encoder's patch features of the training images are constant (there
is no augmentation), so they are extracted once into a host "patch pool"
`[N, C']`. Every epoch visits the pool in a fresh random order in batches of
`reconpatch.batch_size` patches (the last partial batch is dropped). One step:

  z_target = g_ema(f_ema(p))                  no gradient
  w        = alpha * pairwise + (1 - alpha) * contextual   (Eqs. 1-6)
  loss     = relaxed_contrastive(g(f(p)), w)               (Eq. 7)
  (f, g)  <- AdamP with a per-epoch cosine learning rate
  (f_ema, g_ema) <- ema * (f_ema, g_ema) + (1 - ema) * (f, g)  (Eq. 8)

The step is jitted over the device mesh with the state replicated and the patch
batch sharded; the N x N label and distance matrices are global, so the result
does not depend on the device count.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from recontrast_jax import checkpointing, console, divergence, parallel, preemption
from recontrast_jax.methods import adamp, patchcore, reconpatch_loss
from recontrast_jax.models import reconpatch


@flax.struct.dataclass
class ModulationState:
    """What a ReConPatch step reads and writes.

    Attributes:
      step: updates done so far.
      params: online f and g ({'f': ..., 'g': ...}).
      target_params: their EMA (the target network of Eq. 8).
      opt_state: AdamP state.
    """

    step: jax.Array
    params: Any
    target_params: Any
    opt_state: Any


def steps_per_epoch(num_patches: int, batch_size: int) -> int:
    """Full batches per pass over the pool (at least one)."""
    if num_patches < 2:
        raise ValueError(
            f"ReConPatch needs at least 2 training patches, got {num_patches}"
        )
    return max(num_patches // batch_size, 1)


def effective_batch_size(num_patches: int, batch_size: int, devices: int) -> int:
    """The configured batch, capped at the pool size, a multiple of the devices."""
    size = min(batch_size, num_patches)
    size -= size % devices
    if size < 2:
        raise ValueError(
            f"reconpatch.batch_size={batch_size} leaves fewer than 2 patches per "
            f"step over {devices} devices with {num_patches} training patches."
        )
    return size


def cosine_per_epoch(lr: float, epochs: int, steps_in_epoch: int) -> optax.Schedule:
    """PyTorch `CosineAnnealingLR(T_max=epochs)` stepped once per epoch (eta_min 0)."""

    def schedule(count):
        epoch = count // steps_in_epoch
        return lr * 0.5 * (1.0 + jnp.cos(math.pi * epoch / epochs))

    return schedule


def make_optimizer(cfg: ml_collections.ConfigDict, steps_in_epoch: int):
    """AdamP (betas 0.9/0.999, delta 0.1, wd_ratio 0.1) with the cosine schedule."""
    schedule = cosine_per_epoch(cfg.lr, cfg.epochs, steps_in_epoch)
    return adamp.adamp(schedule, eps=cfg.eps, weight_decay=cfg.weight_decay)


def init_state(cfg, input_dim: int, tx, key) -> ModulationState:
    """f and g with PyTorch's Linear init; the target starts as their copy."""
    module = reconpatch.Modulation(cfg.feature_dim, cfg.projection_dim)
    params = module.init(key, jnp.zeros((1, input_dim), jnp.float32))["params"]
    return ModulationState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        target_params=jax.tree_util.tree_map(jnp.array, params),
        opt_state=tx.init(params),
    )


def _gather(x: jax.Array) -> jax.Array:
    """Replicates a batch-sharded array on every device (no-op off the mesh)."""
    mesh = jax.typeof(x).sharding.mesh
    if not mesh.axis_names:
        return x
    return jax.sharding.reshard(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )


def train_step(
    state: ModulationState,
    patches: jax.Array,
    *,
    cfg: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
) -> tuple[ModulationState, dict[str, jax.Array]]:
    """One ReConPatch update on a batch of frozen patch features `[N, C']`."""
    module = reconpatch.Modulation(cfg.feature_dim, cfg.projection_dim)
    # f and g run on each device's shard of the batch; the N x N pseudo-label
    # and distance matrices need every projection, so those are gathered.
    _, z_target = module.apply({"params": state.target_params}, patches)
    z_target = _gather(z_target)
    labels = reconpatch_loss.reconpatch_labels(
        z_target,
        alpha=cfg.alpha,
        sigma=cfg.sigma,
        k=cfg.k,
        normalize=cfg.normalize_pairwise,
    )

    def loss_fn(params):
        _, z = module.apply({"params": params}, patches)
        z = _gather(z)
        return reconpatch_loss.relaxed_contrastive_loss(z, labels, cfg.margin)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    target = jax.tree_util.tree_map(
        lambda t, p: cfg.ema * t + (1.0 - cfg.ema) * p, state.target_params, params
    )
    new_state = ModulationState(state.step + 1, params, target, opt_state)
    return new_state, {"loss": loss, "mean_label": jnp.mean(labels)}


def compile_train_step(cfg, tx, mesh):
    """`train_step` jitted over the mesh: state replicated (donated), batch sharded."""
    step_fn = functools.partial(train_step, cfg=cfg, tx=tx)
    return jax.jit(
        step_fn,
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0,
    )


def epoch_order(seed: int, epoch: int, num_patches: int) -> np.ndarray:
    """The deterministic visiting order of epoch `epoch` (so resuming is exact)."""
    return np.random.default_rng([seed, epoch]).permutation(num_patches)


def local_batch(pool: np.ndarray, order: np.ndarray, index: int, size: int, mesh):
    """This process's rows of global batch `index` of an epoch."""
    rows = parallel.process_part(mesh, order[index * size : (index + 1) * size])
    return pool[np.sort(rows)]


def train_modulation(
    config: ml_collections.ConfigDict,
    pool: np.ndarray,
    mesh,
    ckpt,
    save_fn,
    writer=None,
    desc: str = "reconpatch",
) -> tuple[Any, dict]:
    """Trains f and g on the patch pool, resuming from `ckpt` if it has a state.

    Args:
      config: run config (reads `reconpatch`, `seed`, `checkpoint`, `train.log_every`).
      pool: `[N, C']` frozen patch features of the training images.
      mesh: the data mesh.
      ckpt: the category's checkpoint manager (holds training states).
      save_fn: `save_fn(step, state)` writes a checkpoint.
      writer: optional `reports.MetricWriter`.
      desc: progress-bar label.

    Returns:
      The trained online parameters {'f', 'g'} and the last logged scalars.
    """
    cfg = config.reconpatch
    devices = jax.device_count()
    batch = effective_batch_size(len(pool), cfg.batch_size, devices)
    per_epoch = steps_per_epoch(len(pool), batch)
    total = cfg.epochs * per_epoch
    tx = make_optimizer(cfg, per_epoch)
    schedule = cosine_per_epoch(cfg.lr, cfg.epochs, per_epoch)  # for logging
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    state = parallel.replicate(mesh, init_state(cfg, pool.shape[1], tx, key))
    restored = checkpointing.restore_latest(ckpt, {"modulation": state}, set_aside=True)
    if restored is not None:
        state = restored["modulation"]
        console.say(f"{desc}: resuming at step {int(state.step)} of {total}")
    step_fn = compile_train_step(cfg, tx, mesh)
    step = int(jax.device_get(state.step))
    scalars: dict = {}
    order_epoch, order = -1, None
    watch = divergence.DivergenceWatch()
    progress = console.progress_bar(total, desc, "step", initial=step)
    with progress as bar, preemption.StopRequest() as stop:
        compiling = console.FirstCallNote(bar, "compiling the train step")
        while step < total:
            epoch, index = divmod(step, per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(config.seed, epoch, len(pool))
            patches = local_batch(pool, order, index, batch, mesh)
            sharded = parallel.global_batch(mesh, {"patches": patches})["patches"]
            state, metrics = step_fn(state, sharded)
            step += 1
            watch.add(step, metrics["loss"])
            compiling.done()
            bar.update(1)
            if step % config.train.log_every == 0 or step == total:
                watch.check(desc)
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                scalars["lr"] = float(schedule(step - 1))
                bar.set_postfix(loss=f"{scalars['loss']:.4f}")
                if writer is not None:
                    writer.scalars(step, {f"train/{k}": v for k, v in scalars.items()})
            stopping = stop.reached(step, ckpt) and step < total
            if stopping or (step % config.checkpoint.every == 0 and step < total):
                watch.check(desc)  # a diverged state is never saved
                divergence.ensure_finite(state, desc, step)
                save_fn(step, state)
            if stopping:
                raise stop.stop(desc, step, ckpt.directory)
    watch.check(desc)
    divergence.ensure_finite(state, desc, step)
    return jax.device_get(state.params), {**scalars, "steps": float(total)}


def train_head(config, pool, mesh, ckpt, writer, desc: str):
    """`patchcore.fit_model`'s head trainer: f and g, checkpointed in `ckpt`."""

    def save(step, state):
        checkpointing.save(ckpt, step, {"modulation": state})

    return train_modulation(config, pool, mesh, ckpt, save, writer, desc)


def fit(
    config, workdir: str, category: str, train_samples, mesh, writer, evaluate_fn=None
):
    """PatchCore's fit with the trained modulation (see `patchcore.fit`)."""
    return patchcore.fit(
        config, workdir, category, train_samples, mesh, writer, evaluate_fn,
        train_head=train_head,
    )  # fmt: skip


restore = patchcore.restore
compile_predict = patchcore.compile_predict
configured_predict = patchcore.configured_predict
model_step = patchcore.model_step
host_model = patchcore.host_model
