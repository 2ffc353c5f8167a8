"""GPU attention benchmark: dense SDPA, compiled FlexAttention with the same block mask, and the fused Triton
block-sparse kernel; forward, backward and forward+backward measured side by side in one run.

    python bench/attention_gpu.py                 # blocks 32 and 64, bf16/fp16/fp32/tf32, N 1024..16384,
                                                  # densities 0.02..0.2, head_dim 32 and 64
    python bench/attention_gpu.py --quick --out bench/results/attention_gpu-<device>.md

Every block size and input dtype that training uses is covered (config.py: blocks 32 and 64; --amp gives
bf16 or fp16, --amp off fp32, whose dots are exact unless PyTorch allows TF32: "tf32" rows run fp32 inputs
with torch.backends.cuda.matmul.fp32_precision = "tf32", docs/gpu.md). Dense SDPA uses the flash backend
for 16-bit inputs and the memory-efficient one for fp32. B x H x N is held near --tokens so every shape fits
in memory. Layouts are top-k style (the diagonal plus random blocks, shared by the heads); ratios > 1 mean
the fused kernel is faster. Needs a CUDA GPU (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PASSES = ("fwd", "bwd", "fwd+bwd")
COLUMNS = ("dtype", "block", "D", "N", "BxH", "density", "pass", "dense ms", "flex ms", "ours ms", "dense/ours",
           "flex/ours", "ours TFLOP/s")
DTYPE_NAMES = ("bf16", "fp16", "fp32", "tf32")  # tf32: fp32 inputs, PyTorch's fp32 matmul precision "tf32"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _dtypes(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in DTYPE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {unknown or text!r}; choose from {', '.join(DTYPE_NAMES)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="N 1024,4096, density 0.05, head_dim 64, shorter timing runs")
    p.add_argument("--n", type=_ints, default=[1024, 2048, 4096, 8192, 16384], help="sequence lengths")
    p.add_argument("--density", type=_floats, default=[0.02, 0.05, 0.1, 0.2], help="layout densities")
    p.add_argument("--head-dim", type=_ints, default=[32, 64], help="head dimensions")
    p.add_argument("--block", type=_ints, default=[32, 64], help="layout block sizes (default 32,64)")
    p.add_argument("--heads", type=int, default=4, help="heads H (default 4)")
    p.add_argument("--tokens", type=int, default=1 << 19, help="B*H*N held about constant (default 2^19)")
    p.add_argument("--dtype", type=_dtypes, default=list(DTYPE_NAMES),
                   help="input dtypes, comma-separated (default bf16,fp16,fp32,tf32)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.density, args.head_dim = [1024, 4096], [0.05], [64]
    return args


def _bench(fn, quick: bool) -> float:
    """Median milliseconds of fn()."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                   return_mode="median")


def _time_passes(attn, q, k, v, dout, quick: bool) -> dict[str, float]:
    """attn(q, k, v) -> out; forward, backward alone and forward+backward, in ms."""
    grads = [q, k, v]
    fwd = _bench(lambda: attn(q, k, v), quick)
    out = attn(q, k, v)
    bwd = _bench(lambda: out.backward(dout, retain_graph=True), quick)
    both = _bench(lambda: attn(q, k, v).backward(dout), quick)
    for x in grads:
        x.grad = None
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def _compiled_flex():
    """torch.compile(flex_attention), allowed one recompilation per shape; (None, reason) if unavailable."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        return None, f"no FlexAttention in torch {torch.__version__} ({e})"
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):  # recompiling per shape, never falling back to eager
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(flex_attention, dynamic=False), ""


def _flex_with_mask(compiled, layout_2d: torch.Tensor, block: int, n: int):
    """FlexAttention over the block mask of layout_2d (nb, nb), or (None, reason) when it cannot be built."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return layout_2d[q_idx // block, kv_idx // block]

    try:
        block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda", BLOCK_SIZE=block)
    except Exception as e:  # report and go on without the FlexAttention column
        return None, f"FlexAttention block mask failed: {str(e).splitlines()[0][:120]}"
    return (lambda q, k, v: compiled(q, k, v, block_mask=block_mask)), ""


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention through SDPA's flash backend (16-bit) or its memory-efficient one (fp32)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.EFFICIENT_ATTENTION if q.dtype == torch.float32 else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def run(args: argparse.Namespace) -> list[tuple]:
    """Time every configuration; returns the table rows (and prints them as they come)."""
    from sat.kernels.blocksparse_triton import triton_block_sparse_attention
    from sat.kernels.triton_support import DTYPES, fp32_precision, random_layout

    compiled_flex, no_flex = _compiled_flex()
    if no_flex:
        print(f"note: {no_flex}")
    g = torch.Generator().manual_seed(0)
    rows = []
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)
    for name in args.dtype:
        dtype, precision = DTYPES[name]
        with fp32_precision(precision):
            rows += _run_dtype(args, name, dtype, compiled_flex, g, triton_block_sparse_attention, random_layout)
    return rows


