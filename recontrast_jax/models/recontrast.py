"""The ReContrast model: trainable encoder, frozen encoder, cross reconstruction.

`ReContrast` holds the trainable encoder E, the bottleneck and the decoder. The
frozen encoder E_f is the same encoder (`backbones.make_encoder`) applied with a separate, never
optimised copy of the variables (always in inference-mode BatchNorm); its
features are passed in. Pairing (spec 1.4): the trainable and frozen features
are concatenated along the batch (2B) and decoded together; head set 0 decoded
from the trainable half reconstructs the frozen features, head set 1 decoded
from the frozen half reconstructs the trainable features.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from recontrast_jax.models import backbones, layers
from recontrast_jax.models.de_resnet import Decoder, FusionBottleneck

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the authors' scripts change the network (hashable: a static argument).

    Attributes:
      decoder_activation: 'relu'; 'gelu' (exact erf) in the multi-class scripts.
      partial_norm_threshold: > 0 puts PartialNorm with this variance
        threshold in the trainable encoder (the stable scripts: 5e-4).
      encoder_bn_epsilon: the trainable encoder's BatchNorm epsilon (the
        stable scripts set 1e-6 after copying E_f, which keeps 1e-5).
    """

    decoder_activation: str = "relu"
    partial_norm_threshold: float = 0.0
    encoder_bn_epsilon: float = 1e-5

    def encoder_norm(self):
        """The trainable encoder's normalisation layer."""
        return functools.partial(
            layers.BatchNorm,
            epsilon=self.encoder_bn_epsilon,
            partial_var_threshold=self.partial_norm_threshold,
        )


PAPER_VARIANT = Variant()  # the single-class scripts' network


class ReContrast(nn.Module):
    """Trainable encoder + bottleneck + decoder of ReContrast.

    Attributes:
      arch: encoder architecture, one of `backbones.known_archs()` (the paper:
        ResNets; others get a decoder sized from their feature channels).
      variant: the network changes of the multi-class and stable scripts.
    """

    arch: str
    variant: Variant = PAPER_VARIANT

    def setup(self):
        norm = None if self.variant == PAPER_VARIANT else self.variant.encoder_norm()
        self.encoder = backbones.make_encoder(self.arch, norm)
        self.bottleneck = FusionBottleneck(self.arch)
        self.decoder = Decoder(self.arch, self.variant.decoder_activation)

    def __call__(
        self,
        x: jax.Array,
        frozen_features: list[jax.Array] | None,
        *,
        train: bool,
        encoder_train: bool,
    ) -> tuple[list[jax.Array], list[jax.Array]]:
        """Runs cross reconstruction.

        Args:
          x: normalised images (B, H, W, 3).
          frozen_features: the frozen encoder's three maps for `x`. `None` uses
            the trainable encoder's own (stop-gradient) maps; only meant for
            shape inference at `init`.
          train: BatchNorm mode of bottleneck and decoder.
          encoder_train: BatchNorm mode of the trainable encoder.

        Returns:
          `(targets, reconstructions)`, six maps each, aligned pairwise:
          targets `[f1, f2, f3, e1, e2, e3]` (frozen then trainable features,
          gradient stopped) and reconstructions `[head0(trainable half) x3,
          head1(frozen half) x3]`.
        """
        trainable = self.encoder(x, train=encoder_train)
        if frozen_features is None:
            frozen_features = [jax.lax.stop_gradient(e) for e in trainable]
        joint = [
            jnp.concatenate([e, f], axis=0)
            for e, f in zip(trainable, frozen_features, strict=True)
        ]
        decoded = self.decoder(self.bottleneck(joint, train=train), train=train)
        batch = x.shape[0]
        reconstructions = [d[:batch] for d in decoded[:3]] + [
            d[batch:] for d in decoded[3:]
        ]
        targets = [jax.lax.stop_gradient(f) for f in (*frozen_features, *trainable)]
        return targets, reconstructions


def frozen_encoder_features(
    arch: str, frozen_variables: Variables, x: jax.Array
) -> list[jax.Array]:
    """Features of the frozen encoder: inference-mode BatchNorm, no gradient.

    The convolutions run in `x`'s dtype (float32 parameters are cast to it);
    BatchNorm statistics stay float32.
    """
    params = layers.cast_floating(frozen_variables["params"], x.dtype)
    variables = {**frozen_variables, "params": params}
    features = backbones.make_encoder(arch).apply(variables, x, train=False)
    return [jax.lax.stop_gradient(f) for f in features]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _initialised(arch: str, rng: jax.Array, image_size: int) -> Variables:
    """`ReContrast.init` as one compiled program: run op by op, the forward
    pass it traces costs a compilation per operation (12 s for resnet_tiny at
    32 px, 6 s jitted; the next category of the same shape reuses it)."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return ReContrast(arch).init(rng, dummy, None, train=False, encoder_train=False)


def init_variables(
    arch: str, rng: jax.Array, image_size: int
) -> tuple[Variables, Variables]:
    """Initialises ReContrast and the frozen encoder copy.

    Returns:
      `(variables, frozen_variables)`: `variables` has `params` and `batch_stats`
      with top-level keys `encoder`, `bottleneck`, `decoder`; `frozen_variables`
      is a copy of the encoder's variables (E_f = deepcopy(E) before training).
    """
    variables = dict(_initialised(arch, rng, image_size))
    frozen = {
        "params": variables["params"]["encoder"],
        "batch_stats": variables["batch_stats"]["encoder"],
    }
    frozen = jax.tree_util.tree_map(jnp.array, frozen)
    return variables, frozen
