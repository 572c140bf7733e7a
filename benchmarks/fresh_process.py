"""Runs benchmark code in a fresh Python process and reads back its result."""

import json
import subprocess
import sys


def run_json(code: str, *args: object) -> dict:
    """Runs `code` with `args` as argv in a new interpreter (so peak memory is
    its own) and returns the JSON object printed on its last stdout line."""
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
