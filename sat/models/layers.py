"""Building blocks shared by the LRA encoder and the ViT: the MLP (dense or Monarch) and a pre-LN block."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from sat.config import TaskConfig
from sat.models.attention import Attention
from sat.models.dropout import Dropout


def make_linear(in_features: int, out_features: int, kind: str, nblocks: int) -> nn.Module:
    if kind == "monarch":
        from sat.models.monarch import MonarchLinear

        return MonarchLinear(in_features, out_features, nblocks=nblocks)
    return nn.Linear(in_features, out_features)


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout; `kind` = dense | monarch chooses the linear layers."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, kind: str = "dense", nblocks: int = 4) -> None:
        super().__init__()
        self.fc1 = make_linear(dim, hidden, kind, nblocks)
        self.act = nn.GELU()
        self.drop1 = Dropout(dropout)
        self.fc2 = make_linear(hidden, dim, kind, nblocks)
        self.drop2 = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm Transformer block: x + drop(MHA(LN(x))), then x + MLP(LN(x)).

    recompute="sparse": once the attention is block-sparse, training steps keep only the inputs of the block's
    two halves (attention, MLP) and rebuild each half's activations in the backward, one half at a time (the
    generator state is replayed, so dropout draws the same masks): less memory for more time per sparse step.
    Two halves rather than the whole block: the backward then holds one half's activations at a time, not both,
    for the same recomputation (bench/results/train_step.txt).
    """

    def __init__(self, dim: int, hidden: int, attention: Attention, dropout: float = 0.0, mlp: str = "dense",
                 nblocks: int = 4, recompute: str = "off") -> None:
        super().__init__()
        self.recompute = recompute
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention
        self.drop = Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden, dropout, mlp, nblocks)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                collect: bool = False) -> torch.Tensor:
        if self.recompute == "sparse" and self.attn.is_sparse and self.training and torch.is_grad_enabled():
            x = checkpoint(self._attention_half, x, key_padding_mask, False, use_reentrant=False)
            return checkpoint(self._mlp_half, x, use_reentrant=False)
        return self._mlp_half(self._attention_half(x, key_padding_mask, collect))

    def _attention_half(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, collect: bool) -> torch.Tensor:
        return x + self.drop(self.attn(self.norm1(x), key_padding_mask, collect))

    def _mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))


def encoder_blocks(cfg: TaskConfig, seq_len: int, backend: str = "auto") -> nn.ModuleList:
    """The model's stack of pre-LN blocks over a padded length `seq_len`, as the config describes it."""
    m, s = cfg.model, cfg.sparsity
    return nn.ModuleList(
        EncoderBlock(m.dim, m.hidden_dim,
                     Attention(m.dim, m.num_heads, m.head_dim, seq_len, s.block_size, m.attn_dropout, s.pattern,
                               s.per_head, backend),
                     m.dropout, m.mlp, m.nblocks, m.recompute)
        for _ in range(m.num_layers))
