"""Multi-head self-attention shared by every model: dense (with the monitor's statistics) or block-sparse.

Dense phase: monitored steps run `dense_attention`, one fused autograd function that computes
softmax(q k^T / sqrt(d)) once per batch chunk and takes from the same probabilities the output, the
batch-summed map for the monitor and the block-pooled map for the pattern; it keeps the probabilities (fp32)
and a one-byte dropout mask for the backward (with mixed-precision inputs, on CUDA, monitored steps keep the
unfused explicit form, whose matmuls run in the low precision). Unmonitored steps use
scaled_dot_product_attention, which materialises no probabilities, except when training on a CPU with
attention dropout: there SDPA falls back to its math path (probabilities, a float dropout mask and the dropped
probabilities, all stored) and the fused function without statistics is faster and leaner
(bench/train_step.py measures both).
Sparse phase: sat.kernels.block_sparse_attention over the frozen layout.
Attention dropout applies in the dense phase only (the block-sparse kernels have none).

Dropout on a CPU (attention and model dropout alike) draws its keep mask 16 bits per element, one 64-bit word
of the global generator per four elements, and stores it in one byte per element (bernoulli_ takes a draw
per element and F.dropout stores a float mask): the drop probability is p rounded to a multiple of 2^-16
(0.1 -> 0.100006), and kept values are scaled by the exact 1 / (1 - p_rounded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sat.kernels import block_sparse_attention
from sat.kernels.blocksparse_torch import softmax_, softmax_backward_
from sat.sparsity.pattern import block_pool, pattern_loss, topk_layout

# --- dropout with one-byte masks ------------------------------------------------------------------------------

_RANDOM_BITS = 16  # per element: p is rounded to a multiple of 2^-16


_LEVELS = 1 << _RANDOM_BITS


def _dropped_levels(p: float) -> int:
    """How many of the 2^16 equally likely 16-bit values drop an element: p rounded to a multiple of 2^-16."""
    return min(_LEVELS, max(0, round(p * _LEVELS)))


def keep_mask_scale(p: float) -> float:
    """1 / P(keep) for keep_mask's masks: the exact inverse of the kept fraction after rounding p."""
    drop = _dropped_levels(p)
    return _LEVELS / (_LEVELS - drop) if drop < _LEVELS else 0.0


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """A Bernoulli keep mask (bool, P(keep) = 1 - p rounded to a multiple of 2^-16) from the global generator,
    written into `out` if given. Draws one 64-bit word per four elements."""
    drop = _dropped_levels(p)
    numel = math.prod(shape)
    if drop == _LEVELS:  # p = 1: the threshold 2^15 is out of int16's range
        return torch.zeros(shape, dtype=torch.bool, device=device) if out is None else out.fill_(False)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((numel + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:numel].view(shape)  # uniform on [-2^15, 2^15)
    return torch.ge(lanes, drop - _LEVELS // 2, out=out)


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving only the one-byte mask."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout's function; on a CPU with the cheaper mask above (CUDA's fused kernel keeps a byte mask already)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep = keep_mask(tuple(x.shape), p, x.device).view(torch.uint8)  # uint8 products vectorise, bool ones not
    return _MaskedScale.apply(x, keep, keep_mask_scale(p))


class Dropout(nn.Module):
    """nn.Dropout with `dropout` above: the same state dict (none) and semantics, a quarter of the memory."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --- fused dense attention ------------------------------------------------------------------------------------

# Unmonitored CPU training steps with attention dropout: "fused" (dense_attention without statistics) or "sdpa"
# (scaled_dot_product_attention's math path); bench/train_step.py times both.
CPU_DROPOUT_PATH = "fused"
_CHUNK_ELEMENTS = 1 << 21  # score entries per batch chunk (8 MiB fp32): the temporaries stay cache-sized


class _DenseAttention(torch.autograd.Function):
    """out = dropout(softmax(q k^T / sqrt(d) + padding bias)) v over batch chunks (SPEC.md section 4, dense).

    Saves the fp32 probabilities P and the one-byte dropout mask M; the backward rebuilds P * M in a chunk buffer.
    The dropout scale c is folded into v: (P * M * c) v = (P * M)(c v), so no N x N pass applies it.
    With `collect` it also returns, without gradient, the batch sum of the probabilities (H, N, N) and their
    block means (B, H, N/bs, N/bs); otherwise those two are empty.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, p, block_size, collect):
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
        chunk = max(1, _CHUNK_ELEMENTS // (H * N * N))  # batch elements per chunk
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
        return dq.view(shape).to(dtype), dk.view(shape).to(dtype), dv.view(shape).to(dtype), None, None, None, None


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                    dropout_p: float, block_size: int, collect: bool):
    """(out (B, H, N, D), batch-summed probabilities (H, N, N) or empty, block means (B, H, nb, nb) or empty).

    The probabilities are those before dropout. key_padding_mask: (B, N) bool, True = keep.
    """
    kpm = None if key_padding_mask is None else key_padding_mask.to(device=q.device, dtype=torch.bool)
    return _DenseAttention.apply(q, k, v, kpm, dropout_p, block_size, collect)


@dataclass
class AttentionStats:
    """What one monitored forward pass leaves behind for the scheduler."""

    mean_map: torch.Tensor            # (N, N) probabilities averaged over batch and heads, no grad
    pattern_loss: torch.Tensor | None  # SAT's MSE(avgpool(probs), G), differentiable in P; None if not learned


class Attention(nn.Module):
    """Self-attention over a padded length `seq_len` with a block-sparse mode of block `block_size`."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, seq_len: int, block_size: int,
                 attn_dropout: float = 0.0, pattern: str = "learned", per_head: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        if seq_len % block_size:
            raise ValueError(f"seq_len {seq_len} must be a multiple of block_size {block_size}")
        self.num_heads, self.head_dim, self.block_size = num_heads, head_dim, block_size
        self.attn_dropout, self.pattern, self.backend = attn_dropout, pattern, backend
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        nb = seq_len // block_size
        hp = num_heads if per_head else 1
        # SAT's learned pattern P (nb, head_dim) per layer (per head with per_head): G = P P^T.
        self.pattern_weight = nn.Parameter(torch.rand(hp, nb, head_dim))
        self.register_buffer("pattern_mean", torch.zeros(hp, nb, nb))   # the "measured" pattern
        self.register_buffer("pattern_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("layout", torch.ones(hp, nb, nb, dtype=torch.bool))
        self.register_buffer("sparse", torch.zeros((), dtype=torch.bool))
        self.stats: AttentionStats | None = None
        self._is_sparse = False  # host copy of `sparse`, so the hot path never reads a device flag

    def importance(self) -> torch.Tensor:
        """Block-importance map G, (1 or H, nb, nb)."""
        if self.pattern == "learned":
            p = self.pattern_weight
            return p @ p.transpose(-2, -1)
        return self.pattern_mean

    def sparsify(self, density: float) -> int:
        """Freeze the pattern and switch to the top-k layout; returns how many diagonal blocks were added."""
        layout, added = topk_layout(self.importance(), density)
        self.layout.copy_(layout.expand_as(self.layout))
        self.sparse.fill_(True)
        self._is_sparse = True
        self.pattern_weight.requires_grad_(False)
        return added

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_sparse = bool(self.sparse)
        self.pattern_weight.requires_grad_(not self._is_sparse)

    @property
    def is_sparse(self) -> bool:
        return self._is_sparse

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                collect: bool = False) -> torch.Tensor:
        """x: (B, N, C); key_padding_mask: (B, N) bool, True = keep (None = no padding)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        self.stats = None
        if self._is_sparse:
            out = block_sparse_attention(q, k, v, self.layout, self.block_size, key_padding_mask, self.backend)
        else:
            dropout_p = self.attn_dropout if self.training else 0.0
            fused = q.dtype == torch.float32  # the fused function computes in fp32
            if collect and not fused:  # mixed precision (CUDA): low-precision matmuls, fp32 softmax; or float64
                out, head_sum, pooled = self._explicit(q, k, v, key_padding_mask, dropout_p)
            elif fused and (collect or (dropout_p > 0 and x.device.type == "cpu" and CPU_DROPOUT_PATH == "fused")):
                out, head_sum, pooled = dense_attention(q, k, v, key_padding_mask, dropout_p, self.block_size,
                                                        collect)
            else:
                mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, N)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            if collect:
                self.stats = self._statistics(head_sum / B, pooled)
        out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # (B, N, H*hd)
        return self.proj(out)

    def _explicit(self, q, k, v, key_padding_mask, dropout_p):
        """The unfused monitored form for low-precision inputs: (out, batch-summed probabilities, block means)."""
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, N, N)
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)  # before dropout
        if key_padding_mask is not None:
            probs = probs.nan_to_num(0.0)  # rows with no unmasked key
        out = F.dropout(probs, dropout_p, self.training).to(v.dtype) @ v
        with torch.no_grad():
            return out, probs.sum(dim=0), block_pool(probs, self.block_size)

    def _statistics(self, head_mean: torch.Tensor, pooled: torch.Tensor) -> AttentionStats:
        """From the batch-mean probabilities (H, N, N) and the block means (B, H, nb, nb): the monitor's map
        and SAT's pattern loss (or the measured pattern's update)."""
        with torch.no_grad():
            mean_map = head_mean.mean(dim=0)  # (N, N), the mean over batch and heads
            if self.pattern == "measured" and self.training:
                target = pooled.mean(dim=0)  # (H, nb, nb)
                target = target.mean(dim=0, keepdim=True) if self.pattern_mean.shape[0] == 1 else target
                self.pattern_count += 1
                self.pattern_mean += (target - self.pattern_mean) / self.pattern_count
        loss = pattern_loss(pooled, self.importance()) if self.pattern == "learned" else None
        return AttentionStats(mean_map=mean_map, pattern_loss=loss)
