"""The compile report (`python -m sat.warmup --report`, compile.sh --report): no GPU needed.

It records the launches a training step makes (the models' attention layer of each configured shape, run
forward and backward under sat.kernels.blocksparse_triton.record_launches), compiles each distinct binary for
each target through Triton's own launcher (sat.kernels.triton_compile) and prints shared memory, registers,
spills and the matrix instruction of each; it fails (exit 1) on spills or shared memory over a target's limit.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sat.kernels.triton_support import DTYPES, fp32_precision, triton_shape_problem


def record_training_launches(shape, dtype: torch.dtype, padded: bool, capability: tuple[int, int],
                             batch: int = 2) -> list:
    """The Triton launches of one training step of an attention layer of this shape (a sat.warmup.Shape) after
    the switch: sat.models.attention.Attention with backend "triton", forward and backward on CPU tensors, recorded
    (configured as for a GPU of compute `capability`) instead of run. The tensors' strides and alignment
    are those training hands the kernels (q, k, v views of one projection, dO a transposed view)."""
    from sat.kernels.blocksparse_triton import record_launches
    from sat.models.attention import Attention

    g = torch.Generator().manual_seed(0)
    H, D, N = shape.heads, shape.head_dim, shape.seq_len
    torch.manual_seed(0)  # the layer's initial pattern, hence its layout
    attn = Attention(H * D, H, D, N, shape.block_size, per_head=shape.per_head, backend="triton").to(dtype)
    attn.sparsify(max(shape.density, 1.0 / (N // shape.block_size) ** 2))
    x = torch.randn(batch, N, H * D, generator=g).to(dtype)
    mask = None
    if padded:
        mask = torch.ones(batch, N, dtype=torch.bool)
        mask[:, N - N // 5:] = False
    with record_launches(capability) as launches:
        attn(x, mask).float().sum().backward()
    return launches


def report(shapes: list, source: str, archs: list[int], dtypes: list[str], out: Path | None,
           both_layouts: bool = False) -> int:
    """Compile every distinct binary that training launches for `shapes` (sat.warmup.configured_shapes, read
    from `source`; with `both_layouts`, each also with the other of shared / per-head layouts); print and write
    the table. Exit code 1 when a binary spills registers or needs more shared memory than its target has."""
    import dataclasses

    import triton

    from sat.kernels.triton_compile import compile_launch, launch_key

    if both_layouts:
        shapes += [dataclasses.replace(s, name=f"{s.name} {'shared' if s.per_head else 'per-head'}",
                                       per_head=not s.per_head) for s in shapes]
        source += ", each with shared and per-head layouts"
    lines = [f"# Triton {triton.__version__} compile report: `python -m sat.warmup --report` "
             f"(torch {torch.__version__})",
             f"# shapes from {source}; each binary is what a training step launches (sat.models.attention, "
             f"forward + backward), built for the target through Triton's own launcher",
             "# cfg = program rows/loop rows/layout blocks per program; const = arguments the runtime turned "
             "into constants; div = arguments marked divisible by 16", ""]

    def emit(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    for line in lines:
        print(line)
    uses: dict[tuple, list[str]] = {}
    launches: dict[tuple, tuple] = {}
    for shape in shapes:
        problem = triton_shape_problem(torch.float32, shape.block_size, shape.head_dim, 2, shape.heads)
        layout = "per-head" if shape.per_head else "shared"
        emit(f"shape {shape.name}: N={shape.seq_len} H={shape.heads} D={shape.head_dim} "
             f"block={shape.block_size} {layout}" + (f": not built, {problem} (backend auto uses torch)"
                                                      if problem else ""))
        if problem:
            continue
        for arch in archs:
            for name in dtypes:
                dtype, precision = DTYPES[name]
                for padded in (False, True):
                    with fp32_precision(precision):
                        recorded = record_training_launches(shape, dtype, padded, (arch // 10, arch % 10))
                    for launch in recorded:
                        key = (arch, name, launch_key(launch))
                        launches.setdefault(key, (launch, shape))
                        label = f"{shape.name}{' pad' if padded else ''}"
                        if label not in uses.setdefault(key, []):
                            uses[key].append(label)
    emit("")
    header = (f"{'kernel':<20} {'sm':>3} {'dtype':<5} {'blk':>3} {'D':>3} {'cfg':<9} {'warps':>5} {'stages':>6} "
              f"{'shared':>7} {'regs':>4} {'spill':>5} {'mma':<8} {'const':<26} {'div':>3}  used by")
    emit(header)
    bad = []
    worst_shared = dict.fromkeys(archs, 0)
    start = time.perf_counter()
    for (arch, name, key), (launch, shape) in launches.items():
        binary = compile_launch(launch, arch)
        opts = launch.options
        cfg = f"{opts['ROWS']}/{opts.get('STEP', '-')}/{opts.get('GROUP', '-')}"
        emit(f"{binary.kernel:<20} {arch:>3} {name:<5} {shape.block_size:>3} {shape.head_dim:>3} {cfg:<9} "
             f"{binary.num_warps:>5} {binary.num_stages:>6} {binary.shared:>7} {binary.registers:>4} "
             f"{binary.spills:>5} {binary.mma:<8} {','.join(binary.constants) or '-':<26} {binary.divisible:>3}"
             f"  {'; '.join(uses[(arch, name, key)])}")
        worst_shared[arch] = max(worst_shared[arch], binary.shared)
        bad += [f"{binary.kernel} sm_{arch} {name} block {shape.block_size} D {shape.head_dim}: {p}"
                for p in binary.problems()]
    emit("")
    emit(f"{len(launches)} binaries in {time.perf_counter() - start:.0f} s; most shared memory: "
         + ", ".join(f"sm_{a} {worst_shared[a]} B" for a in archs)
         + f"; {len(bad)} with problems" + ("" if bad else " (no register spills)"))
    for problem in bad:
        emit(f"PROBLEM: {problem}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
    return 1 if bad else 0
