"""The torch backend of block-sparse attention agrees with the dense reference (docs/block-sparse.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sat.kernels import block_sparse_attention
from sat.kernels.runtime import RUNTIME, ThreadChoice


def _inputs(B, H, N, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def _random_layout(heads, nb, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(heads, nb, nb, generator=g) < density


def _run(backend, q, k, v, layout, bs, kpm=None):
    out = block_sparse_attention(q, k, v, layout, bs, kpm, backend=backend)
    g = torch.Generator().manual_seed(123)
    dout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out, dq, dk, dv


def _reference64(q, k, v, layout, bs, kpm=None, dout=None):
    """_run("reference", ...) computed in float64 with the same output gradient (or `dout`), returned in q's
    dtype: an fp32 reference's own rounding moves with MKL's choice of kernel (~6e-5 on dK now and then, in a
    fresh process)."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = block_sparse_attention(q64, k64, v64, layout, bs, kpm, backend="reference")
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=q.dtype)
    dout = dout.double()
    return tuple(x.to(q.dtype) for x in (out, *torch.autograd.grad(out, (q64, k64, v64), dout)))


def _assert_match(q, k, v, layout, bs, kpm=None, atol=1e-5):
    ours = _run("torch", q, k, v, layout, bs, kpm)
    ref = _reference64(q, k, v, layout, bs, kpm)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=name)
    return ours


@pytest.mark.parametrize("block_size", [1, 4, 8, 16])
@pytest.mark.parametrize("shared", [True, False])
def test_matches_reference(block_size, shared):
    B, H, N, D = 2, 3, 64, 8
    nb = N // block_size
    layout = _random_layout(1 if shared else H, nb, 0.3, seed=block_size)
    layout |= torch.eye(nb, dtype=torch.bool)  # every row has at least one block
    _assert_match(*_inputs(B, H, N, D, seed=0), layout, block_size)


