"""What the two command lines (main_train.py, main_inference.py) share: the exit codes and the evaluation of a
saved run.

Exit codes: 0 success; 2 bad usage or bad input (config, data, checkpoint), with a one-line error; 1 a failure
during training (a non-finite loss, a full disk, a lost torchrun peer), with a one-line error, or any other
exception, with its traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

from sat.checkpoint import CheckpointError
from sat.config import ConfigError, die
from sat.data.format import DataError

BAD_INPUT = (ConfigError, DataError, CheckpointError)


@contextmanager
def exit_codes(training: bool = False) -> Iterator[None]:
    """Turn the errors a command line expects into a one-line message and its exit code: bad input -> 2; with
    `training`, a failed run -> 1 (the checkpoints are written atomically, so the last one is kept)."""
    from sat.train import TrainingError

    try:
        yield
    except BAD_INPUT as e:
        die(str(e))
    except TrainingError as e:
        if not training:
            raise
        die(str(e), code=1)
    except OSError as e:  # disk full, no permission...
        if not training:
            raise
        where = f" ({e.filename})" if e.filename else ""
        die(f"{e.strerror or e}{where}; free disk space or fix permissions, then continue with --resume", code=1)
    except RuntimeError as e:  # under torchrun: a collective failed because another rank died
        if not training or not _lost_peer(e):
            raise
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        die(f"rank {os.environ.get('RANK', '0')}: another rank stopped ({first}); the last checkpoint is kept: "
            f"start every rank again with --resume", code=1)


def _lost_peer(e: BaseException) -> bool:
    """A torch.distributed failure caused by a rank that is gone (its process died or its host left)."""
    import torch.distributed as dist

    from sat.distributed import env_world_size

    text = str(e)
    return env_world_size() > 1 and (
        isinstance(e, getattr(dist, "DistError", ())) or "closed by peer" in text or "reset by peer" in text
        or "remote worker" in text or "NCCL" in text)


def evaluate_run(task: str, random: int, name: str, root: str = ".", device: str = "auto", backend: str = "auto",
                 split: str = "test", which: str = "best", data_dir: str | None = None) -> int:
    """--mode eval: evaluate the saved run {root}/checkpoints-{random}/{task}/{name}, print one line and the
    result as JSON; returns the exit code 0 (bad input exits with 2)."""
    from sat.device import resolve_device
    from sat.evaluate import evaluate_saved_run
    from sat.runlog import RunPaths

    with exit_codes():
        out = evaluate_saved_run(RunPaths.make(root, random, task, name), task, split, which, data_dir,
                                 resolve_device(device), backend)
    top5 = f" (top-5 {out['top5']:.4f})" if out.get("num_classes", 0) > 5 else ""
    print(f"{split} accuracy {out['accuracy']:.4f}{top5} on {out['examples']} examples "
          f"({out['attention']} attention, checkpoint of step {out['checkpoint_step']}); mean batch latency "
          f"{out['mean_batch_latency_ms']:.2f} ms; peak memory {out['peak_memory_mb']:.0f} MB")
    print(json.dumps(out))
    return 0
