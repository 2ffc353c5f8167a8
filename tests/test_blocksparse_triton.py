"""The Triton backend agrees with the dense reference (docs/block-sparse.md), run by Triton's CPU interpreter.

Triton binds every @triton.jit function, its own library included, to the interpreter when it is decorated,
so TRITON_INTERPRET=1 has to be set before triton is first imported, and setting it for the whole pytest run
would also send other tests' compiled kernels (torch.compile on a GPU) to the interpreter. So the
interpreter tests run in a child pytest over this file with the variable set from the start:
`test_kernels_in_interpreter_subprocess` starts it, and the tests marked `interpreted` run only there.
Run them directly with `TRITON_INTERPRET=1 python -m pytest tests/test_blocksparse_triton.py`.
Without a GPU the launches training makes are still compiled for sm_80/sm_90 (tests/test_triton_compile.py);
with one, test_compiled_kernels_on_cuda runs them, at the tolerance of each input dtype and fp32 precision.
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
from sat.kernels.triton_support import TOLERANCE, fp32_precision

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
        for r in range(4):  # entries are block * 16 + bits; one block per program: bit 0 only
            n = int(tables.fwd_cnt[h, r])
            assert tables.fwd_idx[h, r, :n].tolist() == (layout[h, r].nonzero().flatten() * 16 + 1).tolist()
            n = int(tables.bwd_cnt[h, r])
            assert tables.bwd_idx[h, r, :n].tolist() == (layout[h, :, r].nonzero().flatten() * 16 + 1).tolist()
    assert bst.lookup_tables(layout, 2) is bst.lookup_tables(layout, 2) is not tables
    layout[0, 0, 1] = ~layout[0, 0, 1]  # an in-place edit must not reuse the stale tables
    assert bst.lookup_tables(layout) is not tables


def test_grouped_lookup_tables():
    """A program of `group` blocks walks the union of their rows; bit g marks row g's own blocks."""
    from sat.kernels.blocksparse_triton import build_lookup_tables

    layout = torch.zeros(1, 5, 5, dtype=torch.bool)
    layout[0, 0, [1, 3]] = True
    layout[0, 1, [3, 4]] = True
    layout[0, 4, 0] = True  # row 4 is alone in the last group of 2 (rows 4 and the missing 5)
    t = build_lookup_tables(layout, group=2)
    assert t.fwd_cnt.tolist() == [[3, 0, 1]]
    assert t.fwd_idx[0, 0, :3].tolist() == [1 * 16 + 1, 3 * 16 + 3, 4 * 16 + 2]
    assert t.fwd_idx[0, 2, :1].tolist() == [0 * 16 + 1]
    assert t.bwd_cnt.tolist() == [[2, 2, 1]]  # key-block columns (0, 1), (2, 3), (4, -)
    assert t.bwd_idx[0, 0, :2].tolist() == [0 * 16 + 2, 4 * 16 + 1]
    assert t.bwd_idx[0, 1, :2].tolist() == [0 * 16 + 2, 1 * 16 + 2]
    assert t.bwd_idx[0, 2, :1].tolist() == [1 * 16 + 1]
    with pytest.raises(ValueError, match="group"):
        build_lookup_tables(layout, group=5)


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
    with pytest.raises(ValueError, match="backend 'triton' cannot run this model: device cpu is not a CUDA GPU"):
        block_sparse_attention(q, q, q, torch.ones(1, 2, 2, dtype=torch.bool), 16, backend="triton")


@interpreted
@pytest.mark.parametrize("block_size,N,shared", [(32, 224, True), (32, 224, False), (16, 160, True)],
                         ids=["block32-shared", "block32-per_head", "block16-shared"])
