"""The torch backend's merged buckets (sat/kernels/blocksparse_torch.py): rows of several block counts padded
to one count with masked slots give the reference's outputs and gradients, for every layout kind that
bench/attention_cpu.py times, per head, with a key padding mask, with empty rows and with both ways of using
the CPU threads; the merge itself is the cheapest under its cost model."""

from __future__ import annotations

import importlib.util
import itertools
import random
from pathlib import Path

import pytest
import torch

from sat.kernels.blocksparse_torch import merge_counts, plan_for, torch_block_sparse_attention
from sat.kernels.reference import reference_attention
from sat.kernels.runtime import RUNTIME

_BENCH = Path(__file__).resolve().parent.parent / "bench" / "attention_cpu.py"
_spec = importlib.util.spec_from_file_location("attention_cpu_layouts", _BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

KINDS = list(bench.LAYOUTS)  # uniform, measured, random+diag, imbalanced, learned, per-head
# RUNTIME.bucket_overhead: never merge; merge some groups (at these small shapes the default merges them all)
MERGES = {"none": 0.0, "some": 150.0, "one bucket": 1e15}


def _layout(kind, nb, density, heads, seed, empty_rows=False):
    layout = bench.make_layout(kind, nb, density, heads, torch.Generator().manual_seed(seed))
    if empty_rows:
        layout = layout.clone()
        layout[..., 1, :] = False  # a query-block row with no active block, in every head
        layout[-1, nb - 2, :] = False
    return layout


def _inputs(B, H, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).requires_grad_() for _ in range(3)]


def _padding(B, N, bs):
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0, N - bs - 3:] = False  # padding starting mid-block, the last block all padding
    if B > 1:
        kpm[1, bs:] = False  # only the first key block is real: rows without it see padding only
    return kpm


def _grads(fn, q, k, v, layout, bs, kpm):
    out = fn(q, k, v, layout, bs, kpm)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _check(layout, bs, B=2, H=2, D=8, kpm=True, seed=0):
    N = layout.shape[-1] * bs
    q, k, v = _inputs(B, H, N, D, seed)
    mask = _padding(B, N, bs) if kpm else None
    ours = _grads(torch_block_sparse_attention, q, k, v, layout, bs, mask)
    # the reference in float64: an fp32 reference's own rounding moves with MKL's choice of kernel
    ref = _grads(reference_attention, *(x.detach().double().requires_grad_() for x in (q, k, v)), layout, bs, mask)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        assert torch.isfinite(a).all(), name
        # a wrong mask or a padded slot that leaks is off by ~0.1
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():  # the path without saved probabilities gives the same output, bit for bit
        torch.testing.assert_close(torch_block_sparse_attention(q, k, v, layout, bs, mask), ours[0], atol=0, rtol=0)
    return ours


@pytest.fixture(params=list(MERGES))
def merge(request):
    with RUNTIME.override(bucket_overhead=MERGES[request.param]):
        yield request.param


@pytest.mark.parametrize("kind", KINDS)
def test_layout_kinds_match_reference(kind, merge):
    heads = 2
    layout = _layout(kind, 12, 0.25, heads, seed=KINDS.index(kind))
    _check(layout, bs=4, H=heads, kpm=True)
    _check(layout, bs=4, H=heads, kpm=False)


@pytest.mark.parametrize("kind", ["learned", "per-head", "imbalanced"])
def test_empty_rows(kind, merge):
    heads = 2
    layout = _layout(kind, 10, 0.3, heads, seed=3, empty_rows=True)
    out, dq, dk, dv = _check(layout, bs=4, H=heads, kpm=True)
    assert (out[:, :, 4:8] == 0).all() and (dq[:, :, 4:8] == 0).all()


