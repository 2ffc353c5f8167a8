"""Block-sparse attention in plain PyTorch: only the active blocks are computed (SPEC.md section 4).

The query-block rows of the layout are grouped into buckets by their number of active key blocks `c`.
Within a bucket every row has exactly `c` active blocks, so one batched matrix product computes all of its
scores with no padding and no masking: gather the `c` key blocks of each row (a lookup table of block
indices), `S = Q K^T` is (rows, bs, c*bs), a fused softmax, `O = P V`. The backward reuses the saved
probabilities P (memory proportional to the active blocks, like everything else here), so it needs four
batched products per bucket; dK/dV are scattered back with index_add. The bucket plan is computed once per
layout and cached, since the layout changes rarely.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class _Bucket:
    """Query-block rows that all have `count` active key blocks: positions [start, end) of the plan order."""

    count: int
    start: int
    end: int
    keys: torch.Tensor  # (r, count) key-block row ids in [0, Hl*nb): h * nb + j, ascending j per row
    key_blocks: torch.Tensor  # (r, count) key-block index j in [0, nb), for the padding mask


@dataclass
class _Plan:
    """Everything derived from one layout: rows ordered by bucket, the buckets, and the empty rows.

    Rows are ids h * nb + i in [0, Hl*nb). Tensors are viewed as (G*Hl*nb, bs, D) blocks with the batch
    G = B*H/Hl leading; queries are permuted once to (rows in plan order, G) so that each bucket is one
    contiguous slice, while keys and values stay in place and are gathered per bucket.
    """

    heads: int  # Hl: 1 (shared by heads) or H
    nb: int
    order: torch.Tensor  # (R',) row ids with at least one active block, grouped by bucket
    buckets: list[_Bucket]
    has_empty_rows: bool
    _flat: dict = field(default_factory=dict)

    def flat_index(self, batch: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Flat block indices for batch G: queries (R'*G,) in (row, g) order; keys per bucket (r*G*c,)."""
        if batch not in self._flat:
            offsets = torch.arange(batch, device=self.order.device) * (self.heads * self.nb)  # (G,)
            query = (self.order[:, None] + offsets).reshape(-1)
            keys = [(b.keys[:, None, :] + offsets[:, None]).reshape(-1) for b in self.buckets]
            self._flat[batch] = (query, keys)
        return self._flat[batch]


_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
_MAX_PLANS = 16


def _make_plan(layout: torch.Tensor, device: torch.device) -> _Plan:
    heads, nb, _ = layout.shape
    rows_layout = layout.reshape(heads * nb, nb)  # (Hl*nb, nb): one row per (head, query block)
    counts = rows_layout.sum(-1)  # (Hl*nb,)
    head_offset = torch.arange(heads).repeat_interleave(nb) * nb  # (Hl*nb,): h * nb
    order, buckets, start = [], [], 0
    for c in sorted(set(counts.tolist()) - {0}):
        rows = (counts == c).nonzero()[:, 0]  # (r,)
        key_blocks = rows_layout[rows].nonzero()[:, 1].reshape(len(rows), c)  # (r, c)
        keys = key_blocks + head_offset[rows, None]
        buckets.append(_Bucket(c, start, start + len(rows), keys.to(device), key_blocks.to(device)))
        order.append(rows)
        start += len(rows)
    order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    return _Plan(heads, nb, order.to(device), buckets, bool((counts == 0).any()))


