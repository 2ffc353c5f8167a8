"""Model dropout: nn.Dropout's semantics, with sat/kernels/dropout_mask.py's one-byte masks on a CPU.

F.dropout on a CPU keeps a float mask per element for the backward; `keep_mask` draws the same Bernoulli
decisions (p rounded to a multiple of 2^-16) into one byte each, a quarter of the memory, and `masked_scale`
applies it without a float copy of the mask. On CUDA, F.dropout's fused kernel keeps a byte mask already and
is used as is.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sat.kernels.dropout_mask import keep_mask, keep_mask_scale, masked_scale


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving only the one-byte mask."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return masked_scale(x, keep, scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return masked_scale(grad, keep, ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout's function; on a CPU with the one-byte mask (CUDA's fused kernel keeps a byte mask already)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return _MaskedScale.apply(x, keep_mask(tuple(x.shape), p, x.device), keep_mask_scale(p))


class Dropout(nn.Module):
    """nn.Dropout with `dropout` above: the same state dict (none) and semantics, a quarter of the memory."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
