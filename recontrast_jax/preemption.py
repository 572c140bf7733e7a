"""Stop training cleanly on SIGTERM or SIGINT: checkpoint the step, then exit.

A preempted cloud VM's processes get SIGTERM and about 30 s of grace. The
training loops ask `StopRequest.reached(step)` after every step; once it is
true they save a checkpoint of that step and raise `Preempted`, which the
command line turns into one line and exit status `EXIT_CODE`. Rerunning the
same command resumes from that checkpoint.

With several processes every host must stop at the same step. There the
decision is orbax's `CheckpointManager.reached_preemption`, JAX's
preemption sync point (`multihost_utils.reached_preemption_sync_point`), whose
coordination service watches for the signal on every host. A single process watches for it itself: the
handler only sets a flag, so the step in flight finishes. A second SIGINT
interrupts at once, as Ctrl-C normally does.
"""

from __future__ import annotations

import signal

import jax

# EX_TEMPFAIL (sysexits.h): a temporary failure; rerunning continues the work.
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after checkpointing its current step."""


class StopRequest:
    """Whether a stop was requested, as a context that installs the handlers."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)  # second Ctrl-C: now
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        if jax.process_count() == 1:
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def reached(self, step: int, manager) -> bool:
        """True at the step where every process should checkpoint and stop.

        Args:
          step: the step just taken.
          manager: the run's orbax `CheckpointManager` (asked with several
            processes).
        """
        if jax.process_count() > 1:
            if manager.reached_preemption(step):
                self.signal_name = self.signal_name or "a preemption notice"
                return True
            return False
        return self.signal_name is not None

    def stop(self, what: str, step: int, directory: str) -> Preempted:
        """The exception to raise once step `step` is saved in `directory`."""
        return Preempted(
            f"{what}: stopped on {self.signal_name} after step {step}, saved in "
            f"{directory}; run the same command again to resume from there"
        )
