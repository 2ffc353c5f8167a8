"""CPU attention benchmark: the torch block-sparse backend against dense SDPA, one row per layout kind, and the
forward against compiled FlexAttention with the same block mask (it has no CPU backward).

    python bench/attention_cpu.py                          # N 4096, density 0.05 and 0.1, every layout kind
    python bench/attention_cpu.py --n 2048 --density 0.05 --layouts learned,per-head
    python bench/attention_cpu.py --quick                  # N 1024, 3 runs after 1: a smoke test

Layout kinds (LAYOUTS): "uniform", the top-k of a uniformly random importance map (the diagonal block added to
rows left empty); "measured", the top-k of a map shaped like a measured one (local, a few sink columns, noise);
"random+diag", every diagonal block and random others; "imbalanced", the diagonal and a few full rows;
"learned", SAT's top-k of G = P P^T for a random P; "per-head", a learned layout per head ((H, nb, nb)). They
have from 3 to ~25 distinct blocks-per-row counts ("counts"), which the torch backend computes in "buckets"
(sat/kernels/blocksparse_torch.py; "padded": the share of blocks it adds by merging counts). "unmerged" times
it with every count in its own bucket (RUNTIME.bucket_overhead = 0), "ours" with the cost model's buckets.
"share" is the share of the ideal speed-up: dense/ours times the density used (1.0 = time in proportion to the
active blocks).

Times are medians of --reps runs after --warmup runs, taken in rounds of one run of each method so that other
load on the machine slows them alike; ratios > 1 mean the torch backend is faster. Other processes on a 2-core
machine move these numbers by 2x: quote them with the load.
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

from sat.kernels.blocksparse_torch import plan_for, torch_block_sparse_attention  # noqa: E402
from sat.kernels.runtime import RUNTIME  # noqa: E402

COLUMNS = ("N", "layout", "density", "counts", "buckets", "padded", "dense fwd+bwd ms", "unmerged fwd+bwd ms",
           "ours fwd+bwd ms", "dense/ours", "share", "ours fwd ms", "flex fwd ms", "flex/ours fwd")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in LAYOUTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layout kind(s) {unknown}; choose from {list(LAYOUTS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N 1024, 3 runs after 1: a smoke test")
    p.add_argument("--n", type=_ints, default=[4096], help="sequence lengths (comma list; default 4096)")
    p.add_argument("--density", type=_floats, default=[0.05, 0.1], help="layout densities (comma list)")
    p.add_argument("--layouts", type=_names, default=list(LAYOUTS),
                   help=f"layout kinds (comma list; default all: {','.join(LAYOUTS)})")
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
        args.n, args.reps, args.warmup = [1024], 3, 1
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


def measured_like_layout(nb: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """(1, nb, nb) bool: sat.sparsity.pattern.topk_layout of a map shaped like a measured one (the block-pooled
    attention of a trained model): mass decaying with the distance from the diagonal, a few key blocks that
    every query reads (attention sinks), and noise."""
    i = torch.arange(nb, dtype=torch.float32)
    local = torch.exp(-(i[:, None] - i[None, :]).abs() / 3.0)  # (nb, nb)
    sinks = torch.zeros(nb)
    sinks[torch.randperm(nb, generator=generator)[:max(1, nb // 16)]] = 0.5
    sinks[0] = 1.0
    noise = torch.rand(nb, nb, generator=generator) * 0.3
    return topk_pattern(local + sinks[None, :] + noise, density)


def random_diagonal_layout(nb: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """(1, nb, nb) bool: every diagonal block plus random off-diagonal blocks, int(density * nb^2) in all
    (keep_diagonal's rule with a random map)."""
    return topk_pattern(torch.rand(nb, nb, generator=generator), density, keep_diagonal=True)


def imbalanced_layout(nb: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """(1, nb, nb) bool: every diagonal block, and the rest of int(density * nb^2) blocks spent on whole rows of
    a few random query blocks (the last one partly): most rows see one block, a few see all of them."""
    layout = torch.eye(nb, dtype=torch.bool)
    extra = max(0, int(density * nb * nb) - nb)
    for row in torch.randperm(nb, generator=generator).tolist():
        if extra <= 0:
            break
        free = (~layout[row]).nonzero()[:, 0]
        take = free[torch.randperm(len(free), generator=generator)[:extra]]
        layout[row, take] = True
        extra -= len(take)
    return layout[None]


def learned_layout(nb: int, density: float, generator: torch.Generator, heads: int = 1,
                   rank: int = 32) -> torch.Tensor:
    """(heads, nb, nb) bool: SAT's learned layout, the top-k of G = P P^T (sat/models/pattern_state.py) for a
    random P (heads, nb, rank) drawn like the model's initial P (uniform on [0, 1)), per head."""
    p = torch.rand(heads, nb, rank, generator=generator)
    return topk_pattern(p @ p.transpose(-2, -1), density)


def per_head_layout(nb: int, density: float, generator: torch.Generator, heads: int = 2) -> torch.Tensor:
    """(heads, nb, nb) bool: one learned layout per head (learned_layout with a P per head)."""
    return learned_layout(nb, density, generator, heads=heads)


def topk_pattern(importance: torch.Tensor, density: float, keep_diagonal: bool = False) -> torch.Tensor:
    """The project's top-k layout of a map (sat.sparsity.pattern.topk_layout): (1 or H, nb, nb) bool."""
    from sat.sparsity.pattern import topk_layout as project_topk

    return project_topk(importance, density, keep_diagonal=keep_diagonal)[0]


LAYOUTS = {
    "uniform": topk_layout,
    "measured": measured_like_layout,
    "random+diag": random_diagonal_layout,
    "imbalanced": imbalanced_layout,
    "learned": learned_layout,
    "per-head": per_head_layout,
}
"""Layout kinds: name -> fn(nb, density, generator) -> (1 or H, nb, nb) bool; "per-head" also takes heads."""


def make_layout(kind: str, nb: int, density: float, heads: int, generator: torch.Generator) -> torch.Tensor:
    """A layout of this kind: (1, nb, nb) bool, or (heads, nb, nb) for "per-head"."""
    fn = LAYOUTS[kind]
    return fn(nb, density, generator, heads=heads) if kind == "per-head" else fn(nb, density, generator)


def bucket_stats(layout: torch.Tensor, batch: int, block_size: int, head_dim: int) -> tuple[int, int, float]:
    """(distinct blocks-per-row counts, buckets the torch backend runs, padded share of its blocks) for a batch
    of `batch` (batch, head) pairs sharing the layout, at the current thread count."""
    plan = plan_for(layout, torch.device("cpu"))
    sched = plan.schedule(batch, block_size, head_dim, torch.device("cpu"))
    return len(plan.groups), len(sched.buckets), sched.active_blocks / int(layout.sum()) - 1.0


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


def flex_forward(flex_fn, create_block_mask, layout, bs, N):
    """The compiled FlexAttention forward with the layout's block mask (per head for an (H, nb, nb) layout), as
    attn(q, k, v)."""
    per_head = layout.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx, lay=layout):
        return lay[h if per_head else 0, q_idx // bs, kv_idx // bs]

    block_mask = create_block_mask(mask_mod, None, layout.shape[0] if per_head else None, N, N, device="cpu",
                                   BLOCK_SIZE=bs)

    def flex(q, k, v, block_mask=block_mask):
        return flex_fn(q, k, v, block_mask=block_mask)

    return flex


def run(args: argparse.Namespace) -> list[tuple]:
    """Time every configuration; returns the table rows and prints them as they come."""
    flex_fn, create_block_mask, why_no_flex = (None, None, "--no-flex") if args.no_flex else compiled_flex()
    if why_no_flex:
        print(f"note: FlexAttention columns n/a: {why_no_flex}")
    g = torch.Generator().manual_seed(args.seed)
    B, H, D, bs = args.batch, args.heads, args.head_dim, args.block
    rows = []
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)
    for N in args.n:
        q, k, v = (torch.randn(B, H, N, D, generator=g).requires_grad_() for _ in range(3))  # (B, H, N, D)
        dout = torch.randn(B, H, N, D, generator=g)
        dense = passes(F.scaled_dot_product_attention, q, k, v, dout)["fwd+bwd"]
        for kind in args.layouts:
            for density in args.density:
                layout = make_layout(kind, N // bs, density, H, g)  # (1 or H, nb, nb)

                def ours(q, k, v, layout=layout):
                    return torch_block_sparse_attention(q, k, v, layout, bs)

                def unmerged(q, k, v, layout=layout):
                    with RUNTIME.override(bucket_overhead=0.0):
                        return torch_block_sparse_attention(q, k, v, layout, bs)

                fns = {"dense fwd+bwd": dense}
                fns.update({f"ours {p}": fn for p, fn in passes(ours, q, k, v, dout).items()})
                fns["unmerged fwd+bwd"] = passes(unmerged, q, k, v, dout)["fwd+bwd"]
                note = ""
                if flex_fn is not None:
                    try:
                        flex = flex_forward(flex_fn, create_block_mask, layout, bs, N)
                        qd, kd, vd = q.detach(), k.detach(), v.detach()  # FlexAttention has no CPU backward
                        with torch.no_grad():
                            diff = (flex(qd, kd, vd) - ours(qd, kd, vd)).abs().max().item()
                        if diff > 1e-4:
                            note = f"FlexAttention and ours differ by {diff:.2e}"
                        fns["flex fwd"] = passes(flex, qd, kd, vd, dout)["fwd"]
                    except Exception as e:  # a FlexAttention failure must not end the benchmark
                        note = f"FlexAttention failed: {str(e).splitlines()[0][:160]}"
                if note:
                    print(f"note (N={N}, {kind}, density {density}): {note}")
                t = interleaved_medians(fns, args.reps, args.warmup)
                actual = layout.float().mean().item()
                counts, buckets, padded = bucket_stats(layout, B * H // layout.shape[0], bs, D)
                speedup = t["dense fwd+bwd"] / t["ours fwd+bwd"]
                f = t.get("flex fwd")
                row = (N, kind, f"{actual:.3f}", counts, buckets, f"{padded:.1%}", f"{t['dense fwd+bwd']:.1f}",
                       f"{t['unmerged fwd+bwd']:.1f}", f"{t['ours fwd+bwd']:.1f}", f"{speedup:.1f}",
                       f"{speedup * actual:.2f}", f"{t['ours fwd']:.1f}", f"{f:.1f}" if f else "n/a",
                       f"{f / t['ours fwd']:.2f}" if f else "n/a")
                rows.append(row)
                print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header = (f"attention on CPU ({torch.get_num_threads()} threads, torch backend threading "
              f"{args.threading}, bucket overhead {RUNTIME.bucket_overhead:.0e}), fp32, B={args.batch}, "
              f"H={args.heads}, D={args.head_dim}, block {args.block}, median of {args.reps}, "
              f"torch {torch.__version__}")
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
