"""The Triton backend agrees with the dense reference (SPEC.md section 4), run by Triton's CPU interpreter.

Triton binds every @triton.jit function, its own library included, to the interpreter when it is decorated,
so TRITON_INTERPRET=1 has to be set before triton is first imported, and setting it for the whole pytest run
would also send other tests' compiled kernels (torch.compile on a GPU) to the interpreter. So the
interpreter tests run in a child pytest over this file with the variable set from the start:
`test_kernels_in_interpreter_subprocess` starts it, and the tests marked `interpreted` run only there.
Run them directly with `TRITON_INTERPRET=1 python -m pytest tests/test_blocksparse_triton.py`.
Without a GPU the real kernels are still compiled ahead of time for sm_80/sm_90 (test_kernels_compile_...);
with one, test_compiled_kernels_on_cuda runs them.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sat.kernels import block_sparse_attention, reference_attention

_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not _INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child pytest")


@pytest.mark.skipif(_INTERPRETER, reason="this is the child run")
def test_kernels_in_interpreter_subprocess():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "COLUMNS": "400"}  # wide: skip reasons stay whole
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                           cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                           timeout=900)
    assert child.returncode == 0, f"interpreter run failed:\n{child.stdout[-8000:]}\n{child.stderr[-2000:]}"
    skipped = [line for line in child.stdout.splitlines() if "interpreter cannot run" in line]
    if skipped:
        pytest.skip(skipped[0].split(": ", 1)[-1])


def _interpreter_problem() -> str:
    """Why this Triton's interpreter cannot run the kernels, or '' when it can.

    The kernels loop `for j in range(0, count)` over a count loaded from the lookup table. Interpreters
    before Triton 3.9 turn that count into an int with int(array of shape (1,)), which NumPy 2.4 rejects.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def loop_over_loaded_count(count_ptr, out_ptr):
        total = 0
        for _ in range(0, tl.load(count_ptr)):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        loop_over_loaded_count[(1,)](torch.tensor([3], dtype=torch.int32), out)
    except Exception as e:  # the interpreter wraps the TypeError in its own error type
        import numpy

        return (f"Triton {triton.__version__}'s interpreter cannot run loops over loaded counts with NumPy "
                f"{numpy.__version__} ({e}); use Triton >= 3.9 or NumPy < 2.4")
    return "" if out.item() == 3 else "interpreter probe gave a wrong loop count"


@pytest.fixture(scope="module")
def bst():
    """sat.kernels.blocksparse_triton, its kernels bound to the interpreter (child run only)."""
    pytest.importorskip("triton")
    problem = _interpreter_problem()
    if problem:
        pytest.skip(problem)
    return importlib.import_module("sat.kernels.blocksparse_triton")


def _inputs(B, H, N, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def _layout(heads, nb, seed, density=0.4, empty_row=None):
    g = torch.Generator().manual_seed(seed)
    layout = (torch.rand(heads, nb, nb, generator=g) < density) | torch.eye(nb, dtype=torch.bool)
    if empty_row is not None:
        layout[:, empty_row] = False  # a query-block row with no active block: its output must be 0
    return layout


def _out_and_grads(fn, q, k, v, layout, bs, kpm):
    out = fn(q, k, v, layout, bs, kpm)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _assert_match(fn, q, k, v, layout, bs, kpm=None, atol=1e-4, rtol=1e-4):
    ours = _out_and_grads(fn, q, k, v, layout, bs, kpm)
    ref = _out_and_grads(reference_attention, q, k, v, layout, bs, kpm)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=name)
    return ours


@interpreted
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (32, 16), (64, 32)])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
def test_matches_reference(bst, block_size, head_dim, shared):
    B, H, N = 2, 2, 128
    layout = _layout(1 if shared else H, N // block_size, seed=block_size, empty_row=1)
    out, dq, _, _ = _assert_match(bst.triton_block_sparse_attention, *_inputs(B, H, N, head_dim, seed=0),
                                  layout, block_size)
    rows = slice(block_size, 2 * block_size)
    assert (out[:, :, rows] == 0).all() and (dq[:, :, rows] == 0).all()


@interpreted
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
def test_key_padding_and_fully_masked_rows(bst, shared):
    B, H, N, D, bs = 2, 2, 128, 32, 32
    layout = _layout(1 if shared else H, N // bs, seed=3)
    layout[:, 0] = False
    layout[:, 0, 3] = True  # query block 0 sees only key block 3 ...
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0, 96:] = False  # ... which is all padding in batch row 0: those rows give zeros
    kpm[1, 70:] = False  # padding that starts inside a block
    out, dq, _, _ = _assert_match(bst.triton_block_sparse_attention, *_inputs(B, H, N, D, seed=1), layout, bs,
                                  kpm)
    assert (out[0, :, :bs] == 0).all() and (dq[0, :, :bs] == 0).all()


@interpreted
def test_block_128_and_head_dim_48(bst):
    """A 128 block is walked as 64 x 64 tiles; a head dim that is not a power of two is zero-padded."""
    B, H, N = 1, 2, 256
    layout = torch.tensor([[[True, False], [True, True]], [[False, True], [True, False]]])
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0, 200:] = False
    _assert_match(bst.triton_block_sparse_attention, *_inputs(B, H, N, 16, seed=2), layout, 128, kpm)
    layout = _layout(1, 4, seed=4)
    _assert_match(bst.triton_block_sparse_attention, *_inputs(B, H, N, 48, seed=3), layout, 64, kpm)


