"""Block-importance patterns and the top-k layout chosen from them (SPEC.md section 3).

"learned": each attention layer owns P (nb, head_dim), G = P P^T is trained during the dense phase by
MSE(avgpool(probs), G). "measured": G is the running mean of the block-pooled attention map (no extra loss).
At the switch the layout is the top-k of G with k = int(nb * nb * density), plus the diagonal block of any
query-block row left empty, so that no softmax row is empty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_pool(probs: torch.Tensor, block_size: int) -> torch.Tensor:
    """Average over block_size x block_size tiles: (..., N, N) -> (..., N/bs, N/bs)."""
    *lead, n, m = probs.shape
    x = probs.reshape(*lead, n // block_size, block_size, m // block_size, block_size)
    return x.mean(dim=(-3, -1))


def pattern_loss(pooled: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """SAT's pattern loss: MSE(pooled probs (B, H, nb, nb), G (nb, nb) or (H, nb, nb) broadcast)."""
    return F.mse_loss(importance.expand_as(pooled).float(), pooled.float())


def topk_layout(importance: torch.Tensor, density: float) -> tuple[torch.Tensor, int]:
    """Top-k layout of a block-importance map, per leading index.

    importance: (nb, nb) or (H, nb, nb). Returns (layout bool (1 or H, nb, nb), number of diagonal blocks added
    to rows that the top-k left empty). k = int(nb * nb * density) blocks per map before the additions.
    """
    g = importance.detach().float()
    if g.dim() == 2:
        g = g.unsqueeze(0)  # (1, nb, nb)
    h, nb, _ = g.shape
    k = int(nb * nb * density)
    if k < 1:
        raise ValueError(f"density {density} keeps no block of a {nb}x{nb} grid")
    flat = g.reshape(h, nb * nb)
    idx = flat.topk(k, dim=-1).indices  # (h, k)
    layout = torch.zeros(h, nb * nb, dtype=torch.bool, device=g.device)
    layout.scatter_(1, idx, True)
    layout = layout.reshape(h, nb, nb)
    empty = ~layout.any(dim=-1)  # (h, nb): query-block rows with no active key block
    added = int(empty.sum())
    if added:
        diag = torch.eye(nb, dtype=torch.bool, device=g.device).unsqueeze(0) & empty.unsqueeze(-1)
        layout |= diag
    return layout, added
