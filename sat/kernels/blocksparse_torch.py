"""Block-sparse attention in plain PyTorch: only the active blocks are computed (docs/block-sparse.md).

The query-block rows of the layout are grouped into buckets by their number `c` of active key blocks.
Within a bucket every row has exactly `c` active blocks, so one batched matrix product computes all of its
scores with no padding and no masking: gather the `c` key blocks of each row (a lookup table of block
indices), `S = Q K^T` is (rows, bs, c*bs), a fused softmax, `O = P V`. The backward reuses the saved
probabilities P (memory proportional to the active blocks, like everything else here), so it needs four
batched products per bucket: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K,
dK = dS^T Q, with dK and dV scattered back by index_add. The bucket plan depends only on the layout, which
changes rarely, so it is cached (sat/kernels/runtime.py holds the cache, the threads and the workspaces).

On a CPU the work is a few hundred small operations, and there are two ways to use the threads (see
sat.kernels.runtime.ThreadChoice): each operation on PyTorch's intra-op thread team, or the batch split over
single-threaded workers, each running every bucket for its own range of (batch, head) pairs. The faster way is
measured at run time; the results are identical. Workers take the buckets in pieces small enough to stay in
cache; temporaries live in per-thread buffers kept between calls, and the softmax and its backward run in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from sat.kernels.dense import softmax_, softmax_backward_
from sat.kernels.runtime import RUNTIME


@dataclass
class _Bucket:
    """The `rows` query-block rows that have exactly `count` active key blocks."""

    count: int
    rows: torch.Tensor  # (r,) row ids h * nb + i in [0, Hl*nb)
    keys: torch.Tensor  # (r, count) key-block row ids h * nb + j, ascending j per row
    key_blocks: torch.Tensor  # (r, count) key-block index j in [0, nb), for the padding mask

    @property
    def num_rows(self) -> int:
        return self.rows.numel()


@dataclass
class _Plan:
    """Everything derived from one layout: its buckets and whether some row has no active block.

    Tensors are viewed as (G*Hl*nb, bs, D) blocks, G = B*H/Hl the batch of (batch, head) pairs sharing a
    layout; each piece of a bucket gathers its query blocks and their key and value blocks by flat index.
    """

    heads: int  # Hl: 1 (shared by heads) or H
    nb: int
    buckets: list[_Bucket]
    has_empty_rows: bool
    _flat: dict = field(default_factory=dict)

    @property
    def active_blocks(self) -> int:
        return sum(b.num_rows * b.count for b in self.buckets)

    def pieces(self, g0: int, g1: int, max_blocks: int | None):
        """(bucket number, a, b): query blocks [a, b) of a bucket's (g, row) order, covering g in [g0, g1),
        at most max_blocks active blocks at a time (or one query block) so that a piece can stay in cache;
        whole buckets for None."""
        for i, bucket in enumerate(self.buckets):
            r = bucket.num_rows
            step = (g1 - g0) * r if max_blocks is None else max(1, max_blocks // bucket.count)
            for a in range(g0 * r, g1 * r, step):
                yield i, a, min(a + step, g1 * r)

    def piece_blocks(self, g0: int, g1: int, max_blocks: int | None) -> int:
        """The most active blocks in one of the pieces: the size of the buffers."""
        return max(((b - a) * self.buckets[i].count for i, a, b in self.pieces(g0, g1, max_blocks)), default=0)

    def flat_index(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per bucket, flat block indices for G = batch: its query blocks (G*r,) in (g, row) order and their
        key blocks (G*r*c,) in (g, row, slot) order."""
        if batch not in self._flat:
            self._flat[batch] = []
            for b in self.buckets:
                offsets = torch.arange(batch, device=b.rows.device) * (self.heads * self.nb)  # (G,)
                self._flat[batch].append(((offsets[:, None] + b.rows).reshape(-1),
                                          (offsets[:, None, None] + b.keys).reshape(-1)))
        return self._flat[batch]


