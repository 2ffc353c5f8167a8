"""Checkpoints: everything a resumed run needs, written atomically, read without executing code.

Write: temporary file in the same folder, flush and fsync, then rename over the target (and fsync the
folder), so a crash leaves either the old checkpoint or the new one, never a torn file. A temporary file that
a killed process left behind (SIGKILL mid-write) is removed by the next save of the same checkpoint. Read:
first every record's CRC-32 is checked (torch.load alone would accept flipped bytes inside a tensor), then
torch.load(weights_only=True), which refuses anything but tensors and plain containers (a pickled object
is refused without being run), then a check that the state has the keys and types every reader relies on.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from sat.config import SECTIONS
from sat.fileio import atomic_write
from sat.run_state import REQUIRED  # what a checkpoint holds, declared once (PARTS)

FORMAT_VERSION = 1



class CheckpointError(Exception):
    """Missing, corrupt or mismatched checkpoint; the message says what to do (exit code 2)."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT_VERSION, **state}, f))


def _verify_crc(path: Path) -> None:
    """Every record of the checkpoint (a zip archive) against its CRC-32; raises CheckpointError."""
    redo = "delete it and retrain, or use the other saved checkpoint"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # not a zip, truncated, damaged directory...
        raise CheckpointError(f"checkpoint {path} is corrupt or not a SAT checkpoint ({type(e).__name__}: "
                              f"{str(e)[:100]}); {redo}") from e
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (record {bad} fails its CRC check); {redo}")


def _check_state(state, path: Path) -> dict:
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a SAT checkpoint of format {FORMAT_VERSION}; retrain to create "
                              f"one")
    for key, typ in REQUIRED.items():
        value = state.get(key)
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if typ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise CheckpointError(f"checkpoint {path} is damaged ({key!r} missing or not a {typ.__name__}); "
                                  f"delete it and retrain, or use the other saved checkpoint")
    config = state["config"]
    if config.get("task", state["task"]) != state["task"] or not all(
            isinstance(config.get(s), dict) for s in SECTIONS):
        raise CheckpointError(f"checkpoint {path} is damaged (its config is incomplete); delete it and "
                              f"retrain, or use the other saved checkpoint")
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first (main_train.py) or check "
                              f"--random/--name/--task")
    _verify_crc(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # many types here (UnpicklingError for refused content, zip errors...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a SAT checkpoint ({first}); delete it "
                              f"and retrain, or use the other saved checkpoint") from e
    return _check_state(state, path)
