"""The one batch type of every task: one input (B, N), two inputs (B, 2, N) or images (B, 3, H, W).

LRA loaders (sat/data/lra.py) and image-folder streams (sat/data/image_stream.py) give it; the LRA encoder and
the ViT (sat/models/) take it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """x: (B, N) or (B, 2, N) int64 ids, or (B, 3, H, W) float32 images; mask: same shape as the ids, bool
    (True = real token), or None; y: (B,) int64 class ids."""

    x: torch.Tensor
    mask: torch.Tensor | None
    y: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        nb = device != "cpu" and torch.device(device).type == "cuda"
        return Batch(self.x.to(device, non_blocking=nb),
                     None if self.mask is None else self.mask.to(device, non_blocking=nb),
                     self.y.to(device, non_blocking=nb))

    def __len__(self) -> int:
        return int(self.y.shape[0])
