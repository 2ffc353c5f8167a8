"""Reference block-sparse attention: dense math with the block and padding mask (docs/block-sparse.md).

Obviously right and O(N^2) in memory; every faster backend is tested against it.
"""

from __future__ import annotations

import math

import torch


def expand_layout(layout: torch.Tensor, block_size: int) -> torch.Tensor:
    """Boolean block layout (H or 1, nb, nb) -> token-level mask (H or 1, N, N)."""
    return layout.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with bias = -inf outside the layout and at padded keys.

    q, k, v: (B, H, N, D); layout: bool (H or 1, N/bs, N/bs); key_padding_mask: (B, N), 1 keep / 0 pad.
    A query row with no allowed key returns zeros.
    """
    B, H, N, D = q.shape
    allowed = expand_layout(layout.bool(), block_size).unsqueeze(0)  # (1, H|1, N, N)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]  # (B, H|1, N, N)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least; float64 inputs stay float64 (tests)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) / math.sqrt(D)  # (B, H, N, N)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)  # exp(-inf) = 0 at disallowed keys
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))  # empty rows stay all-zero
    return torch.matmul(p, v.to(acc)).to(q.dtype)
