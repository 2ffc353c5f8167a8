"""A run's state, the one object the training loop carries, and the one declaration of what a checkpoint holds.

`RunState` holds what a run is made of (configuration, device, data, model, optimizer, transition scheduler,
log) and its counters (step, best dev accuracy, time per phase), so that each step of the loop takes what it
needs from it. `PARTS` declares every entry of a checkpoint once: its key, the type its readers rely on, how it
is taken from a RunState and how a resumed run puts it back. `snapshot` (saving), `restore` (resuming) and
sat/checkpoint.py's key check (`REQUIRED`) all follow from it: adding a piece of state is one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


@dataclass
class RunState:
    cfg: Any                      # TaskConfig, resolved for the data (class count, epoch-derived steps)
    requested: dict               # the configuration as requested, before the data filled it in: --resume's
    seed: int
    data_dir: Path
    dev: torch.device
    dtype: torch.dtype | None     # autocast dtype, None = full precision
    info: Any                     # sat.distributed.DistInfo
    data: Any                     # sat.data.loading.TaskData
    batches: Any                  # the training stream (state_dict / load_state_dict)
    model: nn.Module
    scheduler: Any                # sat.sparsity.scheduler.TransitionScheduler
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    mixer: Any | None             # Mixup/CutMix, image tasks only
    step: int = 0                 # optimizer steps done
    best_acc: float = -1.0        # best dev accuracy so far
    timing: dict = field(default_factory=lambda: {"dense_time": 0.0, "dense_steps": 0, "sparse_time": 0.0,
                                                  "sparse_steps": 0})
    forward_model: nn.Module | None = None  # the forward's handle: DDP around `model` under torchrun, else it


@dataclass(frozen=True)
class Part:
    """One entry of a checkpoint: `save` takes it from a RunState; `restore` (None: read by other code, such as
    evaluation or --resume's configuration) puts it back from the loaded checkpoint."""

    key: str
    type: type | tuple[type, ...]
    save: Callable[[RunState], Any]
    restore: Callable[[RunState, dict], None] | None = None
    required: bool = True         # False: absent from checkpoints written before it existed


def _model(s: RunState, ckpt: dict) -> None:
    load_weights(s.model, ckpt)  # densified first if the run had densified (the scheduler is restored already)
    s.model.to(s.dev)


def _optimizer(s: RunState, ckpt: dict) -> None:
    from sat.optim import make_optimizer

    s.optimizer = make_optimizer(s.model, s.cfg)  # over the restored (possibly densified) parameters
    s.optimizer.load_state_dict(ckpt["optimizer"])


def _rng(s: RunState) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _restore_rng(s: RunState, ckpt: dict) -> None:
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


def _scaler(s: RunState, ckpt: dict) -> None:
    if s.scaler.is_enabled():
        s.scaler.load_state_dict(ckpt["scaler"])


def _mixer(s: RunState, ckpt: dict) -> None:
    if s.mixer is not None and ckpt.get("mixup"):
        s.mixer.load_state_dict(ckpt["mixup"])


# In restore order: the scheduler first (whether the model was densified), then the model, then the optimizer
# built over its parameters.
PARTS: tuple[Part, ...] = (
    Part("task", str, lambda s: s.cfg.task),
    Part("config", dict, lambda s: s.cfg.to_dict()),
    Part("run", dict, lambda s: {"config": s.requested, "seed": s.seed}, required=False),
    Part("vocab_size", int, lambda s: s.data.vocab_size),
    Part("data_dir", str, lambda s: str(Path(s.data_dir).resolve())),
    Part("step", int, lambda s: s.step, lambda s, ckpt: setattr(s, "step", ckpt["step"])),
    Part("best_dev_accuracy", float, lambda s: s.best_acc,
         lambda s, ckpt: setattr(s, "best_acc", ckpt["best_dev_accuracy"])),
    Part("timing", dict, lambda s: dict(s.timing), lambda s, ckpt: setattr(s, "timing", dict(ckpt["timing"]))),
    Part("scheduler", dict, lambda s: s.scheduler.state_dict(),
         lambda s, ckpt: s.scheduler.load_state_dict(ckpt["scheduler"], s.dev)),
    Part("model", dict, lambda s: s.model.state_dict(), _model),
    Part("optimizer", dict, lambda s: s.optimizer.state_dict(), _optimizer),
    Part("train_loader", dict, lambda s: s.batches.state_dict(),
         lambda s, ckpt: s.batches.load_state_dict(ckpt["train_loader"])),
    Part("scaler", dict, lambda s: s.scaler.state_dict(), _scaler, required=False),
    Part("mixup", (dict, type(None)), lambda s: s.mixer.state_dict() if s.mixer is not None else None, _mixer,
         required=False),
    Part("rng", dict, _rng, _restore_rng),
)

REQUIRED: dict[str, type | tuple[type, ...]] = {p.key: p.type for p in PARTS if p.required}


def load_weights(model: nn.Module, state: dict) -> None:
    """Load a checkpoint's weights, densifying the Monarch MLPs first if the run had densified them."""
    if state["scheduler"]["densify_step"] is not None:
        from sat.models.monarch import densify

        densify(model)
    model.load_state_dict(state["model"])


def snapshot(s: RunState) -> dict:
    """Everything a resumed run restores, as of the step just finished."""
    return {p.key: p.save(s) for p in PARTS}


def restore(s: RunState, ckpt: dict) -> None:
    """Put a loaded checkpoint's state back into the run's objects, part by part in PARTS order."""
    for p in PARTS:
        if p.restore is not None:
            p.restore(s, ckpt)
