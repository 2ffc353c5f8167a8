"""Block-importance patterns and the layouts chosen from them (docs/layouts.md).

"learned": each attention layer owns P (nb, head_dim), G = P P^T is trained during the dense phase by
MSE(avgpool(probs), G). "measured": G is the running mean of the block-pooled attention map (no extra loss).
At the switch the layout is the top-k of G with k = int(nb * nb * density), plus the diagonal block of any
query-block row left empty, so that no softmax row is empty (the choosers return which blocks that rule added,
so that the pictures can show them apart).
"coverage": the fewest blocks whose measured attention mass (sat.sparsity.recall.block_mass) reaches a
fraction of the total, within density bounds, with the same diagonal rule for empty rows.
keep_diagonal (an option, not SAT's rule): every diagonal block is kept and counts within the blocks chosen;
the rest are chosen as above from the off-diagonal blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sat.config import SELECTIONS


def block_pool(probs: torch.Tensor, block_size: int) -> torch.Tensor:
    """Average over block_size x block_size tiles: (..., N, N) -> (..., N/bs, N/bs)."""
    *lead, n, m = probs.shape
    x = probs.reshape(*lead, n // block_size, block_size, m // block_size, block_size)
    return x.mean(dim=(-3, -1))


def pattern_loss(pooled: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """SAT's pattern loss: MSE(pooled probs (B, H, nb, nb), G (nb, nb) or (H, nb, nb) broadcast)."""
    return F.mse_loss(importance.expand_as(pooled).float(), pooled.float())


