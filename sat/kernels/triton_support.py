"""Which shapes the Triton block-sparse backend runs, which backend a call gets, and how the kernels are tiled.

Pure Python over shapes and dtypes (Triton is never imported here), so the dispatch decision and the launch
configuration can be tested, and shared by `sat.kernels` and `sat.kernels.blocksparse_triton`, without a GPU
and without an import cycle. docs/gpu.md describes the dispatch and the fp32 precision policy.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sat.shapes import layout_shape_problem

BACKENDS = ("auto", "triton", "torch", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_BLOCK_SIZES = (16, 32, 64, 128)
TRITON_HEAD_DIMS = (16, 128)  # inclusive range
MAX_GRID_YZ = 65535  # CUDA's limit on the second and third grid dimensions (heads, batch)

log = logging.getLogger("sat.kernels")

# Set while sat.kernels.blocksparse_triton records launches instead of running them (the compile report):
# the Triton backend is then usable on CPU tensors, which are never handed to a kernel.
RECORDING: contextvars.ContextVar[bool] = contextvars.ContextVar("sat_kernels_recording", default=False)


def check_layout(q: torch.Tensor, layout: torch.Tensor, block_size: int) -> None:
    """Raise ValueError with a clear message when shapes do not fit together (the rule: sat/shapes.py)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, N, D), got shape {tuple(q.shape)}")
    _, H, N, _ = q.shape
    problem = layout_shape_problem(tuple(layout.shape), H, N, block_size)
    if problem:
        raise ValueError(problem)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def triton_shape_problem(dtype: torch.dtype, block_size: int, head_dim: int, batch: int, heads: int = 1) -> str:
    """Why the Triton kernels cannot run this shape, or '' when they can."""
    if dtype not in TRITON_DTYPES:
        return (f"dtype {_dtype_name(dtype)} is not one of "
                f"{', '.join(_dtype_name(d) for d in TRITON_DTYPES)}")
    if block_size not in TRITON_BLOCK_SIZES:
        return f"block_size {block_size} is not one of {', '.join(map(str, TRITON_BLOCK_SIZES))}"
    lo, hi = TRITON_HEAD_DIMS
    if not lo <= head_dim <= hi:
        return f"head_dim {head_dim} is outside {lo}..{hi}"
    if batch > MAX_GRID_YZ:
        return f"batch {batch} is above {MAX_GRID_YZ} (a CUDA grid limit)"
    if heads > MAX_GRID_YZ:
        return f"{heads} heads is above {MAX_GRID_YZ} (a CUDA grid limit)"
    return ""


def triton_device_problem(device: torch.device | str) -> str:
    """Why the Triton kernels cannot run on this device, or '' when they can.

    CUDA devices need Triton installed; CPU tensors only run in Triton's interpreter (TRITON_INTERPRET=1)."""
    device = torch.device(device)
    if RECORDING.get():
        return ""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"device {device.type} is not a CUDA GPU"
    if not triton_installed():
        return "Triton is not installed"
    return ""


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # looked up once: dispatch runs on every call


_logged: set[str] = set()


def forget_logged() -> None:
    """Let every fallback reason be logged again (each is logged once per process)."""
    _logged.clear()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def check_backend(backend: str, dtype: torch.dtype, block_size: int, head_dim: int, batch: int,
                  device: torch.device | str, heads: int = 1) -> str:
    """The attention backend that runs these shapes: `backend` itself, or for "auto" "triton" or "torch".

    "auto" takes Triton only on a CUDA device, with Triton installed, for a shape it supports; when a CUDA
    device falls back to "torch" one log line (once per reason) says why. An explicit "triton" that cannot
    run raises ValueError with a one-line message, so a run fails before it starts rather than at the switch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("torch", "reference"):
        return backend
    device = torch.device(device)
    problem = triton_device_problem(device) or triton_shape_problem(dtype, block_size, head_dim, batch, heads)
    if backend == "triton":
        if problem:
            raise ValueError(f"attention backend 'triton' cannot run this model: {problem}; use --backend torch "
                             f"(or auto)")
        return "triton"
    if not problem:
        return "triton"
    if device.type == "cuda":
        _log_once(f"attention backend auto -> torch: the Triton kernels cannot run {_dtype_name(dtype)}, "
                  f"block {block_size}, head_dim {head_dim}, batch {batch}: {problem}")
    return "torch"


# ---------------------------------------------------------------------------------------- precision policy

# name -> (input dtype, fp32 matmul precision PyTorch is set to): "fp32" exact, "tf32" with TF32 allowed
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"),
    "fp32": (torch.float32, "ieee"), "tf32": (torch.float32, "tf32"),
}
# Largest difference from the reference (sat.kernels.reference, fp32 math) the kernels may show, per input:
# 16-bit inputs, fp32 with TF32 dots (10 mantissa bits: about 1e-3 here, tests/test_blocksparse_triton.py
# emulates it), exact fp32.
TOLERANCE = {"bf16": 2e-2, "fp16": 2e-2, "tf32": 3e-3, "fp32": 1e-4}


@contextlib.contextmanager
def fp32_precision(value: str) -> Iterator[None]:
    """PyTorch's fp32 matmul precision on CUDA ("ieee" or "tf32") within the block, restored after."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = value
    try:
        yield
    finally:
        matmul.fp32_precision = before