@pytest.mark.parametrize("shared", [True, False])
def test_key_padding_mask(shared):
    B, H, N, D, bs = 3, 2, 48, 16, 8
    layout = _random_layout(1 if shared else H, N // bs, 0.5, seed=1)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0, 40:] = False  # padding inside the last block
    kpm[1, 13:] = False  # padding starting mid-block
    _assert_match(*_inputs(B, H, N, D, seed=2), layout, bs, kpm)


@pytest.mark.parametrize("shared", [True, False])
def test_strided_output_gradient_is_gathered_in_place(shared):
    """The attention module's output gradient arrives as the transpose of a (B, N, H, D) tensor; the backward
    gathers its blocks from there instead of a contiguous copy, with the same result bit for bit, padded keys
    and merged (padded-slot) buckets included."""
    B, H, N, D, bs = 2, 3, 64, 8, 8
    nb = N // bs
    layout = _random_layout(1 if shared else H, nb, 0.35, seed=4) | torch.eye(nb, dtype=torch.bool)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, 50:] = False
    q, k, v = _inputs(B, H, N, D, seed=5)
    g = torch.Generator().manual_seed(6)
    strided = torch.randn(B, N, H, D, generator=g).transpose(1, 2)  # (B, H, N, D), not contiguous
    assert not strided.is_contiguous()
    # every count merged into one bucket (padded slots); one way of threading for both (their pieces differ)
    with RUNTIME.override(bucket_overhead=1e9, threading="team"):
        grads, gathered_in_place = [], []
        for dout in (strided, strided.contiguous()):
            out = block_sparse_attention(q, k, v, layout, bs, kpm, backend="torch")
            with torch.profiler.profile() as prof:
                grads.append(torch.autograd.grad(out, (q, k, v), dout))
            gathered_in_place.append(any(e.key == "aten::index" for e in prof.key_averages()))
    assert gathered_in_place == [True, False]  # the strided gradient took the in-place path, the copy did not
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    expected = _reference64(q, k, v, layout, bs, kpm, dout=strided)[1:]  # and both are right
    for a, b in zip(grads[0], expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rows_with_only_padded_keys_give_zeros():
    B, H, N, D, bs = 2, 2, 32, 8, 8
    layout = torch.zeros(1, 4, 4, dtype=torch.bool)
    layout[0, 0, 3] = True  # block row 0 sees only the last key block ...
    layout[0, 1:, :2] = True
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[:, 24:] = False  # ... which is all padding
    out, dq, dk, dv = _assert_match(*_inputs(B, H, N, D, seed=3), layout, bs, kpm)
    assert (out[:, :, :bs] == 0).all()
    assert (dq[:, :, :bs] == 0).all()


def test_rows_with_no_active_block():
    B, H, N, D, bs = 2, 2, 32, 8, 4
    layout = _random_layout(H, N // bs, 0.4, seed=4)
    layout[:, 2] = False
    layout[1, 5] = False
    out, *_ = _assert_match(*_inputs(B, H, N, D, seed=5), layout, bs)
    assert (out[:, :, 2 * bs:3 * bs] == 0).all()
    assert (out[:, 1, 5 * bs:6 * bs] == 0).all()


def test_empty_and_full_layouts():
    B, H, N, D, bs = 1, 2, 16, 4, 4
    q, k, v = _inputs(B, H, N, D, seed=6)
    out, dq, dk, dv = _assert_match(q, k, v, torch.zeros(1, 4, 4, dtype=torch.bool), bs)
    assert (out == 0).all() and (dq == 0).all() and (dk == 0).all() and (dv == 0).all()
    _assert_match(q, k, v, torch.ones(H, 4, 4, dtype=torch.bool), bs)


def test_half_precision_inputs():
    B, H, N, D, bs = 1, 2, 32, 8, 8
    layout = _random_layout(1, N // bs, 0.5, seed=7) | torch.eye(N // bs, dtype=torch.bool)
    q, k, v = _inputs(B, H, N, D, seed=8, dtype=torch.bfloat16)
    out, dq, dk, dv = _run("torch", q, k, v, layout, bs)
    ref = _run("reference", q, k, v, layout, bs)
    assert out.dtype == torch.bfloat16 and dq.dtype == torch.bfloat16
    for a, b in zip((out, dq, dk, dv), ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("B, H, shared", [(3, 1, True), (1, 2, False), (1, 1, True), (5, 2, False)])
def test_batch_splits_across_threads(B, H, shared):
    """The (batch, head) pairs sharing a layout are split across threads: odd counts, one pair, several."""
    N, D, bs = 48, 8, 8
    layout = _random_layout(1 if shared else H, N // bs, 0.4, seed=B + H)
    layout |= torch.eye(N // bs, dtype=torch.bool)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[-1, 30:] = False
    _assert_match(*_inputs(B, H, N, D, seed=9), layout, bs, kpm)


@pytest.mark.parametrize("piece_blocks", [64, 3])
def test_threading_modes_and_no_grad_path_agree(monkeypatch, piece_blocks):
    """One thread, an intra-op team, single-threaded workers (whole buckets or small pieces of them) and the
    no-grad path all agree with the reference."""
    B, H, N, D, bs = 2, 2, 64, 8, 8
    layout = _random_layout(1, N // bs, 0.3, seed=10) | torch.eye(N // bs, dtype=torch.bool)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, 50:] = False
    q, k, v = _inputs(B, H, N, D, seed=11)
    ref = _reference64(q, k, v, layout, bs, kpm)
    threads = torch.get_num_threads()
    for mode, n_threads in (("team", 1), ("team", 2), ("workers", 2)):
        torch.set_num_threads(n_threads)
        try:
            with RUNTIME.override(threading=mode, piece_blocks=piece_blocks):
                ours = _run("torch", q, k, v, layout, bs, kpm)
                with torch.no_grad():
                    no_grad = block_sparse_attention(q, k, v, layout, bs, kpm, backend="torch")
        finally:
            torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        torch.testing.assert_close(no_grad, ours[0], atol=0, rtol=0)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_backward_twice_with_retain_graph():
    B, H, N, D, bs = 1, 2, 32, 8, 8
    layout = torch.ones(1, 4, 4, dtype=torch.bool)
    q, k, v = _inputs(B, H, N, D, seed=12)
    out = block_sparse_attention(q, k, v, layout, bs, backend="torch")
    first = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize(
    "shape, layout_shape, bs",
    [
        ((2, 2, 30, 8), (1, 3, 3), 10),  # fine
        ((2, 2, 30, 8), (1, 3, 3), 8),  # N not a multiple of the block size
        ((2, 2, 32, 8), (1, 3, 3), 8),  # layout blocks do not match N
        ((2, 2, 32, 8), (3, 4, 4), 8),  # layout heads neither 1 nor H
        ((2, 32, 8), (1, 4, 4), 8),  # q not 4-D
    ],
)
def test_bad_shapes_raise(shape, layout_shape, bs):
    q = torch.randn(shape)
    layout = torch.ones(layout_shape, dtype=torch.bool)
    if layout_shape == (1, 3, 3) and bs == 10:
        assert block_sparse_attention(q, q, q, layout, bs, backend="torch").shape == shape
        return
    with pytest.raises(ValueError):
        block_sparse_attention(q, q, q, layout, bs, backend="torch")


def test_cpu_benchmark_runs(capsys):
    """bench/attention_cpu.py end to end at a tiny size (FlexAttention left out: compiling it takes long)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "attention_cpu.py"
    spec = importlib.util.spec_from_file_location("attention_cpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--n", "128", "--density", "0.2", "--block", "16", "--batch", "1", "--reps", "1", "--warmup", "0",
            "--no-flex"]
    assert bench.main(args) == 0
    table = capsys.readouterr().out
    assert "| 128 |" in table and "fwd+bwd" in table
    layout = bench.topk_layout(8, 0.05, torch.Generator().manual_seed(0))
    assert layout.shape == (1, 8, 8) and layout.any(-1).all()


@pytest.mark.parametrize("fast", ["team", "workers"])
def test_thread_choice_settles_on_the_faster_way(fast):
    choice = ThreadChoice()
    picks = []
    for _ in range(100):
        mode = choice.choose()
        picks.append(mode)
        choice.record(mode, 1.0 if mode == fast else 3.0)
    assert picks.count(fast) >= 90
    assert "team" in picks[:4] and "workers" in picks[:4]  # both ways timed first
