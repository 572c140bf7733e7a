"""ReContrast's compute: state, optimiser, train step and predict.

Everything here is pure jax/flax/optax and imports neither TensorFlow nor
ml_collections, so the step and predict run (and are benchmarked, see
`benchmarks/accelerator_check.py`) on machines that have only the JAX stack.
The training loop, checkpoints and data live in `methods/recontrast.py`.

The step is a pure module-level function, jitted with the state donated. The
state is replicated over the device mesh and batches are sharded along it
(see `parallel.py`).
"""

from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from recontrast_jax import anomaly_maps, losses, parallel
from recontrast_jax import pretrained as pretrained_lib
from recontrast_jax.methods import torch_adamw
from recontrast_jax.models import layers
from recontrast_jax.models import recontrast as recontrast_model

if TYPE_CHECKING:
    import ml_collections


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
    clipping. The single-class scripts have no schedule; the multi-class ones
    use PyTorch's AMSGrad (`amsgrad`) and a MultiStepLR (`lr_milestones`,
    `lr_gamma`), which act on each group alike. The stable ones restart the
    decoder group's state every `reset_decoder_every` updates and then skip
    the encoder group for `encoder_pause_after_reset` updates.
    """

    def adamw(lr):
        return torch_adamw.adamw(
            torch_adamw.multistep_lr(lr, tuple(config.lr_milestones), config.lr_gamma),
            b1=config.beta1,
            b2=config.beta2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            amsgrad=config.amsgrad,
        )

    decoder, encoder = adamw(config.lr_decoder), adamw(config.lr_encoder)
    if config.reset_decoder_every:
        period = int(config.reset_decoder_every)
        decoder = torch_adamw.reset_every(decoder, period)
        if config.encoder_pause_after_reset:
            pause = int(config.encoder_pause_after_reset)
            encoder = torch_adamw.pause_after_resets(encoder, period, pause)
    return optax.partition({"encoder": encoder, "decoder": decoder}, parameter_groups)


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
    variant: recontrast_model.Variant = recontrast_model.PAPER_VARIANT,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One ReContrast update (pure; jit it with the static keyword arguments bound).

    Args:
      state: current state.
      images: normalised images (B, H, W, 3), sharded along the batch.
      frozen_features: E_f's features of `images` if already known (see
        `frozen_feature_cache`); computed here when None.
      dtype: compute dtype, 'float32' or 'bfloat16' (parameters, BatchNorm
        statistics, loss and updates stay float32).
      variant: the multi-class / stable network changes (`model_variant`).
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
    model = recontrast_model.ReContrast(arch, variant)
    # PartialNorm's floors come from the pretrained statistics, which E_f keeps.
    pretrained_stats = {"encoder": state.frozen["batch_stats"]}

    def loss_fn(params):
        (targets, recons), updated = model.apply(
            {
                "params": layers.cast_floating(params, compute),
                "batch_stats": state.batch_stats,
                "pretrained_stats": pretrained_stats,
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


def model_variant(config: ml_collections.ConfigDict) -> recontrast_model.Variant:
    """The network changes a config asks for (`model.*`)."""
    return recontrast_model.Variant(
        decoder_activation=config.model.decoder_activation,
        partial_norm_threshold=float(config.model.partial_norm_threshold),
        encoder_bn_epsilon=float(config.model.encoder_bn_epsilon),
    )


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
        variant=model_variant(config),
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


# sha256 of a lowered train step's text -> its executable. Every category of a
# run lowers the same program (a new jit object each time), and compiling the
# paper or quickstart step takes 15-20 s: identical programs compile once.
_EXECUTABLES: dict[str, jax.stages.Compiled] = {}


def compile_once(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """`lowered.compile()`, reused for any later program with the same text."""
    key = hashlib.sha256(lowered.as_text().encode()).hexdigest()
    if key not in _EXECUTABLES:
        _EXECUTABLES[key] = lowered.compile()
        parallel.release_host_memory()
    return _EXECUTABLES[key]


def batch_step(step_fn, cache: list[jax.Array] | None):
    """`step(state, global_batch_dict)` over a jitted (cached or plain) step.

    Each new batch shape (the last batch of an epoch can be smaller) is
    compiled ahead of time (`compile_once`), and the compiler's freed host
    memory is released (`parallel.release_host_memory`) before that step runs.
    """
    compiled = {}

    def step(state, batch):
        args = (state, batch["image"])
        if cache is not None:
            args = (*args, batch["index"], cache)
        shape = batch["image"].shape
        if shape not in compiled:
            compiled[shape] = compile_once(step_fn.lower(*args))
        return compiled[shape](*args)

    return step


def predict(
    state,
    images: jax.Array,
    *,
    arch: str,
    sigma: float,
    score_rule: str,
    max_ratio: float,
    dtype: str = "float32",
    variant: recontrast_model.Variant = recontrast_model.PAPER_VARIANT,
    map_rule: str = "sum",
    border: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Anomaly maps (B, H, W) and image scores (B,) for normalised images.

    Both reconstruction directions are used: the map is the sum of the six
    cosine-distance maps, upsampled with align_corners and Gaussian-blurred
    (`map_rule` 'mean_conv5': their mean, blurred by the multi-class scripts'
    5x5 kernel; `border` > 0 first replaces the map's edge, see
    `anomaly_maps.replace_border`). The networks run in `dtype`; the maps are
    computed in float32.
    """
    compute = layers.compute_dtype(dtype)
    cast = functools.partial(layers.cast_floating, dtype=compute)
    variables = {"params": cast(state.params), "batch_stats": state.batch_stats}
    images_c = images.astype(compute)
    frozen_features = recontrast_model.frozen_encoder_features(
        arch, state.frozen, images_c
    )
    targets, recons = recontrast_model.ReContrast(arch, variant).apply(
        variables, images_c, frozen_features, train=False, encoder_train=False
    )
    targets, recons = ([x.astype(jnp.float32) for x in m] for m in (targets, recons))
    maps = anomaly_maps.anomaly_map(
        targets, recons, images.shape[1:3], sigma, map_rule, border
    )
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
        variant=model_variant(config),
        map_rule=config.eval.map_rule,
        border=int(config.eval.border),
    )


def compile_predict(config: ml_collections.ConfigDict, mesh):
    """Jits `predict` with the config's static settings over the mesh."""
    return jax.jit(
        configured_predict(config),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(parallel.batch_sharding(mesh), parallel.batch_sharding(mesh)),
    )
