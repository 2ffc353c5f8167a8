"""Block-sparse attention in plain PyTorch: only the active blocks are computed (docs/block-sparse.md).

The query-block rows of the layout are grouped by their number `c` of active key blocks, and the groups are
computed in buckets: within a bucket every row has `c` slots, so one batched matrix product computes all of
its scores: gather the `c` key blocks of each row (a lookup table of block indices), `S = Q K^T` is
(rows, bs, c*bs), a fused softmax, `O = P V`. The backward reuses the saved probabilities P (memory
proportional to the active blocks, like everything else here), so it needs four batched products per bucket:
dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K, dK = dS^T Q, with dK and dV scattered
back by index_add. The plan depends only on the layout, which changes rarely, so it is cached
(sat/kernels/runtime.py holds the cache, the threads and the workspaces).

A bucket costs a fixed ~20 operations besides its arithmetic, so a layout with many distinct counts (learned
and per-head layouts have 10-25) pays that many times. Buckets may therefore merge groups of neighbouring
counts: a row with fewer blocks is padded to the bucket's count with slots that repeat its last key block and
get the score -inf (a bias added before the softmax), so their probabilities are exactly 0, the output and dQ
are unchanged and dK and dV receive exact zeros from them. Which groups merge is the cheapest split under a
cost model (`merge_counts`, a dynamic programme over the sorted counts: a fixed cost per bucket against the
padded blocks, see the constants below), chosen per batch size and cached with the plan. Padded keys (the key
padding mask) get the same -inf bias.

On a CPU the work is a few hundred small operations, and there are two ways to use the threads (see
sat.kernels.runtime.ThreadChoice): each operation on PyTorch's intra-op thread team, or the batch split over
single-threaded workers, each running every bucket for its own range of (batch, head) pairs. The faster way is
measured at run time; the results agree to rounding (the two split the products into different pieces). Workers
take the buckets in pieces small enough to stay in cache; temporaries live in per-thread buffers kept between
calls, and the softmax and its backward run in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from sat.kernels.dense import softmax_, softmax_backward_
from sat.kernels.runtime import RUNTIME

# The cost model that merges buckets (merge_counts), in units of the elementwise work on one fp32 score element:
# a bucket of r rows padded to c slots costs
#     overhead + pairs_per_thread * r * c * bs * bs * (1 + _MATMUL * D).
# Calibrated on the project's 2-core CPU machine, idle: one thread spends ~4.7 ns + 0.13 ns * D per score element
# of a block slot at block 64 (6.7, 9.6, 12.8 ns at D 16, 32, 64), so _MATMUL ~0.03: the six products weigh
# less than the elementwise passes (bias, softmax and its backward, the copies of P, the gathers). A bucket's
# fixed cost, timed where its arithmetic is negligible (block 8, D 8, B*H = 8, 64 buckets against 1), is
# ~170 us of wall time on the intra-op team (~3.7e4 units), ~450 us split over the two workers (~9.6e4; their
# Python threads share the interpreter lock) and 125-165 us of CPU time on one thread: RUNTIME.bucket_overhead,
# 6e4 by default. At B*H = 8, block 64, D 32 on two threads a bucket is then worth ~1.9 padded block slots of
# the layout, so only sparse groups merge; with few (batch, head) pairs or small blocks it is worth more. On a
# GPU an operation costs a launch (~10 us) and a block next to nothing, so the overhead there (_GPU_OVERHEAD,
# an estimate, not measured) merges far more.
_MATMUL = 0.03
_GPU_OVERHEAD = 1e7


@dataclass
class _Bucket:
    """The `rows` query-block rows computed together, each with `count` slots: a plan's groups hold the rows with
    exactly `count` active key blocks; a merged bucket pads rows with fewer to `count`, its padded slots repeat
    the row's last key block and are masked (`slots`)."""

    count: int  # slots per row: the largest count among the rows
    rows: torch.Tensor  # (r,) row ids h * nb + i in [0, Hl*nb)
    keys: torch.Tensor  # (r, count) key-block row ids h * nb + j, ascending j per row, then the padded slots
    key_blocks: torch.Tensor  # (r, count) key-block index j in [0, nb), for the padding mask
    slots: torch.Tensor | None = None  # (r, count) bool: True at a real block; None when no slot is padded

    @property
    def num_rows(self) -> int:
        return self.rows.numel()

    @property
    def active(self) -> int:
        """Real (unpadded) blocks."""
        return self.num_rows * self.count if self.slots is None else int(self.slots.sum())