def _make_plan(layout: torch.Tensor, device: torch.device) -> _Plan:
    heads, nb, _ = layout.shape
    rows_layout = layout.reshape(heads * nb, nb)  # (Hl*nb, nb): one row per (head, query block)
    counts = rows_layout.sum(-1)  # (Hl*nb,)
    head_offset = torch.arange(heads).repeat_interleave(nb) * nb  # (Hl*nb,): h * nb
    buckets = []
    for c in sorted(set(counts.tolist()) - {0}):
        rows = (counts == c).nonzero()[:, 0]  # (r,)
        key_blocks = rows_layout[rows].nonzero()[:, 1].reshape(len(rows), c)  # (r, c)
        keys = key_blocks + head_offset[rows, None]
        buckets.append(_Bucket(c, rows.to(device), keys.to(device), key_blocks.to(device)))
    return _Plan(heads, nb, buckets, bool((counts == 0).any()))


def _plan_for(layout: torch.Tensor, device: torch.device) -> _Plan:
    """Cached bucket plan of a boolean layout (the cache key is the layout's content)."""
    cpu_layout = layout.detach().to("cpu", torch.bool).contiguous()
    key = (tuple(cpu_layout.shape), cpu_layout.numpy().tobytes(), str(device))
    return RUNTIME.plan(key, lambda: _make_plan(cpu_layout, device))


def _padding_keep(key_padding_mask, bucket, heads_per_layout):
    """Unpadded keys of a bucket's gathered blocks, per query block in (g, row) order: (G*r, 1, c*bs) bool."""
    B, nb, bs = key_padding_mask.shape
    r, c = bucket.key_blocks.shape
    keep = key_padding_mask[:, bucket.key_blocks]  # (B, r, c, bs)
    return keep[:, None].expand(B, heads_per_layout, r, c, bs).reshape(B * heads_per_layout * r, 1, c * bs)


def _gather(src, index, buffer, rows, width):
    """src[index] written into buffer, viewed as (rows, width, D): the key blocks of each query block."""
    n, bs, D = index.numel(), src.shape[1], src.shape[2]
    out = buffer[:n * bs * D].view(n, bs, D)
    torch.index_select(src, 0, index, out=out)
    return out.view(rows, width, D)


