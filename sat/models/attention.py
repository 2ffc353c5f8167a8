"""Multi-head self-attention shared by every model: dense (with the monitor's statistics) or block-sparse.

Dense phase: monitored steps run sat.kernels.dense.dense_attention, which takes the output, the monitor's
batch-summed map and the pattern's block means from one computation of the probabilities (with
mixed-precision or float64 inputs, monitored steps keep the unfused explicit form below). Unmonitored steps
use scaled_dot_product_attention, which materialises no probabilities, except when training on a CPU with
attention dropout: there SDPA falls back to its math path (probabilities, a float dropout mask and the dropped
probabilities, all stored) and dense_attention without statistics is faster and leaner (bench/train_step.py
measures both; sat.kernels.runtime.RUNTIME.cpu_dropout_path chooses).
Sparse phase: sat.kernels.block_sparse_attention over the frozen layout.
Attention dropout applies in the dense phase only (the block-sparse kernels have none). Model dropout is
sat/models/dropout.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sat.kernels import block_sparse_attention
from sat.kernels.dense import dense_attention
from sat.kernels.runtime import RUNTIME
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
        self.added_blocks: torch.Tensor | None = None  # set at the switch; not state (only the picture uses it)
        self._is_sparse = False  # host copy of `sparse`, so the hot path never reads a device flag

    def importance(self) -> torch.Tensor:
        """Block-importance map G, (1 or H, nb, nb)."""
        if self.pattern == "learned":
            p = self.pattern_weight
            return p @ p.transpose(-2, -1)
        return self.pattern_mean

    def sparsify(self, density: float, layout: torch.Tensor | None = None,
                 added: torch.Tensor | None = None, keep_diagonal: bool = False, selection: str = "global") -> int:
        """Freeze the pattern and switch to block-sparse attention over `layout` (1 or H, nb, nb) when given
        (a coverage layout, with the diagonal blocks its chooser `added` to empty rows), else over the top-k
        layout of the pattern (its diagonal blocks always among them with `keep_diagonal`); returns how many
        diagonal blocks the top-k rule added to empty rows (0 for a given layout, whose chooser counts its own).
        Which blocks were added stays in `added_blocks` (the switch's picture marks them)."""
        count = 0
        if layout is None:
            layout, added = topk_layout(self.importance(), density, keep_diagonal, selection)
            count = int(added.sum())
        self.layout.copy_(layout.to(self.layout.device).expand_as(self.layout))
        self.added_blocks = None if added is None else added.detach().cpu()
        self.sparse.fill_(True)
        self._is_sparse = True
        self.pattern_weight.requires_grad_(False)
        return count

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
            elif fused and (collect or (dropout_p > 0 and x.device.type == "cpu"
                                        and RUNTIME.cpu_dropout_path == "fused")):
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
