"""What the two command lines (main_train.py, main_inference.py) share: one command line (main_inference.py
accepts every training flag, so a run is evaluated with the command that trained it), usage errors as one line,
the exit codes and the evaluation of a saved run.

Exit codes: 0 success; 2 bad usage or bad input (config, data, checkpoint), with a one-line error; 1 a failure
during training (a non-finite loss, a full disk, a lost torchrun peer), with a one-line error, or any other
exception, with its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from sat.checkpoint import CheckpointError
from sat.config import ConfigError, die, merge
from sat.data.format import DataError

BAD_INPUT = (ConfigError, DataError, CheckpointError)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error (unknown flag, missing --task, bad choice or type) is one line on stderr and
    exit code 2, like every other bad input; argparse's own error() prints the whole usage block first."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())  # a message is never meant to span lines
        self.exit(2, f"error: {text} (see {self.prog} --help)\n")


def run_parser(prog: str, description: str, modes: list[str]) -> OneLineParser:
    """The command line of a run, shared by main_train.py (modes train, eval) and main_inference.py (eval):
    evaluating a run takes the command that trained it."""
    p = OneLineParser(prog=prog, description=description)
    p.add_argument("--mode", default=modes[0], choices=modes, help="eval: what main_inference.py does")
    p.add_argument("--task", required=True,
                   help="lra-listops, lra-text, lra-retrieval, lra-image, lra-pathfinder, csv-text, imagenet-vit-ti, "
                        "imagenet-vit-s")
    p.add_argument("--random", type=int, default=1001, help="seed; also names logs/log-{random} and checkpoints")
    p.add_argument("--name", default="sat", help="run name inside logs/ and checkpoints/")
    p.add_argument("--sk", type=float, help="skewness threshold (SAT default 1.7)")
    p.add_argument("--ds", type=float, help="drift threshold in percent (SAT default 1.3)")
    p.add_argument("--train_steps", type=int, help="total optimizer steps")
    p.add_argument("--epochs", type=float, help="train this many epochs (steps from the dataset size)")
    p.add_argument("--density", type=float, help="fraction of attention blocks kept after the switch")
    p.add_argument("--block_size", type=int, help="attention block size")
    p.add_argument("--batch_size", type=int, help="LRA tasks: the global batch, split over the ranks; image "
                                                  "tasks: the batch per GPU")
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--max_dense_steps", type=int, help="force the switch after this many steps (0 = never)")
    p.add_argument("--no_switch", action="store_true", help="dense-only training (the monitor still logs)")
    p.add_argument("--preset", help="named settings from config.py PRESETS, e.g. 'quick'")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set model.num_layers=1 (repeatable)")
    p.add_argument("--data_dir", help="processed .npz files (training: default data/{task}; evaluation: default "
                                      "the data the run trained on); image tasks: the folder holding train/ and "
                                      "val/ class folders")
    p.add_argument("--img_size", type=int, help="image tasks: input size in pixels (a multiple of the patch)")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision (auto = bf16 on CUDA, off on CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "reference"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto = cuda when available)")
    p.add_argument("--resume", action="store_true",
                   help="continue the last checkpoint of this --name, with the settings it was trained with")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run of this --name (its logs and checkpoints) and start again")
    p.add_argument("--root", default=".", help="where logs/ and checkpoints/ go")
    p.add_argument("--stop_at", type=int, default=0,
                   help="stop after N steps with a checkpoint, as an interruption would (tests)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (plain lines)")
    return p


def overrides_from_args(a: argparse.Namespace) -> dict:
    """The config values the flags set, in config.py's nested shape (what load_config merges last)."""
    o: dict = {"sparsity": {}, "training": {}}
    for key in ("sk", "ds", "density", "block_size", "max_dense_steps"):
        if getattr(a, key) is not None:
            o["sparsity"][key] = getattr(a, key)
    if a.no_switch:
        o["sparsity"]["enabled"] = False
    for key in ("train_steps", "batch_size", "learning_rate", "epochs", "amp"):
        if getattr(a, key) is not None:
            o["training"][key] = getattr(a, key)
    if a.train_steps is not None and a.epochs is not None:
        raise ConfigError("pass either --train_steps or --epochs, not both")
    if a.train_steps is not None:
        o["training"]["epochs"] = 0  # explicit steps replace the task's epoch count
    if a.img_size is not None:
        o["dataset"] = {"img_size": a.img_size}
    return merge(o, set_overrides(a.set))


def set_overrides(items: list[str]) -> dict:
    """`--set SECTION.KEY=VALUE` items as nested overrides; a value is JSON if it parses, else a string."""
    o: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE (e.g. model.dim=32), got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        o.setdefault(section, {})[name] = parsed
    return o


def command_line_config(a: argparse.Namespace) -> dict:
    """What this command line sets, {section: {key: value}} (its preset's values, flags and --set), validated
    as a training run would validate it (bad values are refused the same way)."""
    from sat.config import load_config
    from sat.runs import command_line_config as given

    overrides = overrides_from_args(a)
    load_config(a.task, a.preset, overrides)
    return given(a.task, a.preset, overrides)


@contextmanager
def exit_codes(training: bool = False) -> Iterator[None]:
    """Turn the errors a command line expects into a one-line message and its exit code: bad input -> 2; with
    `training`, a failed run -> 1 (the checkpoints are written atomically, so the last one is kept)."""
    from sat.interrupt import STOP
    from sat.train import TrainingError

    try:
        try:
            yield
        except Exception:
            STOP.quiet()  # on its way to one line and an exit code: a signal now just ends the process
            raise
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


def evaluate_run(a: argparse.Namespace) -> int:
    """--mode eval: evaluate the saved run {root}/checkpoints-{random}/{task}/{name} with the configuration
    of its checkpoint (an evaluation-relevant flag that contradicts it is refused, training-only flags are
    ignored), print one line and the result as JSON; returns the exit code 0 (bad input exits with 2)."""
    from sat.device import resolve_device
    from sat.evaluate import evaluate_saved_run
    from sat.runlog import RunPaths

    split, which = getattr(a, "split", "test"), getattr(a, "which", "best")  # main_train's --mode eval: defaults
    with exit_codes():
        out = evaluate_saved_run(RunPaths.make(a.root, a.random, a.task, a.name), a.task, split, which, a.data_dir,
                                 resolve_device(a.device), a.backend, given=command_line_config(a))
    top5 = f" (top-5 {out['top5']:.4f})" if out.get("num_classes", 0) > 5 else ""
    print(f"{split} accuracy {out['accuracy']:.4f}{top5} on {out['examples']} examples "
          f"({out['attention']} attention, checkpoint of step {out['checkpoint_step']}); mean batch latency "
          f"{out['mean_batch_latency_ms']:.2f} ms; peak memory {out['peak_memory_mb']:.0f} MB")
    print(json.dumps(out))
    return 0