def _plan_for(layout: torch.Tensor, device: torch.device) -> _Plan:
    """Cached bucket plan of a boolean layout (the cache key is the layout's content)."""
    cpu_layout = layout.detach().to("cpu", torch.bool).contiguous()
    key = (tuple(cpu_layout.shape), cpu_layout.numpy().tobytes(), str(device))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_plan(cpu_layout, device)
        _PLANS[key] = plan
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def _padding_keep(key_padding_mask, bucket, heads_per_layout, batch):
    """Unpadded keys of a bucket's gathered blocks: (r, G, 1, c*bs) bool, in the bucket's (row, g) order."""
    B, nb, bs = key_padding_mask.shape
    r, c = bucket.key_blocks.shape
    keep = key_padding_mask[:, bucket.key_blocks]  # (B, r, c, bs)
    keep = keep[:, None].expand(B, heads_per_layout, r, c, bs).permute(2, 0, 1, 3, 4)  # (r, B, H/Hl, c, bs)
    return keep.reshape(r, batch, 1, c * bs)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, block_size, key_padding_mask):
        B, H, N, D = q.shape
        bs, R = block_size, plan.heads * plan.nb
        G = B * H // plan.heads  # batch of the flattened (G*R, bs, D) block views
        scale = 1.0 / math.sqrt(D)
        iq, iks = plan.flat_index(G)
        qp = q.reshape(G * R, bs, D).index_select(0, iq).float().mul_(scale)  # (R'*G, bs, D), scaled once
        kf = k.reshape(G * R, bs, D).float()
        vf = v.reshape(G * R, bs, D).float()
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(B, plan.nb, bs)
        out_p = torch.empty_like(qp)  # (R'*G, bs, D): output in plan order
        probs = []
        for bucket, ik in zip(plan.buckets, iks, strict=True):
            c, r = bucket.count, bucket.end - bucket.start
            qb = qp[bucket.start * G:bucket.end * G]  # (r*G, bs, D)
            kg = kf.index_select(0, ik).view(r * G, c * bs, D)
            s = torch.bmm(qb, kg.transpose(1, 2))  # (r*G, bs, c*bs)
            if key_padding_mask is not None:
                keep = _padding_keep(kpm, bucket, H // plan.heads, G)  # (r, G, 1, c*bs)
                s.view(r, G, bs, c * bs).masked_fill_(~keep, float("-inf"))
            p = torch.softmax(s, dim=-1)
            if key_padding_mask is not None:  # rows whose allowed keys are all padding: NaN -> 0
                p.view(r, G, bs, c * bs).masked_fill_(~keep.any(-1, keepdim=True), 0.0)
            vg = vf.index_select(0, ik).view(r * G, c * bs, D)
            torch.bmm(p, vg, out=out_p[bucket.start * G:bucket.end * G])
            probs.append(p)
        out = torch.zeros_like(kf) if plan.has_empty_rows else torch.empty_like(kf)  # (G*R, bs, D)
        out.index_copy_(0, iq, out_p)

        ctx.save_for_backward(qp, kf, vf)
        ctx.probs, ctx.plan, ctx.scale = probs, plan, scale
        return out.view(B, H, N, D).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        qp, kf, vf = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, H, N, D = dout.shape
        bs = N // plan.nb
        G = B * H // plan.heads
        iq, iks = plan.flat_index(G)
        dop = dout.reshape(kf.shape).index_select(0, iq).float()  # (R'*G, bs, D) in plan order
        dqp = torch.empty_like(dop)
        dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
        for bucket, ik, p in zip(plan.buckets, iks, ctx.probs, strict=True):
            c, r = bucket.count, bucket.end - bucket.start
            rows = slice(bucket.start * G, bucket.end * G)
            dob = dop[rows]  # (r*G, bs, D)
            dv.index_add_(0, ik, torch.bmm(p.transpose(1, 2), dob).view(-1, bs, D))
            vg = vf.index_select(0, ik).view(r * G, c * bs, D)
            dp = torch.bmm(dob, vg.transpose(1, 2))  # (r*G, bs, c*bs)
            ds = torch._softmax_backward_data(dp, p, -1, torch.float32)  # p * (dp - rowsum(dp * p))
            kg = kf.index_select(0, ik).view(r * G, c * bs, D)
            torch.bmm(ds, kg, out=dqp[rows])
            dk.index_add_(0, ik, torch.bmm(ds.transpose(1, 2), qp[rows]).view(-1, bs, D))  # qp is scaled
        ctx.probs = None
        dq = torch.zeros_like(kf) if plan.has_empty_rows else torch.empty_like(kf)
        dq.index_copy_(0, iq, dqp.mul_(scale))
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
    return _BlockSparseAttention.apply(q, k, v, plan, block_size, key_padding_mask)
