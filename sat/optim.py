"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import torch
import torch.nn as nn

from sat.config import TaskConfig


def make_optimizer(model: nn.Module, cfg: TaskConfig, old: torch.optim.Optimizer | None = None) -> torch.optim.AdamW:
    """AdamW(0.9, 0.999, eps 1e-6); no weight decay on biases, norms, embeddings' positions and the pattern.

    With `old`, parameters that survive keep their optimizer state (used after the densify swap)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.endswith("pos") or "pattern" in name else decay).append(p)
    t = cfg.training
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-6)
    if old is not None:
        for p, state in old.state.items():
            if any(p is q for g in opt.param_groups for q in g["params"]):
                opt.state[p] = state
    return opt


def lr_at(step: int, cfg: TaskConfig) -> float:
    """One-cycle linear schedule: warm up from 0 to lr over warmup_steps, then decay linearly to 0."""
    t = cfg.training
    if t.warmup_steps and step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    span = max(1, t.train_steps - t.warmup_steps)
    return t.learning_rate * max(0.0, 1.0 - (step - t.warmup_steps) / span)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Every parameter group's learning rate for the next step; returns it."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr
