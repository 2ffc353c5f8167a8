"""The device a run computes on: the choice behind --device, its mixed-precision type and its peak memory."""

from __future__ import annotations

import resource

import torch

from sat.config import ConfigError, TaskConfig


def resolve_device(name: str) -> str:
    """--device: "auto" is cuda when a GPU is available, else cpu; a CUDA device without a GPU is bad input."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
    return name


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
