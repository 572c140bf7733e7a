"""Command-line entry: `python -m recontrast_jax.main --config C --workdir W`.

`--config.mode` picks what to do: train (default; resumes), evaluate, predict
(`--config.predict.input=DIR`) or export. This is the only module that reads
it: train and evaluate are `run.run(fit=...)`, predict and export their
modules' entry points. Several processes (hosts, SLURM
tasks, a TPU pod's workers) run the same command; `distributed.initialize`
joins them first (see `--coordinator_address`, `--num_processes`,
`--process_id`, `--distributed`).
"""

from __future__ import annotations

import ast
import logging as std_logging
import re
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from recontrast_jax import (
    checkpointing,
    config_checks,
    default_config,
    distributed,
    divergence,
    export,
    predict,
    preemption,
    pretrained,
    reports,
    run,
    runtimes,
    workdir_lock,
)
from recontrast_jax.data import folder

MODES = default_config.MODES
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and heatmaps.")
flags.mark_flags_as_required(["config", "workdir"])
flags.DEFINE_enum(
    "distributed",
    None,
    distributed.MODES,
    "Multi-process start-up: auto (default: explicit settings, SLURM, Open MPI, "
    "Cloud TPU VM), on (JAX's own cluster detection) or off. "
    f"Default from ${distributed.ENV_MODE}.",
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    f"host:port of process 0 for a manual multi-process launch (${distributed.ENV_COORDINATOR}).",
)
flags.DEFINE_integer(
    "num_processes",
    None,
    f"Number of processes of a manual launch (${distributed.ENV_NUM_PROCESSES}).",
)
flags.DEFINE_integer(
    "process_id",
    None,
    f"This process's index in a manual launch (${distributed.ENV_PROCESS_ID}).",
)


def quiet_library_logs() -> None:
    """Library logs only with an explicit `--verbosity=0` or higher (then
    without Orbax's per-save INFO chatter).

    By default INFO logs (absl's, JAX's probing for a TPU) are off, Orbax says
    nothing (the errors it logs come back as this program's own one-line
    errors and warnings), and other warnings are one plain line each.
    """
    verbose = FLAGS["verbosity"].present
    level = std_logging.WARNING if verbose else std_logging.CRITICAL + 1
    logging.get_absl_logger().addFilter(
        lambda record: record.levelno >= level or "orbax" not in record.pathname
    )
    if not verbose:
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().setFormatter(PlainFormatter())


class PlainFormatter(std_logging.Formatter):
    """'warning: <message>', like the console's own lines."""

    def format(self, record: std_logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def config_load_error(error: Exception) -> str:
    """One line for a config file that cannot load or a bad `--config.*` flag.

    ml_collections reports these when the config is first read, as an
    AttributeError whose text is a repr (quotes, `\\n`) or a multi-line OSError.
    """
    text = str(error)
    if text[:1] in "'\"":
        try:
            text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    unknown = re.match(r"'([^']+)'\s*Did you mean \"([^\"]+)\"", text)
    if unknown:
        return (
            f"--config: unknown field {unknown.group(1)!r} "
            f"(did you mean {unknown.group(2)!r}?)"
        )
    missing = re.search(r"\[Errno \d+\] ([^:]+): '([^']+)'", text)
    if missing:
        return f"--config: cannot load {missing.group(2)}: {missing.group(1)}"
    return "--config: " + " ".join(text.split())


def main(argv):
    del argv
    quiet_library_logs()
    try:
        config = FLAGS.config
        config_checks.validate(config)
    except config_checks.ConfigError as e:
        fail(str(e))
    except (AttributeError, OSError, KeyError, TypeError, ValueError) as e:
        fail(config_load_error(e))
    try:  # before anything touches a device
        distributed.initialize(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.distributed,
        )
    except distributed.DistributedSetupError as e:
        fail(str(e))
    logging.info(
        "JAX %s: process %d/%d, %d local / %d global devices (%s)",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    workdir = FLAGS.workdir
    try:
        if config.mode == "train":
            run.prepare_workdir(workdir)  # names an unwritable workdir first
            with workdir_lock.held(workdir):
                report(run.run(config, workdir), workdir)
        elif config.mode == "evaluate":
            report(run.run(config, workdir, fit=False), workdir)
        elif config.mode == "predict":
            predict.predict(config, workdir)
        elif config.mode == "export":
            for directory in export.export_categories(config, workdir):
                print(f"exported: {directory}")
        else:
            raise ValueError(f"Unknown config.mode {config.mode!r}: use {MODES}.")
    except preemption.Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(preemption.EXIT_CODE)
    except (
        folder.DatasetError,
        divergence.TrainingDiverged,
        checkpointing.ConfigMismatchError,
        checkpointing.CheckpointWriteError,
        reports.WriteError,
        workdir_lock.WorkdirBusy,
        run.WorkdirError,
        FileNotFoundError,
        pretrained.PretrainedWeightsError,
        pretrained.ConversionError,
        export.ExportError,
        runtimes.RuntimeUnavailable,
    ) as e:
        fail(str(e))


def fail(message: str) -> None:
    """One `error:` line and exit status 1; the traceback too at --verbosity=1."""
    if logging.get_verbosity() >= logging.DEBUG:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def report(summary: dict, workdir: str) -> None:
    """Prints the mean metrics and where the results are."""
    print("mean over categories: " + reports.metrics_line(summary["mean"]))
    print(f"results: {workdir}/results.md, metrics: {workdir}/metrics.json")


def parse_flags(argv):
    """absl's parsing, with a bad `--config.*` override reported in one line.

    ml_collections applies overrides while the flags are parsed, before `main`.
    """
    try:
        return FLAGS(argv)
    except flags.Error as e:  # e.g. a missing --workdir, --config.train.steps=abc
        print(f"error: {e}", file=sys.stderr)
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
        print(f"error: {config_load_error(e)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
