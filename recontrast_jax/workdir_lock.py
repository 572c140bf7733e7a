"""One training run per workdir at a time.

Two runs in one workdir would train the same categories and write the same
checkpoint directories at once. `held(workdir)` takes an exclusive `flock` on
`<workdir>/.lock` for the run's lifetime and writes the holder's PID into it.
The kernel drops the lock when its process ends, however it ends (a SIGKILL
or a crash included), so a stale lock file never blocks the next run. Only
process 0 locks (with several hosts they share one workdir); object-store
paths (`gs://...`), which have no `flock`, are not locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import jax

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    pid = os.read(fd, 32).decode(errors="replace").strip()
    return f"PID {pid}" if pid else "a process that has not written its PID yet"


@contextlib.contextmanager
def held(workdir: str):
    """Holds `workdir`'s lock in this block (creating the workdir if needed).

    Raises:
      WorkdirBusy: another live process holds it (the message names the
        workdir and the holder's PID).
    """
    if "://" in workdir or jax.process_index() != 0:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusy(
                f"{os.path.abspath(workdir)} is in use by another run ({_holder(fd)}):"
                " wait for it to end, or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
