"""Multi-head self-attention shared by every model: dense (with the monitor's statistics) or block-sparse.

The layer's SAT state (the pattern, the layout, whether it is sparse) is sat/models/pattern_state.py. The
kernel path is chosen when the phase or the device changes (`_choose_path`):
- sparse: sat.kernels.block_sparse_attention over the frozen layout;
- dense, monitored steps: sat.kernels.dense.dense_attention, which takes the output, the monitor's
  batch-summed map and the pattern's block means from one computation of the probabilities (mixed-precision
  or float64 inputs keep the unfused explicit form below);
- dense, unmonitored steps: scaled_dot_product_attention, which materialises no probabilities, except when
  training on a CPU with attention dropout: there SDPA falls back to its math path (probabilities, a float
  dropout mask and the dropped probabilities, all stored) and dense_attention without statistics is faster
  and leaner (bench/train_step.py measures both; sat.kernels.runtime.RUNTIME.cpu_dropout_path chooses).
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
from sat.models.pattern_state import PatternState
from sat.shapes import num_blocks
from sat.sparsity.pattern import block_pool

# checkpoints written before the pattern state had its own module
_OLD_KEYS = {"pattern_weight": "pattern.weight", "pattern_mean": "pattern.mean", "pattern_count": "pattern.count",
             "layout": "pattern.layout"}


def _path_after_load(module: Attention, incompatible_keys) -> None:
    module._choose_path()


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
        nb = num_blocks(seq_len, block_size)
        self.num_heads, self.head_dim, self.block_size = num_heads, head_dim, block_size
        self.attn_dropout, self.backend = attn_dropout, backend
        qkv, proj = nn.Linear(dim, 3 * num_heads * head_dim), nn.Linear(num_heads * head_dim, dim)
        # registered first, drawn after the projections: the parameter order (the optimizer's) stays P, qkv, proj
        self.pattern = PatternState(pattern, num_heads if per_head else 1, nb, head_dim)
        self.qkv, self.proj = qkv, proj
        self.stats: AttentionStats | None = None
        self._choose_path()
        self.register_load_state_dict_post_hook(_path_after_load)  # the loaded state may be sparse

    @property
    def is_sparse(self) -> bool:
        return self.pattern.sparse

    def importance(self) -> torch.Tensor:
        return self.pattern.importance()

    def sparsify(self, density: float, layout: torch.Tensor | None = None, added: torch.Tensor | None = None,
                 keep_diagonal: bool = False, selection: str = "global") -> int:
        """Switch to block-sparse attention (PatternState.freeze says over which layout); returns the diagonal
        blocks the top-k rule added to empty rows."""
        count = self.pattern.freeze(density, layout, added, keep_diagonal, selection)
        self._choose_path()
        return count

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in _OLD_KEYS.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        if prefix + "sparse" in state_dict:
            state_dict[prefix + "pattern._extra_state"] = state_dict.pop(prefix + "sparse")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._choose_path()  # the device may have changed
        return out

    def _choose_path(self) -> None:
        if self.pattern.sparse:
            self._attend = self._sparse
        elif self.qkv.weight.device.type == "cpu":
            self._attend = self._dense_cpu
        else:
            self._attend = self._dense_accelerator

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                collect: bool = False) -> torch.Tensor:
        """x: (B, N, C); key_padding_mask: (B, N) bool, True = keep (None = no padding)."""
        B, N, _ = x.shape
        self.stats = None
        # q, k, v only as the call's arguments: the projection's output (3 activations) is freed when the
        # attention returns, not kept alive beside the output projection's
        out = self._attend(*self._project_qkv(x), key_padding_mask, collect)
        return self.proj(out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))  # (B, N, H*hd)

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v, each (B, H, N, hd)

    def _sparse(self, q, k, v, key_padding_mask, collect):
        return block_sparse_attention(q, k, v, self.pattern.layout, self.block_size, key_padding_mask, self.backend)

    def _dense_cpu(self, q, k, v, key_padding_mask, collect):
        dropout_p = self.attn_dropout if self.training else 0.0
        if collect:
            return self._monitored(q, k, v, key_padding_mask, dropout_p)
        if dropout_p > 0 and q.dtype == torch.float32 and RUNTIME.cpu_dropout_path == "fused":
            return dense_attention(q, k, v, key_padding_mask, dropout_p, self.block_size, False)[0]
        return self._sdpa(q, k, v, key_padding_mask, dropout_p)

    def _dense_accelerator(self, q, k, v, key_padding_mask, collect):
        dropout_p = self.attn_dropout if self.training else 0.0
        if collect:
            return self._monitored(q, k, v, key_padding_mask, dropout_p)
        return self._sdpa(q, k, v, key_padding_mask, dropout_p)

    @staticmethod
    def _sdpa(q, k, v, key_padding_mask, dropout_p):
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, N)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def _monitored(self, q, k, v, key_padding_mask, dropout_p):
        """A monitored step: the output, with the statistics left in self.stats. The fused function computes
        in fp32; mixed precision (CUDA: low-precision matmuls, fp32 softmax) and float64 take the explicit form."""
        if q.dtype == torch.float32:
            out, head_sum, pooled = dense_attention(q, k, v, key_padding_mask, dropout_p, self.block_size, True)
        else:
            out, head_sum, pooled = self._explicit(q, k, v, key_padding_mask, dropout_p)
        with torch.no_grad():
            mean_map = (head_sum / q.shape[0]).mean(dim=0)  # (N, N), the mean over batch and heads
        self.stats = AttentionStats(mean_map=mean_map, pattern_loss=self.pattern.observe(pooled, self.training))
        return out

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