@interpreted
def test_float16_and_strided_inputs(bst):
    B, H, N, D, bs = 2, 2, 64, 32, 16
    layout = _layout(H, N // bs, seed=5)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, 50:] = False
    _assert_match(bst.triton_block_sparse_attention, *_inputs(B, H, N, D, seed=4, dtype=torch.float16),
                  layout, bs, kpm, atol=1e-2, rtol=1e-2)
    # q, k, v as views of one (B, N, 3, H, D) projection, as attention layers produce them
    qkv = torch.randn(B, N, 3, H, D, generator=torch.Generator().manual_seed(6)).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), not contiguous

    def loss(fn):
        out = fn(q, k, v, layout, bs, kpm)
        return torch.autograd.grad(out.square().sum(), qkv)[0], out

    ours, ref = loss(bst.triton_block_sparse_attention), loss(reference_attention)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@interpreted
def test_entry_point_uses_triton_backend(bst):
    B, H, N, D, bs = 1, 2, 64, 16, 16
    layout = _layout(1, N // bs, seed=8)

    def fn(q, k, v, layout, bs, kpm):
        return block_sparse_attention(q, k, v, layout, bs, kpm, backend="triton")

    _assert_match(fn, *_inputs(B, H, N, D, seed=9), layout, bs)


@interpreted
def test_lookup_tables_are_cached_per_layout(bst):
    layout = _layout(2, 4, seed=10)
    tables = bst.lookup_tables(layout)
    assert bst.lookup_tables(layout) is tables
    assert bst.lookup_tables(layout.clone()) is not tables
    assert tables.fwd_cnt.tolist() == layout.sum(-1).tolist()
    for h in range(2):
        for r in range(4):
            n = int(tables.fwd_cnt[h, r])
            assert tables.fwd_idx[h, r, :n].tolist() == layout[h, r].nonzero().flatten().tolist()
            n = int(tables.bwd_cnt[h, r])
            assert tables.bwd_idx[h, r, :n].tolist() == layout[h, :, r].nonzero().flatten().tolist()
    layout[0, 0, 1] = ~layout[0, 0, 1]  # an in-place edit must not reuse the stale tables
    assert bst.lookup_tables(layout) is not tables


@interpreted
def test_unsupported_inputs_are_rejected(bst):
    layout = torch.ones(1, 2, 2, dtype=torch.bool)
    q = torch.randn(1, 1, 32, 8)
    with pytest.raises(ValueError, match="head_dim"):
        bst.triton_block_sparse_attention(q, q, q, layout, 16)
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match="dtype"):
        bst.triton_block_sparse_attention(q, q, q.double(), layout, 16)
    with pytest.raises(ValueError, match="block_size"):
        bst.triton_block_sparse_attention(q, q, q, torch.ones(1, 4, 4, dtype=torch.bool), 8)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(RuntimeError, match="backend 'triton' needs a CUDA GPU"):
        block_sparse_attention(q, q, q, torch.ones(1, 2, 2, dtype=torch.bool), 16, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="compiled kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_kernels_on_cuda(dtype):
    from sat.kernels.blocksparse_triton import triton_block_sparse_attention

    B, H, N, D, bs = 2, 2, 512, 64, 64
    layout = _layout(H, N // bs, seed=11, density=0.3, empty_row=2).cuda()
    kpm = torch.ones(B, N, dtype=torch.bool, device="cuda")
    kpm[1, 300:] = False
    q, k, v = (x.detach().cuda().requires_grad_() for x in _inputs(B, H, N, D, seed=12, dtype=dtype))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _assert_match(triton_block_sparse_attention, q, k, v, layout, bs, kpm, atol=tol, rtol=tol)


@pytest.mark.skipif(_INTERPRETER, reason="compiles the real kernels; the interpreter replaces them")
@pytest.mark.parametrize("dtype,head_dim,block_size,padded,arch", [
    (torch.bfloat16, 32, 64, True, 90),   # LRA shapes on an H100
    (torch.float16, 64, 32, False, 80),   # ViT-S shapes on an A100
    (torch.float32, 48, 128, True, 90),   # fp32, zero-padded head dim, a block walked as several tiles
])
def test_kernels_compile_for_nvidia_gpus(dtype, head_dim, block_size, padded, arch):
    """Ahead-of-time compilation down to a cubin (Triton ships ptxas), no GPU needed: catches what the
    interpreter cannot, such as type and scoping errors of the compiled language."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module("sat.kernels.blocksparse_triton")
    cfg = module._launch_config(block_size, head_dim, dtype)
    consts = module._consts(cfg, padded)
    options = {"num_warps": consts.pop("num_warps"), "num_stages": consts.pop("num_stages")}
    elem = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    pointers = {name: elem for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    pointers.update(LSE="*fp32", DELTA="*fp32", KPM="*i8" if padded else "*fp32", LUT_CNT="*i32",
                    LUT_IDX="*i32")
    kernels = (module._attn_fwd, module._attn_bwd_preprocess, module._attn_bwd_dkdv, module._attn_bwd_dq)
    for kernel in kernels:
        kconsts = {k: v for k, v in consts.items() if k in kernel.arg_names}
        signature = {name: "constexpr" if name in kconsts else
                     pointers.get(name, "fp32" if name in ("qk_scale", "sm_scale") else "i32")
                     for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=kconsts),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        assert compiled.asm.get("cubin"), kernel.__name__
        assert compiled.metadata.shared <= 99 * 1024, (kernel.__name__, compiled.metadata.shared)