def _forward(q, k, v, plan, block_size, key_padding_mask, keep_probs):
    """Output (B, H, N, D) and, for the backward, the fp32 (G*R, bs, D) queries, keys, values and P per bucket.

    Without keep_probs (no gradient wanted) P is not kept: every piece reuses one score buffer.
    """
    B, H, N, D = q.shape
    bs, R = block_size, plan.heads * plan.nb
    G = B * H // plan.heads  # batch of the flattened (G*R, bs, D) block views
    scale = 1.0 / math.sqrt(D)
    qf, kf, vf = (x.reshape(G * R, bs, D).float() for x in (q, k, v))
    index = plan.flat_index(G)
    keeps = [None] * len(plan.buckets)
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(B, plan.nb, bs)
        keeps = [_padding_keep(kpm, b, H // plan.heads) for b in plan.buckets]  # (G*r, 1, c*bs) each
    out = torch.empty_like(qf)  # (G*R, bs, D)
    probs = []
    if keep_probs:  # one buffer for every bucket's P, saved for the backward
        p_buf, offset = qf.new_empty(plan.active_blocks * G * bs * bs), 0
        for b in plan.buckets:
            n, L = G * b.num_rows, b.count * bs
            probs.append(p_buf[offset:offset + n * bs * L].view(n, bs, L))
            offset += n * bs * L

    def part(g0, g1, max_blocks):
        if plan.has_empty_rows:
            out.view(G, -1)[g0:g1].zero_()
        piece_blocks = plan.piece_blocks(g0, g1, max_blocks)
        qb_buf, ob_buf, kg_buf, vg_buf = (RUNTIME.workspace(x, piece_blocks * bs * D, qf)
                                          for x in ("q", "o", "k", "v"))
        s_buf = None if keep_probs else RUNTIME.workspace("s", piece_blocks * bs * bs, qf)
        for i, a, b in plan.pieces(g0, g1, max_blocks):
            bucket, (iq, ik), keep = plan.buckets[i], index[i], keeps[i]
            n, L = b - a, bucket.count * bs  # n query blocks, each seeing L keys
            iq, ik = iq[a:b], ik[a * bucket.count:b * bucket.count]
            qb = torch.index_select(qf, 0, iq, out=qb_buf[:n * bs * D].view(n, bs, D))
            kg = _gather(kf, ik, kg_buf, n, L)  # (n, L, D)
            s = probs[i][a:b] if keep_probs else s_buf[:n * bs * L].view(n, bs, L)
            torch.baddbmm(s, qb, kg.transpose(1, 2), beta=0.0, alpha=scale, out=s)  # scores, (n, bs, L)
            if keep is not None:
                keep = keep[a:b]  # (n, 1, L)
                s.masked_fill_(~keep, float("-inf"))
            p = softmax_(s)  # P in s
            if keep is not None:  # rows whose allowed keys are all padding: NaN -> 0
                p.masked_fill_(~keep.any(-1, keepdim=True), 0.0)
            vg = _gather(vf, ik, vg_buf, n, L)
            out.index_copy_(0, iq, torch.bmm(p, vg, out=ob_buf[:n * bs * D].view(n, bs, D)))

    RUNTIME.run(part, G, q.device, ("forward", G, plan.active_blocks, bs, D, key_padding_mask is not None))
    return out.view(B, H, N, D).to(q.dtype), (qf, kf, vf, probs)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, block_size, key_padding_mask):
        out, (qf, kf, vf, probs) = _forward(q, k, v, plan, block_size, key_padding_mask, keep_probs=True)
        ctx.save_for_backward(qf, kf, vf, *probs)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        qf, kf, vf, *probs = ctx.saved_tensors
        plan = ctx.plan
        B, H, N, D = dout.shape
        bs = N // plan.nb
        G = B * H // plan.heads
        scale = 1.0 / math.sqrt(D)
        dof = dout.reshape(kf.shape).float()  # (G*R, bs, D)
        index = plan.flat_index(G)
        dq, dk, dv = torch.empty_like(kf), torch.empty_like(kf), torch.empty_like(vf)  # (G*R, bs, D) each

        def part(g0, g1, max_blocks):
            for grad in (dk, dv) + ((dq,) if plan.has_empty_rows else ()):
                grad.view(G, -1)[g0:g1].zero_()  # this range of g owns these rows
            piece_blocks = plan.piece_blocks(g0, g1, max_blocks)
            qb_buf, dob_buf, dqb_buf, kg_buf, vg_buf, dkv_buf = (
                RUNTIME.workspace(x, piece_blocks * bs * D, dof) for x in ("q", "o", "dq", "k", "v", "dkv"))
            dp_buf = RUNTIME.workspace("s", piece_blocks * bs * bs, dof)
            for i, a, b in plan.pieces(g0, g1, max_blocks):
                n, L = b - a, plan.buckets[i].count * bs  # n query blocks, each seeing L keys
                iq, ik = index[i][0][a:b], index[i][1][a * plan.buckets[i].count:b * plan.buckets[i].count]
                p = probs[i][a:b]  # (n, bs, L)
                dob = torch.index_select(dof, 0, iq, out=dob_buf[:n * bs * D].view(n, bs, D))
                dvg = torch.bmm(p.transpose(1, 2), dob, out=dkv_buf[:n * L * D].view(n, L, D))
                dv.index_add_(0, ik, dvg.view(-1, bs, D))
                vg = _gather(vf, ik, vg_buf, n, L)
                dp = torch.bmm(dob, vg.transpose(1, 2), out=dp_buf[:n * bs * L].view(n, bs, L))
                ds = softmax_backward_(dp, p)
                kg = _gather(kf, ik, kg_buf, n, L)
                dqb = dqb_buf[:n * bs * D].view(n, bs, D)
                dq.index_copy_(0, iq, torch.baddbmm(dqb, ds, kg, beta=0.0, alpha=scale, out=dqb))
                dkg = dkv_buf[:n * L * D].view(n, L, D)
                qb = torch.index_select(qf, 0, iq, out=qb_buf[:n * bs * D].view(n, bs, D))
                torch.baddbmm(dkg, ds.transpose(1, 2), qb, beta=0.0, alpha=scale, out=dkg)
                dk.index_add_(0, ik, dkg.view(-1, bs, D))

        RUNTIME.run(part, G, dout.device, ("backward", G, plan.active_blocks, bs, D))
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
    plan = _plan_for(layout, q.device)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _BlockSparseAttention.apply(q, k, v, plan, block_size, key_padding_mask)
    return _forward(q, k, v, plan, block_size, key_padding_mask, keep_probs=False)[0]
