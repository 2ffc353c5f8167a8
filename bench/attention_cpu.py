"""CPU attention benchmark: dense SDPA, compiled FlexAttention with the same block mask (forward only: it has
no CPU backward) and the torch block-sparse backend, forward and forward+backward timed side by side.

    python bench/attention_cpu.py                          # N 1024,2048,4096 x density 0.02,0.05,0.1
    python bench/attention_cpu.py --n 2048 --density 0.05
    python bench/attention_cpu.py --quick                  # N 1024,4096 at density 0.05

Layouts are the top-k blocks of a random block-importance matrix (shared by the heads), with the diagonal
block added to rows left empty. Times are medians of --reps runs after --warmup runs, taken in rounds of
one run of each method so that other load on the machine slows them alike; ratios > 1 mean the torch
backend is faster. Other processes on a 2-core machine move these numbers by 2x: quote them with the load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sat.kernels.blocksparse_torch import torch_block_sparse_attention  # noqa: E402
from sat.kernels.runtime import RUNTIME  # noqa: E402

COLUMNS = ("N", "density", "max row", "pass", "dense ms", "flex ms", "ours ms", "dense/ours", "flex/ours")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N 1024,4096 at density 0.05")
    p.add_argument("--n", type=_ints, default=[1024, 2048, 4096], help="sequence lengths (comma list)")
    p.add_argument("--density", type=_floats, default=[0.02, 0.05, 0.1], help="layout densities (comma list)")
    p.add_argument("--batch", type=int, default=4, help="batch B (default 4)")
    p.add_argument("--heads", type=int, default=2, help="heads H (default 2)")
    p.add_argument("--head-dim", type=int, default=32, help="head dimension D (default 32)")
    p.add_argument("--block", type=int, default=64, help="layout block size (default 64)")
    p.add_argument("--reps", type=int, default=7, help="timed runs per measurement (median; default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    p.add_argument("--threading", choices=("auto", "team", "workers"), default="auto",
                   help="how the torch backend uses the CPU threads (default: auto, measured at run time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.density = [1024, 4096], [0.05]
    return args


def topk_layout(nb: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """(1, nb, nb) bool: the round(density * nb^2) most important blocks of a random importance matrix,
    plus the diagonal block of every row left empty."""
    importance = torch.rand(nb * nb, generator=generator)
    layout = torch.zeros(nb * nb, dtype=torch.bool)
    layout[importance.topk(max(1, round(density * nb * nb))).indices] = True
    layout = layout.view(nb, nb)
    empty = ~layout.any(-1)
    layout[empty, empty.nonzero()[:, 0]] = True
    return layout[None]


def interleaved_medians(fns: dict, reps: int, warmup: int) -> dict[str, float]:
    """Median ms of each callable; one run of each per round, so a busy machine slows all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def passes(attn, q, k, v, dout) -> dict:
    """Forward (no grad) and forward+backward (gradients of q, k, v) of attn(q, k, v) as callables."""
    def forward():
        with torch.no_grad():
            attn(q, k, v)

    def forward_backward():
        torch.autograd.grad(attn(q, k, v), (q, k, v), dout)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def compiled_flex():
    """torch.compile(flex_attention) and a block-mask builder, or (None, None, reason) if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return None, None, f"no FlexAttention in torch {torch.__version__} ({e})"
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):  # one compilation per shape, never a silent eager fallback
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(flex_attention, dynamic=False), create_block_mask, ""


def run(args: argparse.Namespace) -> list[tuple]:
    """Time every configuration; returns the table rows and prints them as they come."""
    flex_fn, create_block_mask, why_no_flex = (None, None, "--no-flex") if args.no_flex else compiled_flex()
    if why_no_flex:
        print(f"note: FlexAttention column n/a: {why_no_flex}")
    g = torch.Generator().manual_seed(args.seed)
    B, H, D, bs = args.batch, args.heads, args.head_dim, args.block
    rows = []
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)
    for N in args.n:
        q, k, v = (torch.randn(B, H, N, D, generator=g).requires_grad_() for _ in range(3))  # (B, H, N, D)
        dout = torch.randn(B, H, N, D, generator=g)
        for density in args.density:
            layout = topk_layout(N // bs, density, g)  # (1, nb, nb)

            def ours(q, k, v, layout=layout):
                return torch_block_sparse_attention(q, k, v, layout, bs)

            dense = passes(F.scaled_dot_product_attention, q, k, v, dout)
            fns = {f"dense {p}": fn for p, fn in dense.items()}
            fns.update({f"ours {p}": fn for p, fn in passes(ours, q, k, v, dout).items()})
            note = ""
            if flex_fn is not None:
                try:
                    def mask_mod(b, h, q_idx, kv_idx, lay2d=layout[0]):
                        return lay2d[q_idx // bs, kv_idx // bs]

                    block_mask = create_block_mask(mask_mod, None, None, N, N, device="cpu", BLOCK_SIZE=bs)
                    qd, kd, vd = q.detach(), k.detach(), v.detach()  # FlexAttention has no CPU backward

                    def flex(q, k, v, block_mask=block_mask):
                        return flex_fn(q, k, v, block_mask=block_mask)

                    with torch.no_grad():
                        diff = (flex(qd, kd, vd) - ours(qd, kd, vd)).abs().max().item()
                    if diff > 1e-4:
                        note = f"FlexAttention and ours differ by {diff:.2e}"
                    fns["flex fwd"] = passes(flex, qd, kd, vd, dout)["fwd"]
                except Exception as e:  # a FlexAttention failure must not end the benchmark
                    note = f"FlexAttention failed: {str(e).splitlines()[0][:160]}"
            if note:
                print(f"note (N={N}, density {density}): {note}")
            t = interleaved_medians(fns, args.reps, args.warmup)
            actual = f"{layout.float().mean().item():.3f}"
            max_row = int(layout.sum(-1).max())
            for p in ("fwd", "fwd+bwd"):
                dense, ours_ms, f = t[f"dense {p}"], t[f"ours {p}"], t.get(f"flex {p}")
                row = (N, actual, max_row, p, f"{dense:.1f}", f"{f:.1f}" if f else "n/a", f"{ours_ms:.1f}",
                       f"{dense / ours_ms:.1f}", f"{f / ours_ms:.2f}" if f else "n/a")
                rows.append(row)
                print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header = (f"attention on CPU ({torch.get_num_threads()} threads, torch backend threading "
              f"{args.threading}), fp32, B={args.batch}, H={args.heads}, D={args.head_dim}, block {args.block}, "
              f"median of {args.reps}, torch {torch.__version__}")
    print(f"# {header}")
    with RUNTIME.override(threading=args.threading):
        rows = run(args)
    if args.out is not None:
        command = "python bench/attention_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
        lines = [f"{header}; `{command.strip()}`.", "", "| " + " | ".join(COLUMNS) + " |",
                 "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
