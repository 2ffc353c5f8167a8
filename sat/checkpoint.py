"""Checkpoints: everything a resumed run needs, written atomically, read without executing code.

Write: temporary file in the same folder, flush and fsync, then rename over the target (and fsync the
folder), so a crash leaves either the old checkpoint or the new one, never a torn file. Read:
torch.load(weights_only=True), which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """Missing, corrupt or mismatched checkpoint; the message says what to do (exit code 2)."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first (main_train.py) or check --random/--name/--task")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types here (UnpicklingError for refused content, zip errors...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a SAT checkpoint ({first}); delete it and "
                              f"retrain, or use the other saved checkpoint") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a SAT checkpoint of format {FORMAT_VERSION}; retrain to create one")
    return state