def merge_counts(counts: list[int], rows: list[int], overhead: float) -> list[tuple[int, int]]:
    """Split sorted distinct counts into runs [i, j) that become one bucket each, padded to counts[j - 1]:
    the least total cost sum(overhead + counts[j - 1] * rows in the run), by dynamic programming."""
    m = len(counts)
    best = [0.0] + [math.inf] * m  # best[j]: the cheapest cost of the first j counts
    start = [0] * (m + 1)
    for j in range(1, m + 1):
        run_rows = 0
        for i in range(j - 1, -1, -1):  # the last run is [i, j)
            run_rows += rows[i]
            cost = best[i] + overhead + counts[j - 1] * run_rows
            if cost < best[j]:
                best[j], start[j] = cost, i
    runs, j = [], m
    while j > 0:
        runs.append((start[j], j))
        j = start[j]
    return runs[::-1]


@dataclass
class _Schedule:
    """The buckets of one plan for one batch G of (batch, head) pairs, with their flat block indices.

    Tensors are viewed as (G*Hl*nb, bs, D) blocks; each piece of a bucket gathers its query blocks and their key
    and value blocks by flat index.
    """

    buckets: list[_Bucket]
    flat: list[tuple[torch.Tensor, torch.Tensor]]  # per bucket: query blocks (G*r,), key blocks (G*r*c,)
    bias: list[torch.Tensor | None]  # per bucket: (G*r, 1, c, 1) fp32, -inf at padded slots, else 0; None if none

    @property
    def active_blocks(self) -> int:
        """Blocks computed per (batch, head) pair, padded slots included."""
        return sum(b.num_rows * b.count for b in self.buckets)

    def pieces(self, g0: int, g1: int, max_blocks: int | None):
        """(bucket number, a, b): query blocks [a, b) of a bucket's (g, row) order, covering g in [g0, g1),
        at most max_blocks blocks at a time (or one query block) so that a piece can stay in cache;
        whole buckets for None."""
        for i, bucket in enumerate(self.buckets):
            r = bucket.num_rows
            step = (g1 - g0) * r if max_blocks is None else max(1, max_blocks // bucket.count)
            for a in range(g0 * r, g1 * r, step):
                yield i, a, min(a + step, g1 * r)

    def piece_blocks(self, g0: int, g1: int, max_blocks: int | None) -> int:
        """The most blocks in one of the pieces: the size of the buffers."""
        return max(((b - a) * self.buckets[i].count for i, a, b in self.pieces(g0, g1, max_blocks)), default=0)


@dataclass
class _Plan:
    """Everything derived from one layout: its rows grouped by their exact count of active blocks, whether some
    row has no active block, and per batch size the schedule that merges those groups into buckets."""

    heads: int  # Hl: 1 (shared by heads) or H
    nb: int
    groups: list[_Bucket]  # one per distinct count, ascending, unpadded
    has_empty_rows: bool
    _schedules: dict = field(default_factory=dict)

    def schedule(self, batch: int, block_size: int, head_dim: int, device: torch.device) -> _Schedule:
        """The buckets for G = batch pairs: groups merged where the operations saved cost more than the padded
        blocks (merge_counts with the cost model above; pairs per thread as the CPU threads split them)."""
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        pairs = math.ceil(batch / max(1, min(batch, threads)))
        block = pairs * block_size * block_size * (1.0 + _MATMUL * head_dim)  # cost of a block's slot
        overhead = (RUNTIME.bucket_overhead if device.type == "cpu" else _GPU_OVERHEAD) / block  # in slots
        key = (batch, block_size, overhead)
        if key not in self._schedules:
            runs = merge_counts([g.count for g in self.groups], [g.num_rows for g in self.groups], overhead)
            buckets = [_pad(self.groups[i:j]) for i, j in runs]
            flat, bias = [], []
            for b in buckets:
                offsets = torch.arange(batch, device=b.rows.device) * (self.heads * self.nb)  # (G,)
                flat.append(((offsets[:, None] + b.rows).reshape(-1), (offsets[:, None, None] + b.keys).reshape(-1)))
                bias.append(None if b.slots is None else _bias(b.slots[None, :, :, None], batch))
            self._schedules[key] = _Schedule(buckets, flat, bias)
        return self._schedules[key]


def _pad(groups: list[_Bucket]) -> _Bucket:
    """One bucket of the rows of several groups (ascending counts), each row padded to the largest count with
    copies of its last key block, marked in `slots`."""
    if len(groups) == 1:
        return groups[0]
    c = groups[-1].count

    def padded(x):  # (r, count) -> (r, c), the last column repeated
        return torch.cat([x, x[:, -1:].expand(-1, c - x.shape[1])], dim=1)

    slot = torch.arange(c, device=groups[0].rows.device)
    return _Bucket(c, torch.cat([g.rows for g in groups]), torch.cat([padded(g.keys) for g in groups]),
                   torch.cat([padded(g.key_blocks) for g in groups]),
                   torch.cat([(slot < g.count).expand(g.num_rows, c) for g in groups]))


def _bias(keep: torch.Tensor, batch: int) -> torch.Tensor:
    """Score bias (G*r, 1, c, w) fp32, 0 where keep and -inf elsewhere, from keep: bool (B or 1, r, c, w), w = 1
    (per slot) or bs (per key), repeated over the (batch, head) pairs sharing the layout, in (g, row) order.
    Added to the scores viewed as (n, bs, c, bs): on a CPU a sixth of the time of masked_fill_ with the same
    broadcast mask, and adding 0 leaves a score exactly as it was."""
    B, r, c, w = keep.shape
    bias = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(~keep, float("-inf"))
    return bias[:, None].expand(B, batch // B, r, c, w).reshape(batch * r, 1, c, w)


def _make_plan(layout: torch.Tensor, device: torch.device) -> _Plan:
    heads, nb, _ = layout.shape
    rows_layout = layout.reshape(heads * nb, nb)  # (Hl*nb, nb): one row per (head, query block)
    counts = rows_layout.sum(-1)  # (Hl*nb,)
    head_offset = torch.arange(heads).repeat_interleave(nb) * nb  # (Hl*nb,): h * nb
    groups = []
    for c in sorted(set(counts.tolist()) - {0}):
        rows = (counts == c).nonzero()[:, 0]  # (r,)
        key_blocks = rows_layout[rows].nonzero()[:, 1].reshape(len(rows), c)  # (r, c)
        keys = key_blocks + head_offset[rows, None]
        groups.append(_Bucket(c, rows.to(device), keys.to(device), key_blocks.to(device)))
    return _Plan(heads, nb, groups, bool((counts == 0).any()))


def plan_for(layout: torch.Tensor, device: torch.device) -> _Plan:
    """Cached plan of a boolean layout (the cache key is the layout's content)."""
    cpu_layout = layout.detach().to("cpu", torch.bool).contiguous()
    key = (tuple(cpu_layout.shape), cpu_layout.numpy().tobytes(), str(device))
    return RUNTIME.plan(key, lambda: _make_plan(cpu_layout, device))


def _padding_bias(key_padding_mask, bucket, batch):
    """Score bias of a bucket's gathered blocks for padded keys and padded slots, per query block in (g, row)
    order: (G*r, 1, c, bs) fp32, and the rows with no key left, (G*r, 1, 1) bool, or None if there is none."""
    keep = key_padding_mask[:, bucket.key_blocks]  # (B, r, c, bs)
    if bucket.slots is not None:
        keep = keep & bucket.slots[None, :, :, None]
    alive = keep.flatten(2).any(-1)  # (B, r)
    dead = None
    if not bool(alive.all()):
        B, r = alive.shape
        dead = (~alive)[:, None].expand(B, batch // B, r).reshape(batch * r, 1, 1)
    return _bias(keep, batch), dead


def _gather(src, index, buffer, rows, width):
    """src[index] written into buffer, viewed as (rows, width, D): the key blocks of each query block."""
    n, bs, D = index.numel(), src.shape[1], src.shape[2]
    out = buffer[:n * bs * D].view(n, bs, D)
    torch.index_select(src, 0, index, out=out)
    return out.view(rows, width, D)


def _block_gatherer(x, nb, bs, flat_rows):
    """A function (bucket, a, b, out) -> out holding the (n, bs, D) fp32 blocks of x (B, H, N, D) at the flat
    query-block indices flat_rows[bucket][a:b] (flat index (b * H + h) * nb + i).

    The incoming gradient is usually the transpose of the output projection's (B, N, H, D) gradient; copying it
    to the blocks' contiguous layout would keep one more activation alive at a sparse step's peak, so an fp32
    x that is not contiguous is gathered from where it lies (by its (b, h, i) indices, a slower kernel per
    element than index_select's row copies, which is about what the copy cost)."""
    B, H, N, D = x.shape
    if x.dtype != torch.float32 or x.is_contiguous():
        src = x.reshape(B * H * nb, bs, D).float()
        return lambda bucket, a, b, out: torch.index_select(src, 0, flat_rows[bucket][a:b], out=out)
    blocks = x.view(B, H, nb, bs, D)
    where = []
    for rows in flat_rows:
        bh = rows // nb
        where.append((bh // H, bh % H, rows % nb))
    return lambda bucket, a, b, out: torch.ops.aten.index.Tensor_out(
        blocks, [t[a:b] for t in where[bucket]], out=out)


def _forward(q, k, v, plan, block_size, key_padding_mask, keep_probs):
    """Output (B, H, N, D) and, for the backward, the schedule and the fp32 (G*R, bs, D) queries, keys, values
    and P per bucket.

    Padded slots and padded keys get the score -inf, so their probability is exactly 0; a row whose keys are
    all masked (by the key padding mask) gets P = 0. Without keep_probs (no gradient wanted) P is not kept:
    every piece reuses one score buffer.
    """
    B, H, N, D = q.shape
    bs, R = block_size, plan.heads * plan.nb
    G = B * H // plan.heads  # batch of the flattened (G*R, bs, D) block views
    scale = 1.0 / math.sqrt(D)
    qf, kf, vf = (x.reshape(G * R, bs, D).float() for x in (q, k, v))
    sched = plan.schedule(G, bs, D, q.device)
    biases, dead = sched.bias, [None] * len(sched.buckets)  # (G*r, 1, c, 1) for padded slots, or None
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(B, plan.nb, bs)
        biases, dead = zip(*(_padding_bias(kpm, b, G) for b in sched.buckets), strict=True)
    out = torch.empty_like(qf)  # (G*R, bs, D)
    probs = []
    if keep_probs:  # one buffer for every bucket's P, saved for the backward
        p_buf, offset = qf.new_empty(sched.active_blocks * G * bs * bs), 0
        for b in sched.buckets:
            n, L = G * b.num_rows, b.count * bs
            probs.append(p_buf[offset:offset + n * bs * L].view(n, bs, L))
            offset += n * bs * L

    def part(g0, g1, max_blocks):
        if plan.has_empty_rows:
            out.view(G, -1)[g0:g1].zero_()
        piece_blocks = sched.piece_blocks(g0, g1, max_blocks)
        rows_buf, keys_buf = (RUNTIME.workspace(x, piece_blocks * bs * D, qf) for x in ("rows", "keys"))
        s_buf = None if keep_probs else RUNTIME.workspace("s", piece_blocks * bs * bs, qf)
        for i, a, b in sched.pieces(g0, g1, max_blocks):
            c, (iq, ik), bias = sched.buckets[i].count, sched.flat[i], biases[i]
            n, L = b - a, c * bs  # n query blocks, each seeing L keys
            iq, ik = iq[a:b], ik[a * c:b * c]
            qb = torch.index_select(qf, 0, iq, out=rows_buf[:n * bs * D].view(n, bs, D))
            kg = _gather(kf, ik, keys_buf, n, L)  # (n, L, D)
            s = probs[i][a:b] if keep_probs else s_buf[:n * bs * L].view(n, bs, L)
            torch.baddbmm(s, qb, kg.transpose(1, 2), beta=0.0, alpha=scale, out=s)  # scores, (n, bs, L)
            if bias is not None:  # -inf at padded slots and padded keys
                s.view(n, bs, c, bs).add_(bias[a:b])
            p = softmax_(s)  # P in s
            if dead[i] is not None:  # rows whose allowed keys are all padding: NaN -> 0
                p.masked_fill_(dead[i][a:b], 0.0)
            vg = _gather(vf, ik, keys_buf, n, L)  # the keys are no longer needed, nor the queries below
            out.index_copy_(0, iq, torch.bmm(p, vg, out=rows_buf[:n * bs * D].view(n, bs, D)))

    RUNTIME.run(part, G, q.device, ("forward", G, sched.active_blocks, bs, D, key_padding_mask is not None))
    return out.view(B, H, N, D).to(q.dtype), (sched, qf, kf, vf, probs)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, block_size, key_padding_mask):
        out, (sched, qf, kf, vf, probs) = _forward(q, k, v, plan, block_size, key_padding_mask, keep_probs=True)
        ctx.save_for_backward(qf, kf, vf, *probs)
        ctx.plan, ctx.sched = plan, sched
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        """The masked slots have P = 0, so dS = P * (dP - rowsum(dP * P)) is 0 there: they add exact zeros to
        dK and dV and nothing to dQ."""
        qf, kf, vf, *probs = ctx.saved_tensors
        plan, sched = ctx.plan, ctx.sched
        B, H, N, D = dout.shape
        bs = N // plan.nb
        G = B * H // plan.heads
        scale = 1.0 / math.sqrt(D)
        gather_dout = _block_gatherer(dout, plan.nb, bs, [iq for iq, _ in sched.flat])
        dq, dk, dv = torch.empty_like(kf), torch.empty_like(kf), torch.empty_like(vf)  # (G*R, bs, D) each

        def part(g0, g1, max_blocks):
            for grad in (dk, dv) + ((dq,) if plan.has_empty_rows else ()):
                grad.view(G, -1)[g0:g1].zero_()  # this range of g owns these rows
            piece_blocks = sched.piece_blocks(g0, g1, max_blocks)
            # three buffers of blocks and one of scores, each reused once its contents are consumed
            rows_buf, keys_buf, grad_buf = (
                RUNTIME.workspace(x, piece_blocks * bs * D, kf) for x in ("rows", "keys", "key_grads"))
            dp_buf = RUNTIME.workspace("s", piece_blocks * bs * bs, kf)
            for i, a, b in sched.pieces(g0, g1, max_blocks):
                c = sched.buckets[i].count
                n, L = b - a, c * bs  # n query blocks, each seeing L keys
                iq, ik = sched.flat[i][0][a:b], sched.flat[i][1][a * c:b * c]
                p = probs[i][a:b]  # (n, bs, L)
                dob = gather_dout(i, a, b, rows_buf[:n * bs * D].view(n, bs, D))
                dvg = torch.bmm(p.transpose(1, 2), dob, out=grad_buf[:n * L * D].view(n, L, D))
                dv.index_add_(0, ik, dvg.view(-1, bs, D))
                vg = _gather(vf, ik, keys_buf, n, L)
                dp = torch.bmm(dob, vg.transpose(1, 2), out=dp_buf[:n * bs * L].view(n, bs, L))
                ds = softmax_backward_(dp, p)
                kg = _gather(kf, ik, keys_buf, n, L)  # dO and V are consumed
                dqb = rows_buf[:n * bs * D].view(n, bs, D)
                dq.index_copy_(0, iq, torch.baddbmm(dqb, ds, kg, beta=0.0, alpha=scale, out=dqb))
                dkg = grad_buf[:n * L * D].view(n, L, D)
                qb = torch.index_select(qf, 0, iq, out=rows_buf[:n * bs * D].view(n, bs, D))
                torch.baddbmm(dkg, ds.transpose(1, 2), qb, beta=0.0, alpha=scale, out=dkg)
                dk.index_add_(0, ik, dkg.view(-1, bs, D))

        RUNTIME.run(part, G, dout.device, ("backward", G, sched.active_blocks, bs, D))
        return (dq.view(B, H, N, D).to(dout.dtype), dk.view(B, H, N, D).to(dout.dtype),
                dv.view(B, H, N, D).to(dout.dtype), None, None, None)


def torch_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over the active blocks only; fp32 accumulation, any device.

    q, k, v: (B, H, N, D); layout: bool (H or 1, N/bs, N/bs); key_padding_mask: (B, N), 1 keep / 0 pad.
    """
    plan = plan_for(layout, q.device)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _BlockSparseAttention.apply(q, k, v, plan, block_size, key_padding_mask)
    return _forward(q, k, v, plan, block_size, key_padding_mask, keep_probs=False)[0]
