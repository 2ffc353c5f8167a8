"""Compile and warm the Triton block-sparse attention kernels for the configured task shapes (compile.sh).

    python -m sat.warmup                          # CUDA: build forward + backward for every shape
    python -m sat.warmup --report --out FILE      # any machine: build for sm_80 and sm_90, report
    TRITON_INTERPRET=1 python -m sat.warmup --smoke  # any machine: tiny interpreter check

Triton keeps compiled kernels in its on-disk cache (~/.triton/cache), so a training run started afterwards
skips the compilation. Shapes come from config.py through sat.config: every task, alone and under each preset
that names it (sequence length rounded up to the block size, heads, head dim, block size, shared or per-head
layout); without a usable config the built-in LRA and ViT-S shapes are used. ViT-S is added when no
configured task has its heads, head dim and block size.

--report (sat/compile_report.py) needs no GPU. Both modules sit above the kernels: they read the config, and
the report runs the models' attention layer, which the kernels know nothing of.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sat.kernels.reference import reference_attention
from sat.kernels.triton_support import (
    DTYPES,
    TOLERANCE,
    fp32_precision,
    random_layout,
    triton_shape_problem,
)

ARCHS = (80, 90)


@dataclass(frozen=True)
class Shape:
    """One attention shape the kernels are built for."""

    name: str
    seq_len: int  # already a multiple of block_size
    heads: int
    head_dim: int
    block_size: int
    density: float = 0.05
    per_head: bool = False


VIT_S = Shape("vit-s/16 (197 tokens padded)", 224, 6, 64, 32, 0.1)
BUILTIN_SHAPES = (
    Shape("lra-listops", 2048, 2, 32, 64, 0.04),
    Shape("lra-text", 4096, 2, 32, 64, 0.05),
    Shape("lra-retrieval", 4096, 2, 32, 64, 0.021),
    Shape("lra-image", 1024, 2, 32, 32, 0.05),
    Shape("lra-pathfinder", 1024, 2, 32, 32, 0.05),
    VIT_S,
)


def _task_configs() -> list[tuple[str, object]]:
    """(name, TaskConfig) of every task, alone and under every preset that names it."""
    from sat.config import load_config, presets, tasks

    named_presets = presets()
    out = []
    for task in tasks():
        out.append((task, load_config(task)))
        for preset in sorted(p for p, v in named_presets.items() if task in v):
            out.append((f"{task} --preset {preset}", load_config(task, preset)))
    return out


def configured_shapes() -> tuple[list[Shape], str]:
    """Shapes of every task (and preset) in config.py, and where they came from (falls back to the built-in
    list)."""
    try:
        shapes = []
        for name, cfg in _task_configs():
            bs = cfg.sparsity.block_size
            n = math.ceil(cfg.dataset.max_seq_len / bs) * bs
            shapes.append(Shape(name, n, cfg.model.num_heads, cfg.model.head_dim, bs, cfg.sparsity.density,
                                cfg.sparsity.per_head))
    except Exception as e:  # no config.py yet, or one this reader does not understand
        return list(BUILTIN_SHAPES), f"built-in LRA and ViT-S shapes (config.py not usable: {e})"
    if not shapes:
        return list(BUILTIN_SHAPES), "built-in LRA and ViT-S shapes (config.py has no tasks)"
    key = (VIT_S.heads, VIT_S.head_dim, VIT_S.block_size)  # the sequence length is no compile-time constant
    if all((s.heads, s.head_dim, s.block_size) != key for s in shapes):
        shapes.append(VIT_S)
    return shapes, "config.py"


# ------------------------------------------------------------------------------------------------ GPU warm-up


def _run_case(shape: Shape, dtype: torch.dtype, padded: bool, device: str, batch: int = 1
              ) -> tuple[float, float]:
    """One forward + backward of the Triton kernel; returns (seconds, max error relative to the reference's
    largest value, over the output and the three gradients)."""
    from sat.kernels.blocksparse_triton import triton_block_sparse_attention

    g = torch.Generator().manual_seed(0)
    B, H, N, D, bs = batch, shape.heads, shape.seq_len, shape.head_dim, shape.block_size
    layout = random_layout(H if shape.per_head else 1, N // bs, shape.density, g).to(device)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    kpm = None
    if padded:
        kpm = torch.ones(B, N, dtype=torch.bool, device=device)
        kpm[:, N - N // 5:] = False
    dout = torch.randn(B, H, N, D, generator=g).to(device, dtype)
    start = time.perf_counter()
    out = triton_block_sparse_attention(q, k, v, layout, bs, kpm)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ref = reference_attention(q, k, v, layout, bs, kpm)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    err = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
              for a, b in zip((out, *grads), (ref, *ref_grads), strict=True))
    return seconds, err


def warm(dtypes: list[str]) -> int:
    """Build every (shape, dtype, padding) variant on the GPU and print what was built."""
    shapes, source = configured_shapes()
    print(f"building Triton block-sparse attention kernels for {len(shapes)} shapes from {source}")
    failed = []
    for shape in shapes:
        problem = triton_shape_problem(torch.float32, shape.block_size, shape.head_dim, 1, shape.heads)
        if problem:
            print(f"  {shape.name:<30} skipped: {problem} (backend auto uses torch)")
            continue
        for name in dtypes:
            dtype, precision = DTYPES[name]
            for padded in (False, True):
                with fp32_precision(precision):
                    first, err = _run_case(shape, dtype, padded, "cuda")
                    again, _ = _run_case(shape, dtype, padded, "cuda")
                if err > TOLERANCE[name]:
                    failed.append(f"{shape.name} {name}{' padded' if padded else ''}: {err:.2e}")
                print(f"  {shape.name:<30} N={shape.seq_len:<5} H={shape.heads} D={shape.head_dim:<3} "
                      f"block={shape.block_size:<3} {'per-head' if shape.per_head else 'shared':<8} {name} "
                      f"{'padded' if padded else 'no-pad':<6}  first call {first:6.2f} s, "
                      f"warm fwd+bwd {again * 1e3:7.2f} ms, max rel err {err:.1e}")
    if failed:
        print(f"FAILED: kernels differ from the reference beyond {TOLERANCE}: {'; '.join(failed)}")
        return 1
    print("done: kernels are in the Triton cache")
    return 0


# ------------------------------------------------------------------------------------------------ smoke


def smoke() -> int:
    """Tiny forward + backward in the Triton interpreter, compared with the reference."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke needs TRITON_INTERPRET=1 in the environment (set before Triton is imported)")
        return 2
    start = time.perf_counter()
    shape = Shape("smoke", 64, 2, 16, 16, 0.5)
    try:
        _, err = _run_case(shape, torch.float32, padded=True, device="cpu", batch=2)
    except Exception as e:
        if "0-dimensional" not in str(e):
            raise
        import numpy
        import triton

        print(f"interpreter smoke test skipped: Triton {triton.__version__}'s interpreter cannot loop over "
              f"counts loaded from memory with NumPy {numpy.__version__}; use Triton >= 3.9 or NumPy < 2.4")
        return 0
    ok = err < 1e-4
    print(f"interpreter smoke test (B=2 H=2 N=64 D=16 block=16, fp32): max rel err {err:.1e} "
          f"in {time.perf_counter() - start:.1f} s: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _names(text: str, allowed, what: str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown or not items:
        raise ValueError(f"unknown {what} {unknown or text!r}; choose from {', '.join(map(str, allowed))}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny interpreter check instead of a GPU build")
    parser.add_argument("--report", action="store_true",
                        help="no GPU needed: compile what training launches for --arch, report shared memory, "
                             "registers and spills")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated input dtypes: bf16, fp16, fp32 (exact), tf32 (fp32 inputs with "
                             "TF32 allowed); default bf16,fp16 for a GPU build, all four for --report")
    parser.add_argument("--arch", default="80,90", help="--report targets (compute capability, default 80,90)")
    parser.add_argument("--out", type=Path, default=None, help="--report: also write the table to this file")
    parser.add_argument("--both-layouts", action="store_true",
                        help="--report: each shape also with the other of shared / per-head layouts")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke()
    try:
        dtypes = _names(args.dtypes or ("bf16,fp16,fp32,tf32" if args.report else "bf16,fp16"), DTYPES, "dtype")
        archs = [int(a) for a in _names(args.arch, [str(a) for a in ARCHS], "arch")]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if args.report:
        from sat.compile_report import report

        return report(*configured_shapes(), archs, dtypes, args.out, args.both_layouts)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to build (the torch backend will be used); try --smoke or --report")
        return 2
    return warm(dtypes)


if __name__ == "__main__":
    sys.exit(main())