def test_hopper_tiles_match_reference(bst, block_size, N, shared):
    """sm_90 programs of 64 rows cover 2 blocks of 32 (4 of 16): the union of their layout rows, per-row
    masks, a last group past N (7 and 10 blocks are not multiples of the group), padding, an empty row.
    fp32 inputs with TF32 allowed take these tiles; the interpreter computes TF32 dots in fp32, so the
    comparison is exact-fp32 tight."""
    B, H, D = 2, 2, 32
    nb = N // block_size
    layout = _layout(1 if shared else H, nb, seed=N + block_size, empty_row=1)
    layout[:, nb - 1] = False
    layout[:, nb - 1, 0] = True  # the last, unpaired block row sees only key block 0
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, N - block_size - 5:] = False
    with fp32_precision("tf32"), bst.configure_for((9, 0)):
        q, k, v = _inputs(B, H, N, D, seed=13)
        cfg = bst.config_for(q, block_size)
        assert (cfg.rows, cfg.group, cfg.dot_prec) == (64, 64 // block_size, "tf32")
        out, dq, _, _ = _assert_match(bst.triton_block_sparse_attention, q, k, v, layout, block_size, kpm)
    rows = slice(block_size, 2 * block_size)  # the empty query-block row, the second of its group
    assert (out[:, :, rows] == 0).all() and (dq[:, :, rows] == 0).all()


@interpreted
def test_hopper_tiles_in_half_precision(bst):
    B, H, N, D, bs = 1, 2, 96, 16, 32
    layout = _layout(H, N // bs, seed=14)
    with bst.configure_for((9, 0)):
        q, k, v = _inputs(B, H, N, D, seed=15, dtype=torch.float16)
        assert bst.config_for(q, bs).group == 2
        _assert_match(bst.triton_block_sparse_attention, q, k, v, layout, bs, atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------- fp32 precision policy


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (10 mantissa bits, nearest even), as tensor cores read fp32 operands."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)


def _emulated(q, k, v, layout, bs, kpm, dout, rnd):
    """Attention forward and backward with every matmul's operands passed through `rnd` (dense math)."""
    allowed = layout.repeat_interleave(bs, -1).repeat_interleave(bs, -2)[None] & kpm[:, None, None, :]
    scale = q.shape[-1] ** -0.5
    s = (rnd(q) @ rnd(k).transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = rnd(p) @ rnd(v)
    ds = p * (rnd(dout) @ rnd(v).transpose(-1, -2) - (out * dout).sum(-1, keepdim=True))
    dq, dk = rnd(ds) @ rnd(k) * scale, rnd(ds).transpose(-1, -2) @ rnd(q) * scale
    return out, dq, dk, rnd(p).transpose(-1, -2) @ rnd(dout)


def test_tf32_tolerance_fits_tf32_and_is_wider_than_exact_fp32():
    """The GPU test's tolerance for fp32 with TF32 allowed holds for TF32 arithmetic (emulated here on the
    GPU test's shapes), and the exact-fp32 tolerance would not: each precision is checked at its own bound."""
    B, H, N, D, bs = 2, 2, 512, 64, 64
    layout = _layout(H, N // bs, seed=11, density=0.3, empty_row=2)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, 300:] = False
    q, k, v = (x.detach() for x in _inputs(B, H, N, D, seed=12))
    dout = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(7))
    ref = _out_and_grads(reference_attention, *(x.requires_grad_() for x in (q, k, v)), layout, bs, kpm)
    exact = _emulated(q, k, v, layout, bs, kpm, dout, lambda x: x)
    tf32 = _emulated(q, k, v, layout, bs, kpm, dout, _tf32)
    for a, e, r in zip(tf32, exact, ref, strict=True):
        torch.testing.assert_close(e, r, atol=TOLERANCE["fp32"], rtol=TOLERANCE["fp32"])
        torch.testing.assert_close(a, r, atol=TOLERANCE["tf32"] / 2, rtol=TOLERANCE["tf32"] / 2)  # margin
    assert any(not torch.allclose(a, r, atol=TOLERANCE["fp32"], rtol=TOLERANCE["fp32"])
               for a, r in zip(tf32, ref, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="compiled kernels need a CUDA GPU")
@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32", "tf32"])
@pytest.mark.parametrize("block_size", [32, 64])
def test_compiled_kernels_on_cuda(name, block_size):
    from sat.kernels.blocksparse_triton import triton_block_sparse_attention
    from sat.kernels.triton_support import DTYPES

    dtype, precision = DTYPES[name]
    B, H, N, D, bs = 2, 2, 512, 64, block_size
    layout = _layout(H, N // bs, seed=11, density=0.3, empty_row=2).cuda()
    kpm = torch.ones(B, N, dtype=torch.bool, device="cuda")
    kpm[1, 300:] = False
    q, k, v = (x.detach().cuda().requires_grad_() for x in _inputs(B, H, N, D, seed=12, dtype=dtype))
    with fp32_precision(precision):
        ours = _out_and_grads(triton_block_sparse_attention, q, k, v, layout, bs, kpm)
    with fp32_precision("ieee"):  # the reference's own fp32 matmuls stay exact
        ref = _out_and_grads(reference_attention, q, k, v, layout, bs, kpm)
    for what, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=TOLERANCE[name], rtol=TOLERANCE[name], msg=what)
