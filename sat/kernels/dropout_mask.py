"""One-byte dropout masks for CPU training, shared by the dense attention kernel (sat/kernels/dense.py) and
the models' dropout (sat/models/dropout.py).

A mask draws 16 bits per element, one 64-bit word of the global generator per four elements, and is stored in
one byte per element (bernoulli_ takes a draw per element and F.dropout stores a float mask): the drop
probability is p rounded to a multiple of 2^-16 (0.1 -> 0.100006), and kept values are scaled by the exact
1 / (1 - p_rounded).
"""

from __future__ import annotations

import math

import torch

_RANDOM_BITS = 16  # per element: p is rounded to a multiple of 2^-16
_LEVELS = 1 << _RANDOM_BITS
_CHUNK = 1 << 18  # elements per pass of masked_scale: 1 MiB of fp32, so its three passes over it stay in cache


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


def masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x * keep * scale (a new contiguous tensor) for a one-byte mask `keep` (bool or uint8) of x's shape.

    A product with a byte tensor makes a float copy of it first on a CPU (type promotion), one more
    activation at a training step's peak; masked_fill_ and where are not vectorised (about three times the
    time). So the mask is converted into the output a cache-sized chunk at a time, then multiplied in place:
    the same values as x * keep * scale, with no temporary for a contiguous x (another is copied first)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    src, mask, dst = x.reshape(-1), keep.view(torch.uint8).reshape(-1), out.view(-1)
    for a in range(0, dst.numel(), _CHUNK):
        dst[a:a + _CHUNK].copy_(mask[a:a + _CHUNK]).mul_(src[a:a + _CHUNK]).mul_(scale)
    return out
