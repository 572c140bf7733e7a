"""The console says a note that applies to every category once per run."""

import contextlib
import io

from recontrast_jax import console, run


def said(categories):
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        for category in categories:
            run.say_threshold(category, {"image": 1.0, "rule": "r", "note": "few"})
    return out.getvalue().splitlines()


def test_a_note_is_said_once_per_run_and_each_threshold_every_time():
    console.start_run()
    assert said(["brick", "grass"]) == [
        "brick: image threshold 1 = r",
        "brick: note: few",
        "grass: image threshold 1 = r",
    ]
    assert said(["gravel"]) == ["gravel: image threshold 1 = r"]  # same run
    console.start_run()
    assert said(["gravel"]) == ["gravel: image threshold 1 = r", "gravel: note: few"]