def test_one_bucket_pads_every_row():
    """Merged into one bucket, every row but the widest has masked slots; the plan records them."""
    layout = _layout("learned", 12, 0.25, 1, seed=5)
    counts = sorted(set(layout.sum(-1).flatten().tolist()))
    assert len(counts) >= 4
    plan = plan_for(layout, torch.device("cpu"))
    with RUNTIME.override(bucket_overhead=1e15):
        sched = plan.schedule(4, 4, 8, torch.device("cpu"))
    (bucket,) = sched.buckets
    assert bucket.count == max(counts) and bucket.active == int(layout.sum())
    assert int(bucket.slots.sum()) == int(layout.sum())
    rows = layout.reshape(-1, 12)[bucket.rows]  # (r, nb)
    for row, keys, slots in zip(rows, bucket.key_blocks, bucket.slots, strict=True):
        assert set(keys[slots].tolist()) == set(row.nonzero()[:, 0].tolist())
        assert row[keys].all()  # padded slots point at one of the row's own blocks
    with RUNTIME.override(bucket_overhead=1e15):
        _check(layout, bs=4, B=4, H=1)


@pytest.mark.parametrize("mode, threads, piece_blocks", [("team", 1, 64), ("team", 2, 512), ("workers", 2, 64),
                                                         ("workers", 2, 3)])
def test_thread_strategies_agree(mode, threads, piece_blocks):
    """Both ways of using the threads, whole buckets and small pieces of merged buckets, give the reference."""
    layout = _layout("per-head", 12, 0.25, 2, seed=11, empty_rows=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with RUNTIME.override(threading=mode, piece_blocks=piece_blocks, team_piece_blocks=piece_blocks,
                              bucket_overhead=1e15):
            _check(layout, bs=4, B=3, H=2, kpm=True)
    finally:
        torch.set_num_threads(before)


def test_merging_keeps_the_unmerged_results():
    """Padded slots add exact zeros: merged and unmerged buckets agree to rounding (the products' lengths
    differ, so the summation order may)."""
    layout = _layout("random+diag", 16, 0.3, 1, seed=2)
    q, k, v = _inputs(2, 2, 64, 8, seed=4)
    kpm = _padding(2, 64, 4)
    results = {}
    for name in ("none", "one bucket"):
        with RUNTIME.override(bucket_overhead=MERGES[name]):
            results[name] = _grads(torch_block_sparse_attention, q, k, v, layout, 4, kpm)
    for a, b in zip(results["none"], results["one bucket"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _brute_force(counts, rows, overhead):
    best = None
    m = len(counts)
    for cuts in itertools.product([False, True], repeat=m - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [m]
        cost = sum(overhead + counts[j - 1] * sum(rows[i:j]) for i, j in itertools.pairwise(bounds))
        best = cost if best is None else min(best, cost)
    return best


def test_merge_is_the_cheapest_partition():
    rng = random.Random(0)
    for _ in range(200):
        m = rng.randint(1, 8)
        counts = sorted(rng.sample(range(1, 40), m))
        rows = [rng.randint(1, 20) for _ in range(m)]
        overhead = rng.choice([0.0, 1.0, 10.0, 100.0, 1e4])
        runs = merge_counts(counts, rows, overhead)
        assert [i for i, _ in runs] == [0] + [j for _, j in runs[:-1]] and runs[-1][1] == m  # a partition
        cost = sum(overhead + counts[j - 1] * sum(rows[i:j]) for i, j in runs)
        assert cost == pytest.approx(_brute_force(counts, rows, overhead))
    assert merge_counts([1, 2, 3], [5, 5, 5], 0.0) == [(0, 1), (1, 2), (2, 3)]  # free buckets: no padding
    assert merge_counts([1, 2, 3], [5, 5, 5], 1e9) == [(0, 3)]  # costly buckets: one
    assert merge_counts([], [], 1.0) == []


def test_the_model_merges_less_as_the_batch_grows():
    """The padded blocks cost in proportion to the (batch, head) pairs, a bucket's operations do not."""
    layout = _layout("per-head", 64, 0.1, 2, seed=0)
    plan = plan_for(layout, torch.device("cpu"))
    small, large = (len(plan.schedule(g, 64, 32, torch.device("cpu")).buckets) for g in (1, 4096))
    assert small < len(plan.groups)
    assert small <= large <= len(plan.groups)


def test_bucket_overhead_is_checked():
    with pytest.raises(ValueError, match="bucket_overhead"), RUNTIME.override(bucket_overhead=-1.0):
        pass
    assert RUNTIME.bucket_overhead > 0
