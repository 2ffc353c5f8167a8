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