def _run_dtype(args, name, dtype, compiled_flex, g, triton_attention, random_layout) -> list[tuple]:
    rows = []
    for D in args.head_dim:
        for N in args.n:
            H = args.heads
            B = max(1, args.tokens // (H * N))
            q, k, v = (torch.randn(B, H, N, D, generator=g).to("cuda", dtype).requires_grad_()
                       for _ in range(3))  # (B, H, N, D) each
            dout = torch.randn(B, H, N, D, generator=g).to("cuda", dtype)
            t_dense = _time_passes(_dense, q, k, v, dout, args.quick)
            for block in args.block:
                for density in args.density:
                    layout = random_layout(1, N // block, density, g).cuda()  # (1, nb, nb)
                    actual = layout.float().mean().item()

                    def ours(q, k, v, layout=layout, block=block):
                        return triton_attention(q, k, v, layout, block)

                    t_ours = _time_passes(ours, q, k, v, dout, args.quick)
                    flex, why = None, ""
                    if compiled_flex is not None:
                        flex, why = _flex_with_mask(compiled_flex, layout[0], block, N)
                    t_flex = None
                    if flex is not None:
                        try:
                            diff = (flex(q, k, v) - ours(q, k, v)).abs().max().item()
                            if diff > 5e-2:
                                print(f"warning: ours and FlexAttention differ by {diff:.3f} at {name} block "
                                      f"{block} N={N} D={D}")
                            t_flex = _time_passes(flex, q, k, v, dout, args.quick)
                        except Exception as e:  # a FlexAttention failure must not end the benchmark
                            why = f"FlexAttention failed: {str(e).splitlines()[0][:120]}"
                    if why:
                        print(f"note: {why}")
                    fwd_flop = 4 * B * H * N * N * D * actual
                    flop = {"fwd": fwd_flop, "bwd": 2.5 * fwd_flop, "fwd+bwd": 3.5 * fwd_flop}
                    for p in PASSES:
                        o = t_ours[p]
                        f = t_flex[p] if t_flex else None
                        row = (name, block, D, N, f"{B}x{H}", f"{actual:.3f}", p, f"{t_dense[p]:.3f}",
                               f"{f:.3f}" if f else "n/a", f"{o:.3f}", f"{t_dense[p] / o:.2f}",
                               f"{f / o:.2f}" if f else "n/a", f"{flop[p] / o * 1e-9:.1f}")
                        rows.append(row)
                        print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
            del q, k, v, dout
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_gpu.py needs a CUDA GPU and none is available here", file=sys.stderr)
        return 2
    import triton

    device = torch.cuda.get_device_name()
    what = (f"{', '.join(args.dtype)}; blocks {', '.join(map(str, args.block))}; torch {torch.__version__}, "
            f"Triton {triton.__version__}")
    print(f"# attention on {device}: {what}; H={args.heads}, B*H*N ~ {args.tokens}")
    rows = run(args)
    if args.out is not None:
        lines = [f"Attention on {device}: {what}; "
                 f"`python bench/attention_gpu.py{' --quick' if args.quick else ''}`.", "",
                 "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