def random_layout(heads: int, nb: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """Top-k style layout: the diagonal plus random blocks, about `density` of each row. (heads, nb, nb)."""
    k = max(1, round(density * nb))
    scores = torch.rand(heads, nb, nb, generator=generator) + 2 * torch.eye(nb)  # diagonal always kept
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros(heads, nb, nb, dtype=torch.bool).scatter_(-1, idx, True)



def fp32_matmul_precision() -> str:
    """"tf32" when PyTorch's own setting lets fp32 matmuls on CUDA use TF32 tensor cores, else "ieee".

    Follows torch.backends.cuda.matmul.fp32_precision (which also reflects the older
    torch.backends.cuda.matmul.allow_tf32 and torch.set_float32_matmul_precision) where this PyTorch has it,
    allow_tf32 otherwise. PyTorch's default is exact fp32 ("ieee")."""
    matmul = torch.backends.cuda.matmul
    try:
        setting = matmul.fp32_precision
    except AttributeError:  # PyTorch before the fp32_precision API
        try:
            return "tf32" if matmul.allow_tf32 else "ieee"
        except RuntimeError:
            return "ieee"
    return "tf32" if setting == "tf32" else "ieee"


# ---------------------------------------------------------------------------------------- launch configuration


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernels tile one (block size, head dim, dtype, precision, GPU) case.

    Every program covers `rows` query rows (forward, dQ) or key rows (dK/dV) and walks the other side `step`
    rows at a time. `group` > 1 means one program covers `group` consecutive blocks of the layout (Hopper's
    wgmma needs 64-row tiles): it walks the union of their active blocks and masks, per row, the blocks its
    own layout row lacks.
    """

    block_size: int
    rows: int
    step: int
    group: int
    block_d: int
    head_dim: int
    dot_prec: str  # "ieee" or "tf32": the precision of fp32 dots (no effect on 16-bit inputs)
    num_warps: int
    num_stages: int
    pre_rows: int  # the delta pre-pass: rows per program, and its warps (it has no loop: 1 stage)
    pre_warps: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def launch_config(block_size: int, head_dim: int, dtype: torch.dtype, capability: tuple[int, int],
                  fp32_precision: str = "ieee") -> LaunchConfig:
    """Tiles, warps and stages for a GPU of compute `capability` (major, minor).

    Chosen from the compiled binaries (python -m sat.warmup --report, kept in bench/results): no
    register spills, and shared memory within each target's limit, for the configured shapes.
      * 16-bit and TF32 inputs: programs of at most 64 rows (a 128 block is walked in 64-row steps). On Hopper
        (sm_90) a program covers 64 rows even for blocks of 32 or 16 (two or four layout blocks) so that its
        dots compile to wgmma, which needs 64; other GPUs keep one block per program (mma.sync needs 16).
        fp32 (TF32) loops take at most 32 rows per step, 16 for head dims above 64: twice the bytes per
        element would otherwise spill the backward's registers.
      * Exact fp32 ("ieee") dots are FMA loops, no tensor cores: 32-row tiles, 8 warps from head dim 64 on,
        16-row steps above 64.
    """
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"no Triton launch configuration for dtype {_dtype_name(dtype)}")
    block_d = max(16, _next_pow2(head_dim))
    wide = dtype == torch.float32  # 4-byte elements
    ieee = wide and fp32_precision != "tf32"
    if ieee:
        rows = min(block_size, 32)
        step = rows if block_d <= 64 else min(rows, 16)
        num_warps = 8 if block_d >= 64 else (4 if rows >= 32 else 2)
    else:
        rows = 64 if capability[0] == 9 else min(block_size, 64)
        step = min(block_size, 64 if not wide else (32 if block_d <= 64 else 16))
        num_warps = 8 if rows * block_d >= 64 * 128 else (4 if rows >= 32 else 2)
    group = max(1, rows // block_size)
    num_stages = 2 if (wide or rows * block_d >= 64 * 128) else 3
    pre_rows = min(block_size, 64)
    return LaunchConfig(block_size, rows, step, group, block_d, head_dim, "ieee" if ieee else "tf32",
                        num_warps, num_stages, pre_rows, 4)  # 2 warps spilled fp32 32 x 64 on sm_90 (Triton 3.6)


__all__ = ["BACKENDS", "LaunchConfig", "check_backend", "check_layout", "fp32_matmul_precision",
           "launch_config", "triton_device_problem", "triton_shape_problem"]
