"""`config.method` -> its module in `methods/` (the one place that dispatches)."""

from __future__ import annotations

import types

from recontrast_jax.methods import patchcore, reconpatch, recontrast

METHODS: dict[str, types.ModuleType] = {
    "recontrast": recontrast,
    "patchcore": patchcore,
    "reconpatch": reconpatch,
}


def get(name: str) -> types.ModuleType:
    """The module of method `name` (`config.method`)."""
    if name not in METHODS:
        raise ValueError(
            f"Unknown config.method {name!r}: use one of {sorted(METHODS)}."
        )
    return METHODS[name]
