"""Multi-process start-up: `jax.distributed` on several hosts, SLURM jobs and TPU pods.

Call `initialize()` once, before anything touches a JAX device. It works out
how the program was launched and initialises `jax.distributed` only when there
is more than one process:

1. explicit settings: `coordinator_address`, `num_processes`, `process_id`
   (the `--coordinator_address/--num_processes/--process_id` flags of
   `main.py`) or the environment variables `RECONTRAST_COORDINATOR`,
   `RECONTRAST_NUM_PROCESSES`, `RECONTRAST_PROCESS_ID`;
2. a SLURM step with `SLURM_NTASKS > 1` or an Open MPI job with
   `OMPI_COMM_WORLD_SIZE > 1` (JAX reads the rest from the environment; on
   GPUs each task gets the GPU numbered by its local task id);
3. a Cloud TPU VM (libtpu installed and TPU device nodes present): JAX asks the
   TPU metadata for the workers of the slice (one process on a single host).

Anything else is a plain single process and nothing is done. `mode='on'`
always calls `jax.distributed.initialize()` with JAX's own cluster detection
(e.g. Kubernetes, mpi4py); `mode='off'` never initialises.

On CPU, cross-process collectives need an implementation
(`jax_cpu_collectives_implementation`): JAX 0.10 defaults to gloo (TCP); when a
JAX build leaves it unset, it is set to gloo here.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Mapping

import jax
from absl import logging

MODES = ("auto", "on", "off")
ENV_COORDINATOR = "RECONTRAST_COORDINATOR"
ENV_NUM_PROCESSES = "RECONTRAST_NUM_PROCESSES"
ENV_PROCESS_ID = "RECONTRAST_PROCESS_ID"
ENV_MODE = "RECONTRAST_DISTRIBUTED"


class DistributedSetupError(ValueError):
    """The multi-process settings are incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started.

    Attributes:
      method: 'single' (nothing to initialise), 'explicit', 'slurm', 'ompi',
        'tpu', 'jax-auto' (JAX's own cluster detection) or 'external'
        (`jax.distributed` was initialised before `initialize` ran).
      coordinator_address: host:port of process 0 (None: JAX detects it).
      num_processes: number of processes (None: JAX detects it).
      process_id: this process's index (None: JAX detects it).
    """

    method: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def multi_process(self) -> bool:
        return self.method != "single"


def _int_setting(value, name: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedSetupError(
            f"{name} must be an integer, got {value!r}."
        ) from None


def _explicit_launch(coordinator_address, num_processes, process_id, environ):
    """The explicitly requested launch, or None when nothing was given."""
    address = coordinator_address or environ.get(ENV_COORDINATOR) or None
    count = _int_setting(
        num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES),
        f"num_processes (--num_processes or {ENV_NUM_PROCESSES})",
    )
    index = _int_setting(
        process_id if process_id is not None else environ.get(ENV_PROCESS_ID),
        f"process_id (--process_id or {ENV_PROCESS_ID})",
    )
    if address is None and count is None and index is None:
        return None
    if count == 1 and index in (None, 0):
        return Launch("single")
    missing = [
        name
        for name, value in (
            (f"--coordinator_address or {ENV_COORDINATOR}", address),
            (f"--num_processes or {ENV_NUM_PROCESSES}", count),
            (f"--process_id or {ENV_PROCESS_ID}", index),
        )
        if value is None
    ]
    if missing:
        raise DistributedSetupError(
            "A multi-process launch needs the coordinator address, the number of "
            f"processes and this process's id; missing: {', '.join(missing)}."
        )
    if count < 1 or not 0 <= index < count:
        raise DistributedSetupError(
            f"process_id must be in [0, num_processes): got process_id={index}, "
            f"num_processes={count}."
        )
    if ":" not in address:
        raise DistributedSetupError(
            f"coordinator address {address!r} must be host:port (e.g. 10.0.0.1:1234)."
        )
    return Launch("explicit", address, count, index)


def running_on_cloud_tpu_vm() -> bool:
    """libtpu is installed and TPU chips are attached (v2-v4 accel, v5+ vfio)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def detect(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str | None = None,
    environ: Mapping[str, str] | None = None,
    on_tpu_vm: bool | None = None,
) -> Launch:
    """Works out how this process was launched (no side effects).

    Args:
      coordinator_address: host:port of process 0, or None.
      num_processes: number of processes, or None.
      process_id: this process's index, or None.
      mode: 'auto' (default), 'on' or 'off'; None reads `RECONTRAST_DISTRIBUTED`.
      environ: the environment (default `os.environ`).
      on_tpu_vm: whether this is a Cloud TPU VM (default: look at the machine).

    Returns:
      The detected `Launch`.

    Raises:
      DistributedSetupError: on an unknown mode or incomplete explicit settings.
    """
    environ = os.environ if environ is None else environ
    mode = mode or environ.get(ENV_MODE) or "auto"
    if mode not in MODES:
        raise DistributedSetupError(
            f"distributed mode {mode!r} (--distributed or {ENV_MODE}) is not one of {MODES}."
        )
    if mode == "off":
        return Launch("single")
    explicit = _explicit_launch(coordinator_address, num_processes, process_id, environ)
    if explicit is not None:
        return explicit
    if mode == "on":
        return Launch("jax-auto")
    slurm_tasks = _int_setting(environ.get("SLURM_NTASKS"), "SLURM_NTASKS")
    if slurm_tasks and slurm_tasks > 1:
        return Launch("slurm", num_processes=slurm_tasks)
    mpi_size = _int_setting(environ.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE")
    if mpi_size and mpi_size > 1:
        return Launch("ompi", num_processes=mpi_size)
    if running_on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm:
        return Launch("tpu")
    return Launch("single")


def enable_cpu_collectives() -> None:
    """Makes sure CPU devices of different processes can run collectives."""
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str | None = None,
) -> Launch:
    """Initialises `jax.distributed` when running as one of several processes.

    Must run before any JAX computation or device query. Calling it again
    (or after `jax.distributed.initialize` was called elsewhere) does nothing.

    Args:
      coordinator_address: host:port of process 0 (or `RECONTRAST_COORDINATOR`).
      num_processes: number of processes (or `RECONTRAST_NUM_PROCESSES`).
      process_id: this process's index (or `RECONTRAST_PROCESS_ID`).
      mode: 'auto' (default), 'on' or 'off' (or `RECONTRAST_DISTRIBUTED`).

    Returns:
      The detected `Launch`.
    """
    if jax.distributed.is_initialized():
        logging.info("jax.distributed is already initialised.")
        return Launch("external")
    launch = detect(coordinator_address, num_processes, process_id, mode)
    if not launch.multi_process:
        logging.info("Single process: jax.distributed not initialised.")
        return launch
    logging.info(
        "Multi-process launch detected (%s): coordinator=%s, processes=%s, "
        "process id=%s (None: detected by JAX).",
        launch.method,
        launch.coordinator_address,
        launch.num_processes,
        launch.process_id,
    )
    enable_cpu_collectives()
    if launch.method == "explicit":
        jax.distributed.initialize(
            launch.coordinator_address, launch.num_processes, launch.process_id
        )
    elif launch.method == "tpu":
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as e:
            # A lone TPU VM runs fine without the distributed service.
            logging.warning("TPU VM: jax.distributed not initialised (%s).", e)
            return Launch("single")
    else:
        jax.distributed.initialize()
    logging.info(
        "jax.distributed initialised: process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return launch