def topk_layout(importance: torch.Tensor, density: float, keep_diagonal: bool = False,
                selection: str = "global") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k layout of a block-importance map, per leading index.

    importance: (nb, nb) or (H, nb, nb). Returns (layout bool (1 or H, nb, nb), the diagonal blocks added to
    rows that the top-k left empty, bool of the same shape). k = int(nb * nb * density) blocks per map before
    the additions. keep_diagonal: the nb diagonal blocks are among the k (k is raised to nb if smaller), the
    other k - nb are the top of the off-diagonal blocks; no row is then left empty. `selection` says how the k
    are spread (see `selection_scores`): "global" (SAT's rule: the k largest entries), "rows" or "stripes".
    """
    g = importance.detach().float()
    if g.dim() == 2:
        g = g.unsqueeze(0)  # (1, nb, nb)
    h, nb, _ = g.shape
    k = int(nb * nb * density)
    if k < 1:
        raise ValueError(f"density {density} keeps no block of a {nb}x{nb} grid")
    if keep_diagonal:
        g = with_diagonal_first(g)
        k = max(k, nb)
    g = selection_scores(g, selection, k)
    flat = g.reshape(h, nb * nb)
    idx = flat.topk(k, dim=-1).indices  # (h, k)
    layout = torch.zeros(h, nb * nb, dtype=torch.bool, device=g.device)
    layout.scatter_(1, idx, True)
    return fill_empty_rows(layout.reshape(h, nb, nb))


def selection_scores(scores: torch.Tensor, selection: str, k: int) -> torch.Tensor:
    """Scores (h, nb, nb) re-ranked so that the k highest follow `selection` (+inf entries, the kept diagonal,
    stay first):

    - "global": unchanged; the k largest blocks wherever they are (SAT's rule; a few query rows can take
      most of the off-diagonal blocks).
    - "rows": every query-block row first takes its own int(k / nb) best blocks (at least 1), then the blocks
      left over go one per row, to the rows whose next-best block is the largest: the budget is spread evenly
      over the query rows (no row gets more than one block above another).
    - "stripes": whole key-block columns, the columns in order of their total score and the blocks of a
      column in order of their own (vertical stripes: key blocks that every query reads; the last column
      may be partly taken).
    """
    if selection == "global":
        return scores
    h, nb, _ = scores.shape
    finite = scores.masked_fill(~torch.isfinite(scores), 0.0)
    own = finite / (finite.abs().amax(dim=(-2, -1), keepdim=True) + 1e-30)  # in [-1, 1]: order within a tier
    if selection == "rows":
        per_row = max(1, k // nb)
        rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # (h, nb, nb): place in row
        tier = 2.0 * (rank < per_row) + 1.0 * (rank == per_row)  # each row's best per_row, then its next one
    elif selection == "stripes":
        column = finite.sum(dim=-2)  # (h, nb): total score of each key block
        place = column.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = heaviest column
        tier = (nb - place).to(scores.dtype).unsqueeze(-2).expand(h, nb, nb)  # columns in order, as tiers
    else:
        raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    return torch.where(torch.isinf(scores), scores, 3.0 * tier + own)  # tiers 3 apart: own (+-1) never crosses


def with_diagonal_first(scores: torch.Tensor) -> torch.Tensor:
    """(h, nb, nb) scores with +inf on the diagonal, so that any ranking takes the diagonal blocks first."""
    eye = torch.eye(scores.shape[-1], dtype=torch.bool, device=scores.device)
    return scores.masked_fill(eye, float("inf"))


def fill_empty_rows(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give every query-block row of a (h, nb, nb) bool layout without an active block its diagonal block, in
    place; returns (layout, the blocks added: bool (h, nb, nb))."""
    nb = layout.shape[-1]
    empty = ~layout.any(dim=-1)  # (h, nb): query-block rows with no active key block
    added = torch.eye(nb, dtype=torch.bool, device=layout.device).unsqueeze(0) & empty.unsqueeze(-1)
    layout |= added
    return layout, added


def ranked_blocks(scores: torch.Tensor) -> torch.Tensor:
    """Flat block indices of each map, (h, nb, nb) -> (h, nb * nb), from the highest score to the lowest; equal
    scores keep row-major order (query block, then key block), so the ranking is deterministic."""
    h = scores.shape[0]
    return torch.sort(scores.reshape(h, -1), dim=-1, descending=True, stable=True).indices


def ranked_layout(scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts[i] highest-scoring blocks of map i (ties as in ranked_blocks), plus the diagonal block of every
    row left empty. scores: (h, nb, nb); counts: (h,) ints. Returns (layout bool (h, nb, nb), the blocks added,
    bool (h, nb, nb))."""
    h, nb, _ = scores.shape
    order = ranked_blocks(scores)  # (h, nb*nb)
    positions = torch.arange(nb * nb, device=scores.device).unsqueeze(0)  # (1, nb*nb)
    keep = positions < counts.to(scores.device).reshape(h, 1)  # (h, nb*nb): the first counts[i] of the ranking
    layout = torch.zeros(h, nb * nb, dtype=torch.bool, device=scores.device).scatter_(1, order, keep)
    return fill_empty_rows(layout.reshape(h, nb, nb))


class CoverageLayout(NamedTuple):
    layout: torch.Tensor  # bool (1 or H, nb, nb)
    density_used: float   # active blocks / all blocks of the layout, the added diagonal blocks included
    added: int            # diagonal blocks added to rows the selection left empty
    selected: list[int]   # blocks chosen per map (1 or H) before those diagonal blocks
    added_blocks: torch.Tensor  # bool, shaped like layout: which blocks those added ones are


def coverage_layout(block_mass: torch.Tensor, recall_target: float, min_density: float, max_density: float,
                    per_head: bool, keep_diagonal: bool = False) -> CoverageLayout:
    """The fewest blocks whose mass reaches recall_target of the total, per map, then the diagonal rule.

    block_mass: (H, nb, nb) attention mass per (head, query block, key block), e.g. from
    sat.sparsity.recall.block_mass. per_head=False ranks the head-summed mass and returns one (1, nb, nb)
    layout for all heads; per_head=True returns an (H, nb, nb) layout, one selection per head.

    Taking blocks in descending order of mass (ties in row-major order) until the target is reached keeps the
    fewest: any m blocks hold at most the mass of the m heaviest, so if some m blocks reach the target the m
    heaviest do too, and the first m at which the heaviest reach it is the minimum. The count is then held
    within [max(1, int(nb * nb * min_density)), int(nb * nb * max_density)]. As in topk_layout, the diagonal
    blocks given to rows left empty come on top of the count: they do not count towards max_density, so
    density_used can exceed it by at most (nb - 1) / (nb * nb).

    keep_diagonal: the nb diagonal blocks come first (their mass counts towards the target), then the heaviest
    off-diagonal blocks until the target is reached: the fewest blocks that reach it with the diagonal kept.
    The count is then at least nb, even above max_density.
    """
    if block_mass.dim() != 3 or block_mass.shape[-1] != block_mass.shape[-2]:
        raise ValueError(f"block_mass must have shape (H, nb, nb), got {tuple(block_mass.shape)}")
    if not 0.0 < recall_target <= 1.0:
        raise ValueError(f"recall_target must lie in (0, 1], got {recall_target}")
    if not 0.0 < min_density <= max_density <= 1.0:
        raise ValueError(f"densities need 0 < min_density <= max_density <= 1, got {min_density}, {max_density}")
    mass = block_mass.detach().to(torch.float64)
    if not per_head:
        mass = mass.sum(dim=0, keepdim=True)  # (1, nb, nb): one layout shared by the heads
    h, nb, _ = mass.shape
    cells = nb * nb
    lowest, highest = max(1, int(cells * min_density)), int(cells * max_density)
    if highest < 1:
        raise ValueError(f"max_density {max_density} keeps no block of a {nb}x{nb} grid")
    scores = mass
    if keep_diagonal:
        scores = with_diagonal_first(mass)
        lowest, highest = max(lowest, nb), max(highest, nb)
    order = ranked_blocks(scores)  # (h, cells)
    kept = mass.reshape(h, cells).gather(1, order).cumsum(dim=1)  # (h, cells): mass of the first m blocks
    # The total is the last partial sum, so target 1.0 stops at the last block with mass (no rounding gap);
    # recall_target <= 1 makes the last entry always reach the target.
    reached = kept >= recall_target * kept[:, -1:]
    counts = (reached.to(torch.int64).argmax(dim=1) + 1).clamp(lowest, highest)  # (h,)
    layout, added = ranked_layout(scores, counts)
    return CoverageLayout(layout, int(layout.sum()) / layout.numel(), int(added.sum()), counts.tolist(), added)
