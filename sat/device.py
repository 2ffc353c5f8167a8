"""The device a run computes on: its mixed-precision type and its peak memory."""

from __future__ import annotations

import resource

import torch

from sat.config import TaskConfig


def amp_dtype(cfg: TaskConfig, device: torch.device) -> torch.dtype | None:
    """training.amp as an autocast dtype (None = full precision); "auto" is bf16 on CUDA, off elsewhere."""
    mode = cfg.training.amp
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; on a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
