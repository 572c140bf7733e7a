"""What the person at the terminal sees: status lines and progress bars.

Both go to stderr, from process 0 only, so a multi-host run prints once and
stdout keeps only the final results. Lines are written through tqdm so that
they do not tear a bar that is being drawn.
"""

from __future__ import annotations

import sys

import jax
import tqdm


def say(message: str) -> None:
    """One status line on stderr (process 0)."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stderr)


_said: set[str] = set()


def start_run() -> None:
    """Forgets the lines `say_once` has said: each run says its notes once."""
    _said.clear()


def say_once(key: str, message: str) -> None:
    """`say`, the first time a line of this kind comes up in the run: a note
    that applies to every category is read once, not once per category."""
    if key not in _said:
        _said.add(key)
        say(message)


def devices_description() -> str:
    """'1 CPU device', '8 TPU devices in 2 processes': what a run computes on."""
    count, platform = jax.device_count(), jax.devices()[0].platform.upper()
    text = f"{count} {platform} device{'s' if count > 1 else ''}"
    if jax.process_count() > 1:
        text += f" in {jax.process_count()} processes"
    return text


def progress_bar(
    total: int, desc: str, unit: str, initial: int = 0, disable=False, **kwargs
):
    """A tqdm bar on stderr, named `desc`, shown on process 0 only."""
    return tqdm.tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=disable or jax.process_index() != 0,
        dynamic_ncols=True,
        **kwargs,
    )


class FirstCallNote:
    """Shows `note` as a bar's postfix until the first update (compilation)."""

    def __init__(self, bar, note: str):
        self.bar, self.pending = bar, True
        bar.set_postfix_str(note)

    def done(self) -> None:
        if self.pending:
            self.pending = False
            self.bar.set_postfix_str("")
