"""The LRA encoder (SAT's LRA model): embeddings + learned positions, pre-LN blocks, final LN times the
padding mask, mean pooling (SAT) or a class token (model.pooling "cls", LRA's own ListOps model), a two-layer
head. Two-input tasks (retrieval) run both inputs through the same encoder as one stacked batch and classify
[x0, x1, x0*x1, x0-x1].
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sat.config import TaskConfig
from sat.data.batch import Batch
from sat.models.attention import Attention
from sat.models.dropout import Dropout
from sat.models.layers import encoder_blocks


class LRAModel(nn.Module):
    def __init__(self, cfg: TaskConfig, vocab_size: int, backend: str = "auto") -> None:
        super().__init__()
        m = cfg.model
        n = cfg.dataset.max_seq_len
        self.two_inputs = cfg.dataset.two_inputs
        # Tokens and positions start on the same scale, N(0, 0.02) as in SAT's LRA model; PyTorch's default
        # N(0, 1) for the tokens would make every position 50x fainter than its token.
        self.embed = nn.Embedding(vocab_size, m.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(1, n, m.dim) * 0.02)  # learned positions, (1, N, C)
        self.drop = Dropout(m.dropout)
        self.blocks = encoder_blocks(cfg, n, backend)
        self.norm = nn.LayerNorm(m.dim)
        # LRA's class token: a learned vector (zeros at the start, as LRA) in position 0, the input shifted right
        # by one, so N stays a whole number of blocks and sequences may use N - 1 positions.
        self.cls = nn.Parameter(torch.zeros(m.dim)) if m.pooling == "cls" else None
        width = m.dim * (4 if self.two_inputs else 1)
        self.head = nn.Sequential(nn.Linear(width, m.hidden_dim), nn.ReLU(),
                                  nn.Linear(m.hidden_dim, cfg.dataset.num_classes))

    def attention_layers(self) -> list[Attention]:
        return [b.attn for b in self.blocks]

    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None, collect: bool) -> torch.Tensor:
        """ids: (B, N); mask: (B, N) bool or None -> pooled features (B, C)."""
        x = self.embed(ids)  # (B, N, C)
        if self.cls is not None:
            x, mask = self._with_class_token(x, mask)
        x = self.drop(x + self.pos[:, : ids.shape[1]])
        for block in self.blocks:
            x = block(x, mask, collect)
        x = self.norm(x)
        if self.cls is not None:
            return x[:, 0]
        if mask is None:
            return x.mean(dim=1)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # mean over real tokens

    def _with_class_token(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) embeddings, (B, N) mask -> the class token then the first N - 1 embeddings, and their mask."""
        B = x.shape[0]
        if mask is None or bool(mask[:, -1].any()):
            raise ValueError(f"model.pooling 'cls' puts a class token in front: sequences may be at most "
                             f"{x.shape[1] - 1} tokens long, one fewer than dataset.max_seq_len")
        cls = self.cls.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x[:, :-1]], dim=1)
        return x, torch.cat([mask.new_ones(B, 1), mask[:, :-1]], dim=1)

    def forward(self, batch: Batch, collect: bool = False) -> torch.Tensor:
        if not self.two_inputs:
            return self.head(self.encode(batch.x, batch.mask, collect))
        B = batch.x.shape[0]
        ids = batch.x.reshape(2 * B, -1)  # (B, 2, N) -> (2B, N): both towers share the encoder
        mask = None if batch.mask is None else batch.mask.reshape(2 * B, -1)
        pooled = self.encode(ids, mask, collect).view(B, 2, -1)
        x0, x1 = pooled[:, 0], pooled[:, 1]
        return self.head(torch.cat([x0, x1, x0 * x1, x0 - x1], dim=-1))
