"""This CPU's rates for the operations a block-sparse training step is made of, in fp32 and bf16: what bounds
bench/attention_cpu.py's share of the ideal speed-up and whether bf16 pays here.

    python bench/cpu_rates.py [--threads 1 2] [--out bench/results/cpu_rates.md]

Rows: the batched products of the torch backend at its block shapes (block 32 and 64, head dim 32: Q K^T, P V
and the backward's dO V^T, dS K, dS^T Q, for rows of 4 active blocks), the model's Linear layers at lra-image
shapes (batch 32 x 1024 tokens, width 64, hidden 128, the fused q/k/v projection 64 -> 192), one large GEMM
(the CPU's peak), and the elementwise passes over the scores (softmax, its backward, a bias add) and the key
gather, in ns per score element. Each time is the best of 5 rounds of 10 calls after 3, so that other load
lowers the rates rather than raising them; ratios > 1 mean bf16 is faster. Quote the machine's load with them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def best_ms(fn, reps: int = 10, rounds: int = 5) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return 1e3 * min(times)


def products(bs: int, D: int = 32, count: int = 4, rows: int = 256) -> list[tuple[str, tuple, tuple]]:
    """(name, a shape, b shape) of the backend's batched products for `rows` query blocks of `count` blocks."""
    L = count * bs
    return [(f"Q K^T, block {bs}", (rows, bs, D), (rows, D, L)), (f"P V, block {bs}", (rows, bs, L), (rows, L, D)),
            (f"dS^T Q, block {bs}", (rows, L, bs), (rows, bs, D))]


def matmul_rows(dtypes) -> list[list[str]]:
    out = []
    cases = [*products(32), *products(64),
             ("Linear 64 -> 128 (MLP in)", (32 * 1024, 64), (64, 128)),
             ("Linear 128 -> 64 (MLP out)", (32 * 1024, 128), (128, 64)),
             ("Linear 64 -> 192 (q, k, v)", (32 * 1024, 64), (64, 192)),
             ("GEMM 2048^3 (peak)", (2048, 2048), (2048, 2048))]
    for name, sa, sb in cases:
        flops = 2 * sa[-2] * sa[-1] * sb[-1] * (sa[0] if len(sa) == 3 else 1)
        ms = {}
        for dt in dtypes:
            a, b = torch.randn(*sa).to(dt), torch.randn(*sb).to(dt)
            o = torch.matmul(a, b)
            ms[dt] = best_ms(lambda a=a, b=b, o=o: torch.matmul(a, b, out=o))
        f32, b16 = ms[torch.float32], ms[torch.bfloat16]
        out.append([name, f"{f32:.3f}", f"{flops / f32 / 1e6:.1f}", f"{b16:.3f}", f"{flops / b16 / 1e6:.1f}",
                    f"{f32 / b16:.2f}"])
    return out


def elementwise_rows(dtypes) -> list[list[str]]:
    from sat.kernels.dense import softmax_, softmax_backward_

    rows, bs, L, D = 256, 64, 256, 32
    n = rows * bs * L
    out = []
    for name in ("softmax (in place)", "softmax backward (in place)", "bias add (-inf slots)", "key gather"):
        ns = {}
        for dt in dtypes:
            s, p = torch.randn(rows, bs, L).to(dt), torch.softmax(torch.randn(rows, bs, L), -1).to(dt)
            bias = torch.zeros(rows, 1, L // bs, 1, dtype=dt)
            src, index = torch.randn(4 * rows, bs, D).to(dt), torch.randint(0, 4 * rows, (rows * L // bs,))
            buf = src.new_empty(rows * L // bs, bs, D)
            fn = {"softmax (in place)": lambda s=s: softmax_(s),
                  "softmax backward (in place)": lambda s=s, p=p: softmax_backward_(s, p),
                  "bias add (-inf slots)": lambda s=s, b=bias: s.view(rows, bs, L // bs, bs).add_(b),
                  "key gather": lambda src=src, i=index, buf=buf: torch.index_select(src, 0, i, out=buf)}[name]
            if dt != torch.float32 and name == "softmax backward (in place)":
                fn = lambda s=s, p=p, dt=dt: torch.ops.aten._softmax_backward_data.out(s, p, -1, dt, grad_input=s)  # noqa: E731
            elements = rows * L * D if name == "key gather" else n
            ns[dt] = best_ms(fn) * 1e6 / elements
        out.append([name, f"{ns[torch.float32]:.3f}", f"{ns[torch.bfloat16]:.3f}",
                    f"{ns[torch.float32] / ns[torch.bfloat16]:.2f}"])
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    p.add_argument("--out", help="also write the tables (markdown) to this file")
    a = p.parse_args()
    dtypes = (torch.float32, torch.bfloat16)
    lines = [f"CPU rates, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
             f"`python bench/cpu_rates.py {' '.join(sys.argv[1:])}`".rstrip()]
    for threads in dict.fromkeys(a.threads):
        torch.set_num_threads(threads)
        lines += ["", f"{threads} thread(s): products (ms per call, GFLOP/s)", ""]
        lines += table(["product", "fp32 ms", "fp32 GFLOP/s", "bf16 ms", "bf16 GFLOP/s", "bf16 speed-up"],
                       matmul_rows(dtypes))
        lines += ["", f"{threads} thread(s): elementwise passes (ns per score element; the gather per element "
                  "of K copied)", ""]
        lines += table(["pass", "fp32 ns", "bf16 ns", "bf16 speed-up"], elementwise_rows(dtypes))
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
