"""Checkpoints and run identities shared by the encoder trainer and the U-Net trainer.

A checkpoint is a dict written atomically with ``torch.save``; it carries a ``format`` tag, the
``config`` it was made with (a resume must match it exactly) and the RNG state of Python, numpy,
torch and CUDA, so ``--resume`` continues exactly. A run identity (``run.json``) is what
``--resume`` of a whole run must match.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mris.errors import BadParameter
from mris.fsutil import atomic_write


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(
    path: Path, device: torch.device, fmt: str, config: dict[str, Any], what: str
) -> dict[str, Any]:
    """Load ``path`` and check its format tag and config against ``config``; ``ValueError``
    (saying which settings differ) otherwise. ``what`` names the checkpoint kind in messages."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on a bad file
        raise ValueError(f"cannot resume from {path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"cannot resume from {path}: not an {what} checkpoint")
    theirs = state["config"]
    if config != theirs:
        diff = sorted(k for k in set(config) | set(theirs) if config.get(k) != theirs.get(k))
        raise ValueError(
            f"cannot resume from {path}: it was made with a different setting ({', '.join(diff)})"
        )
    return state


def autocast_for(device: torch.device):
    """bf16 mixed precision on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def as_stored(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity as ``run.json`` holds it (through JSON: tuples become lists), so a resume
    compares like with like."""
    return json.loads(json.dumps(identity))


def check_resumable(run_json: Path, identity: dict[str, Any], what: str) -> None:
    """``--resume``: ``run_json`` must exist and record the same ``identity`` (``BadParameter``)."""
    train_dir = run_json.parent
    if not run_json.is_file():
        raise BadParameter(f"--resume: {train_dir} holds no {what} to resume (no run.json)")
    previous = json.loads(run_json.read_text())
    changed = sorted(k for k in identity if previous.get(k) != identity[k])
    if changed:
        raise BadParameter(
            f"--resume: the run in {train_dir} was started with a different {', '.join(changed)}"
        )
