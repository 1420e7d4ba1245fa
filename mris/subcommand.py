"""Run another ``mris`` command as a child process (its own progress bars and summary, exactly
what a user typing it sees); used by ``mris demo`` and ``mris evaluate`` for their stages."""

from __future__ import annotations

import subprocess
import sys

from mris.errors import MrisError
from mris.progress import console


def run_mris(*args: str) -> None:
    """``mris ARGS...`` with this interpreter; a failure raises ``MrisError`` naming the command
    (the child has already printed its own one-line error)."""
    command = [sys.executable, "-m", "mris.cli", *args]
    console.print(f"[dim]$ mris {' '.join(args)}[/]")
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise MrisError(f"'mris {args[0]}' failed with exit code {result.returncode}")
