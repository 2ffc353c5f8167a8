"""SAT's pattern state of one attention layer: the block-importance pattern the switch chooses from, the
layout it chose, and whether the layer is sparse (docs/layouts.md).

- "learned": P (nb, head_dim), per head with per_head; G = P P^T is trained by SAT's pattern loss.
- "measured" (and coverage, random): G is the running mean of the block-pooled attention maps.
- `freeze` fixes the layout and makes the layer sparse; P stops training. `sparse` is the one flag that says
  so; it is saved with the weights (as this module's extra state, a bool tensor).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sat.sparsity.pattern import pattern_loss, topk_layout


class PatternState(nn.Module):
    def __init__(self, kind: str, heads: int, nb: int, head_dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.rand(heads, nb, head_dim))  # P
        self.register_buffer("mean", torch.zeros(heads, nb, nb))     # the measured pattern
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("layout", torch.ones(heads, nb, nb, dtype=torch.bool))
        self.sparse = False
        self.added_blocks: torch.Tensor | None = None  # set at the switch; not state (only the picture uses it)

    def importance(self) -> torch.Tensor:
        """Block-importance map G, (1 or H, nb, nb)."""
        if self.kind == "learned":
            return self.weight @ self.weight.transpose(-2, -1)
        return self.mean

    def observe(self, pooled: torch.Tensor, training: bool) -> torch.Tensor | None:
        """One monitored step's block means (B, H, nb, nb): SAT's pattern loss for the learned pattern
        (differentiable in P), else None, with the measured pattern's running mean updated in training."""
        if self.kind == "learned":
            return pattern_loss(pooled, self.importance())
        if self.kind == "measured" and training:
            with torch.no_grad():
                target = pooled.mean(dim=0)  # (H, nb, nb)
                target = target.mean(dim=0, keepdim=True) if self.mean.shape[0] == 1 else target
                self.count += 1
                self.mean += (target - self.mean) / self.count
        return None

    def freeze(self, density: float, layout: torch.Tensor | None = None, added: torch.Tensor | None = None,
               keep_diagonal: bool = False, selection: str = "global") -> int:
        """Fix the layout: `layout` (1 or H, nb, nb) when given (a coverage layout, with the diagonal blocks its
        chooser `added` to empty rows), else the top-k layout of G (see topk_layout); returns how many diagonal
        blocks the top-k rule added to empty rows (0 for a given layout, whose chooser counts its own)."""
        count = 0
        if layout is None:
            layout, added = topk_layout(self.importance(), density, keep_diagonal, selection)
            count = int(added.sum())
        self.layout.copy_(layout.to(self.layout.device).expand_as(self.layout))
        self.added_blocks = None if added is None else added.detach().cpu()
        self._set_sparse(True)
        return count

    def _set_sparse(self, sparse: bool) -> None:
        self.sparse = sparse
        self.weight.requires_grad_(not sparse)

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.sparse)  # a tensor, so that a state dict holds only tensors

    def set_extra_state(self, state: torch.Tensor) -> None:
        self._set_sparse(bool(state))
