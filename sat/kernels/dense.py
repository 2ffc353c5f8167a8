"""Dense attention for the dense phase (docs/block-sparse.md without a layout), fused with the statistics the
monitor and the pattern need (docs/switch.md, docs/layouts.md).

`dense_attention` computes softmax(q k^T / sqrt(d)) once per batch chunk and takes from the same
probabilities the output, the batch-summed map for the monitor and the block-pooled map for the pattern; it
keeps the probabilities (fp32) and a one-byte dropout mask for the backward. sat/models/attention.py decides
when it runs instead of scaled_dot_product_attention.

Its dropout masks are sat/kernels/dropout_mask.py's one-byte masks.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from sat.kernels.dropout_mask import keep_mask, keep_mask_scale

# --- softmax in place, shared with the block-sparse torch backend --------------------------------------------

def softmax_(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension written into s (in place on CPU, through a temporary elsewhere)."""
    return torch.softmax(s, dim=-1, out=s) if s.is_cpu else s.copy_(torch.softmax(s, dim=-1))


def softmax_backward_(dp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """dS = P * (dP - rowsum(dP * P)) for fp32 probabilities P, written into dp on CPU."""
    if dp.is_cpu:
        return torch.ops.aten._softmax_backward_data.out(dp, p, -1, torch.float32, grad_input=dp)
    return torch._softmax_backward_data(dp, p, -1, torch.float32)


# --- fused dense attention ------------------------------------------------------------------------------------

CHUNK_ELEMENTS = 1 << 21  # default score entries per batch chunk (8 MiB fp32): the temporaries stay cache-sized


class _DenseAttention(torch.autograd.Function):
    """out = dropout(softmax(q k^T / sqrt(d) + padding bias)) v over batch chunks (dense).

    Saves the fp32 probabilities P and the one-byte dropout mask M; the backward rebuilds P * M in a chunk buffer.
    The dropout scale c is folded into v: (P * M * c) v = (P * M)(c v), so no N x N pass applies it.
    With `collect` it also returns, without gradient, the batch sum of the probabilities (H, N, N) and their
    block means (B, H, N/bs, N/bs); otherwise those two are empty.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, p, block_size, collect, chunk_elements):
        B, H, N, D = q.shape
        nb = N // block_size
        qs = (q.float() * (1.0 / math.sqrt(D))).reshape(B * H, N, D)  # (B*H, N, D) contiguous
        kf = k.float().reshape(B * H, N, D).contiguous()
        probs = qs.new_empty(B * H, N, N)
        # The mask as uint8: products with a uint8 tensor are vectorised on CPU, with a bool one they are not.
        keep = torch.empty(B * H, N, N, dtype=torch.uint8, device=q.device) if p > 0 else None
        vs = v.float().reshape(B * H, N, D).contiguous()
        keep_scale = 1.0
        if keep is not None:
            keep_scale = keep_mask_scale(p)
            vs = vs * keep_scale
        out = qs.new_empty(B * H, N, D)
        head_sum = qs.new_zeros(H, N, N) if collect else qs.new_empty(0)
        pooled = qs.new_empty(B, H, nb, nb) if collect else qs.new_empty(0)
        # (B,) on the host, one device sync for the whole call: batch elements whose every key is padded
        dead = None if key_padding_mask is None else (~key_padding_mask.any(-1)).cpu()
        chunk = max(1, chunk_elements // (H * N * N))  # batch elements per chunk
        buf = qs.new_empty(min(chunk, B) * H, N, N) if keep is not None else None
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            r0, r1, n = b0 * H, b1 * H, b1 - b0
            s = torch.bmm(qs[r0:r1], kf[r0:r1].transpose(1, 2), out=probs[r0:r1])
            if key_padding_mask is not None:
                s.view(n, H, N, N).masked_fill_(~key_padding_mask[b0:b1, None, None, :], float("-inf"))
            softmax_(s)
            if dead is not None and bool(dead[b0:b1].any()):
                s.view(n, H, N, N)[dead[b0:b1].to(s.device)] = 0.0  # rows with no unmasked key: zeros, not NaN
            if collect:
                s4 = s.view(n, H, N, N)
                for i in range(n):
                    head_sum.add_(s4[i])
                pooled[b0:b1] = s4.view(n, H, nb, block_size, nb, block_size).mean(dim=(3, 5))
            pd = s
            if keep is not None:
                keep_mask((r1 - r0, N, N), p, q.device, out=keep[r0:r1].view(torch.bool))
                pd = torch.mul(s, keep[r0:r1], out=buf[: r1 - r0])
            torch.bmm(pd, vs[r0:r1], out=out[r0:r1])
        ctx.save_for_backward(qs, kf, vs, probs, keep)
        ctx.chunk, ctx.heads, ctx.scale, ctx.keep_scale = chunk * H, H, 1.0 / math.sqrt(D), keep_scale
        ctx.mark_non_differentiable(head_sum, pooled)
        return out.view(B, H, N, D).to(q.dtype), head_sum, pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _head_sum, _pooled):
        qs, kf, vs, probs, keep = ctx.saved_tensors
        R, N, D = qs.shape
        chunk = ctx.chunk  # rows (batch x head) per chunk
        do = dout.float().reshape(R, N, D)
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(qs), torch.empty_like(qs)
        buf = qs.new_empty(min(chunk, R), N, N)
        for r0 in range(0, R, chunk):
            r1 = min(R, r0 + chunk)
            s = probs[r0:r1]
            pd = s if keep is None else torch.mul(s, keep[r0:r1], out=buf[: r1 - r0])  # P * M
            torch.bmm(pd.transpose(1, 2), do[r0:r1], out=dv[r0:r1])  # dV = (P * M * c)^T dO, c applied below
            dp = torch.bmm(do[r0:r1], vs[r0:r1].transpose(1, 2), out=buf[: r1 - r0])  # dL/dP = (dO (c v)^T) * M
            if keep is not None:
                dp.mul_(keep[r0:r1])
            ds = softmax_backward_(dp, s)
            torch.bmm(ds, kf[r0:r1], out=dq[r0:r1]).mul_(ctx.scale)  # S = (q / sqrt(d)) k^T
            torch.bmm(ds.transpose(1, 2), qs[r0:r1], out=dk[r0:r1])
        if keep is not None:
            dv.mul_(ctx.keep_scale)
        B, H = R // ctx.heads, ctx.heads
        shape, dtype = (B, H, N, D), dout.dtype
        return (dq.view(shape).to(dtype), dk.view(shape).to(dtype), dv.view(shape).to(dtype),
                None, None, None, None, None)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                    dropout_p: float, block_size: int, collect: bool, chunk_elements: int = CHUNK_ELEMENTS):
    """(out (B, H, N, D), batch-summed probabilities (H, N, N) or empty, block means (B, H, nb, nb) or empty).

    The probabilities are those before dropout. key_padding_mask: (B, N) bool, True = keep. The batch is
    computed in chunks of about `chunk_elements` score entries (at least one batch element).
    """
    kpm = None if key_padding_mask is None else key_padding_mask.to(device=q.device, dtype=torch.bool)
    return _DenseAttention.apply(q, k, v, kpm, dropout_p, block_size, collect, chunk_elements)
