"""Vision Transformer (ViT-Ti/16, ViT-S/16) built from the same attention and encoder blocks as the LRA model.

Image (B, channels, H, W) (dataset.channels: 3 for RGB image folders, 1 for Fashion-MNIST) -> non-overlapping
patches (a Conv2d of kernel = stride = patch) -> (B, P, C); a class token in front and learned positions give
T = 1 + P real tokens, zero-padded up to N = dataset.max_seq_len (a multiple of the attention block size,
docs/block-sparse.md) with the pad tokens masked as keys. Pre-LN blocks (dense or Monarch MLPs), final LayerNorm,
a linear head on the class token ("cls") or on the mean of the real tokens ("mean").
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sat.config import TaskConfig, image_tokens
from sat.data.batch import Batch
from sat.models.attention import Attention
from sat.models.dropout import Dropout
from sat.models.layers import encoder_blocks


class ViT(nn.Module):
    def __init__(self, cfg: TaskConfig, backend: str = "auto") -> None:
        super().__init__()
        d, m = cfg.dataset, cfg.model
        if d.num_classes < 2:
            raise ValueError(f"ViT needs num_classes >= 2 (resolved from the data), got {d.num_classes}")
        self.img_size, self.patch_size, self.pooling = d.img_size, d.patch_size, m.pooling
        # 0 = not resolved from the data (a config built without data, a checkpoint from before dataset.channels): RGB
        self.channels = d.channels or 3
        self.num_tokens = image_tokens(d)  # T = 1 + (img / patch)^2
        n = d.max_seq_len                  # N >= T, a multiple of the block size
        self.patch_embed = nn.Conv2d(self.channels, m.dim, kernel_size=d.patch_size, stride=d.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(m.dim))                        # (C,)
        self.pos = nn.Parameter(torch.randn(1, self.num_tokens, m.dim) * 0.02)  # (1, T, C), real tokens only
        self.drop = Dropout(m.dropout)
        self.blocks = encoder_blocks(cfg, n, backend)
        self.norm = nn.LayerNorm(m.dim)
        self.head = nn.Linear(m.dim, d.num_classes)
        # The padding is the same for every image: a (1, N) key mask, True = real token.
        self.register_buffer("token_mask", (torch.arange(n) < self.num_tokens).unsqueeze(0), persistent=False)
        self._init_linears()

    def _init_linears(self) -> None:
        """Dense linear layers: truncated normal (std 0.02), zero bias, the usual ViT choice. Monarch layers
        keep their own per-block initialisation and each attention layer its uniform pattern P."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)

    def attention_layers(self) -> list[Attention]:
        return [b.attn for b in self.blocks]

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, channels, H, W) -> padded token embeddings (B, N, C); tokens T..N-1 are zeros."""
        B, channels, H, W = images.shape
        if H != self.img_size or W != self.img_size:
            raise ValueError(f"ViT built for {self.img_size}x{self.img_size} images, got {H}x{W}")
        if channels != self.channels:
            raise ValueError(f"ViT built for {self.channels}-channel images, got {channels} channel(s)")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)       # (B, P, C)
        cls = self.cls_token.to(x.dtype).expand(B, 1, -1)               # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.pos.to(x.dtype)          # (B, T, C)
        pad = self.token_mask.shape[1] - self.num_tokens
        return nn.functional.pad(x, (0, 0, 0, pad))                     # (B, N, C)

    def forward(self, batch: Batch, collect: bool = False) -> torch.Tensor:
        """batch.x: (B, channels, H, W) images -> logits (B, classes)."""
        x = self.drop(self.tokens(batch.x))                          # (B, N, C)
        mask = self.token_mask.expand(x.shape[0], -1)                # (B, N)
        for block in self.blocks:
            x = block(x, mask, collect)
        x = self.norm(x)
        if self.pooling == "cls":
            pooled = x[:, 0]                                         # (B, C)
        else:
            pooled = x[:, : self.num_tokens].mean(dim=1)             # (B, C), real tokens only
        return self.head(pooled)
