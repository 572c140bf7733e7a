"""Device mesh and shardings for data parallelism with `jax.jit`.

One mesh axis, `data`, spans every device of every process. Batches are sharded
along it and the training state is replicated, so BatchNorm statistics computed
inside a jitted step are global: results do not depend on the device count.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices (all processes) named `data`."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shards the leading (batch) dimension over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Replicates an array on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch(
    mesh: Mesh, local_batch: dict[str, np.ndarray]
) -> dict[str, jax.Array]:
    """Assembles this process's batch slice into globally sharded arrays.

    Args:
      mesh: the data mesh.
      local_batch: numpy arrays whose leading dimension is this process's part
        of the global batch (the whole batch on a single host); it must divide
        evenly over the local devices.

    Returns:
      The same keys as global `jax.Array`s sharded along the batch.
    """
    sharding = batch_sharding(mesh)
    local_devices = jax.local_device_count()
    out = {}
    for key, value in local_batch.items():
        if value.shape[0] % local_devices:
            raise ValueError(
                f"Batch of {value.shape[0]} ({key!r}) does not divide over "
                f"{local_devices} local devices."
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def replicate(mesh: Mesh, tree):
    """Places a pytree on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
