"""Multi-head self-attention shared by every model: dense (with the monitor's statistics) or block-sparse.

Dense phase: unmonitored steps use scaled_dot_product_attention (no probabilities materialised). Monitored
steps compute the attention explicitly, softmax(q k^T / sqrt(d)) then v, so that the probabilities the
output is made of also give, at the cost of two reductions, the batch/head mean map for the monitor and the
block-pooled map for the pattern. (Recomputing them beside SDPA would cost an extra q k^T and softmax; on
CPU with attention dropout SDPA takes its math path anyway, so the explicit form is no slower there.)
Sparse phase: sat.kernels.block_sparse_attention over the frozen layout.
Attention dropout applies in the dense phase only (the block-sparse kernels have none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sat.kernels import block_sparse_attention
from sat.sparsity.pattern import block_pool, pattern_loss, topk_layout


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
            mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, N)
            dropout = self.attn_dropout if self.training else 0.0
            if collect:
                scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, N, N)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                probs = torch.softmax(scores.float(), dim=-1)  # before dropout: what the monitor reads
                out = F.dropout(probs, dropout, self.training).to(v.dtype) @ v  # (B, H, N, hd)
                self.stats = self._statistics(probs)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # (B, N, H*hd)
        return self.proj(out)

    def _statistics(self, probs: torch.Tensor) -> AttentionStats:
        """Mean probability map (no grad) and the pattern loss on the block-pooled probabilities (B, H, N, N)."""
        with torch.no_grad():
            probs = probs.detach()
            mean_map = probs.mean(dim=(0, 1))  # (N, N)
            pooled = block_pool(probs, self.block_size)  # (B, H, nb, nb)
            if self.pattern == "measured" and self.training:
                target = pooled.mean(dim=0)  # (H, nb, nb)
                target = target.mean(dim=0, keepdim=True) if self.pattern_mean.shape[0] == 1 else target
                self.pattern_count += 1
                self.pattern_mean += (target - self.pattern_mean) / self.pattern_count
        loss = pattern_loss(pooled, self.importance()) if self.pattern == "learned" else None
        return AttentionStats(mean_map=mean_map, pattern_loss=loss)
