"""Layout recall: how much of the dense attention probability mass a block layout keeps.

The mass of a block (head h, query block i, key block j) is the sum of the softmax probabilities (before
dropout) of the real query rows of block i over the real keys of block j, summed over the measured batches.
The recall of a layout is the mass inside it over the total mass (every real row holds mass 1, so the total is
the number of real rows measured). `measure_block_mass` takes the masses from a model in eval mode over a
fixed set of batches without drawing from any random generator; the functions below turn them into recalls,
a recall-versus-density curve and the densities that keep 90/95/99% of the mass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from sat.models.attention import Attention
from sat.shapes import num_blocks
from sat.sparsity.pattern import ranked_blocks

RECALL_DENSITIES = (0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)  # the curve's points
RECALL_TARGETS = (0.90, 0.95, 0.99)  # the mass fractions whose smallest density is reported


def block_mass(probs: torch.Tensor, key_padding_mask: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """Attention mass per (head, query block, key block), float64 (H, nb, nb), summed over the batch.

    probs: (B, H, N, N) probabilities of one layer; key_padding_mask: (B, N), nonzero = real token, or None.
    Padded query rows and padded keys are left out (whatever they hold, NaN included). Sum the results of
    several batches to accumulate over them.
    """
    B, H, N, M = probs.shape
    if N != M:
        raise ValueError(f"probs must be (B, H, N, N), got {tuple(probs.shape)}")
    nb = num_blocks(N, block_size)
    mass = torch.zeros(H, nb, nb, dtype=torch.float64, device=probs.device)
    for b in range(B):  # one float64 copy of one element's maps at a time
        p = probs[b].detach().to(torch.float64, copy=True)  # (H, N, N)
        if key_padding_mask is not None:
            pad = key_padding_mask[b].to(device=p.device) == 0  # (N,)
            p.masked_fill_(pad.view(1, N, 1), 0.0).masked_fill_(pad.view(1, 1, N), 0.0)
        mass += p.view(H, nb, block_size, nb, block_size).sum(dim=(2, 4))
    return mass


def layout_recall(block_mass: torch.Tensor, layout: torch.Tensor) -> tuple[list[float], float]:
    """(recall of each head, recall of the layer): mass inside the layout over the total mass.

    block_mass: (H, nb, nb); layout: bool (1 or H, nb, nb), one layout broadcast over the heads or one per head.
    The layer's recall pools the heads (inside mass summed over heads / total summed); a head without mass has
    recall nan.
    """
    mass = block_mass.detach().to(torch.float64)
    inside = (mass * layout.to(mass.device)).sum(dim=(-2, -1))  # (H,)
    total = mass.sum(dim=(-2, -1))  # (H,)
    per_head = [i / t if t > 0 else math.nan for i, t in zip(inside.tolist(), total.tolist(), strict=True)]
    whole = float(total.sum())
    return per_head, float(inside.sum()) / whole if whole > 0 else math.nan


def recall_by_blocks(block_mass: torch.Tensor, per_head: bool) -> torch.Tensor:
    """The layer's recall when each map keeps its k heaviest blocks plus the diagonal block of every row left
    empty (the layout rule of sat.sparsity.pattern, ranking by the measured mass), for k = 1 .. nb * nb:
    float64 (nb * nb,), entry k - 1 for k blocks. per_head=False ranks the head-summed mass (one layout for all
    heads), per_head=True each head's own.

    With T_k the k heaviest blocks of a map, row r is empty in T_k exactly while k <= first[r], the rank of the
    row's heaviest block, and then its diagonal block is added: inside(k) = mass(T_k) + sum of the diagonal
    masses of the rows with first[r] >= k. The curve never decreases (up to rounding): the block entering at
    k + 1 is at least as heavy as any diagonal block it makes unnecessary, since neither was in T_k.
    """
    mass = block_mass.detach().to(torch.float64)
    if not per_head:
        mass = mass.sum(dim=0, keepdim=True)  # (1, nb, nb)
    h, nb, _ = mass.shape
    cells = nb * nb
    order = ranked_blocks(mass)  # (h, cells)
    top = mass.reshape(h, cells).gather(1, order).cumsum(dim=1).sum(dim=0)  # (cells,): mass(T_k), k = 1..cells
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(cells, device=mass.device).expand(h, cells))
    first = rank.reshape(h, nb, nb).amin(dim=-1).reshape(-1)  # (h*nb,): rank of each row's heaviest block
    diagonal = mass.diagonal(dim1=-2, dim2=-1).reshape(-1)  # (h*nb,)
    # extra(k): the diagonal masses of the rows with first >= k, the latest rows (largest first) summed first.
    latest = torch.sort(first, descending=True, stable=True)
    extra = torch.cat([diagonal.new_zeros(1), diagonal[latest.indices].cumsum(dim=0)])  # (h*nb + 1,)
    ks = torch.arange(1, cells + 1, device=mass.device)
    # rows with first >= k: searchsorted on the ascending order of `first`
    empty = first.numel() - torch.searchsorted(latest.values.flip(0), ks, side="left")  # (cells,)
    inside = top + extra[empty]
    total = top[-1]  # every block kept: the same sum as the inside mass at k = cells, so that recall is 1 there
    return inside / total if total > 0 else torch.full_like(inside, math.nan)


def recall_curve(block_mass: torch.Tensor, densities: Sequence[float] = RECALL_DENSITIES,
                 per_head: bool = False) -> list[float]:
    """The layer's recall at each density, keeping k = int(nb * nb * density) blocks as the top-k layout rule
    does (plus diagonal blocks for empty rows); nan where k < 1 (the rule refuses such a density)."""
    nb = block_mass.shape[-1]
    by_blocks = recall_by_blocks(block_mass, per_head).tolist()
    ks = [int(nb * nb * d) for d in densities]
    return [by_blocks[k - 1] if k >= 1 else math.nan for k in ks]


def density_for_recall(block_mass: torch.Tensor, targets: Sequence[float] = RECALL_TARGETS,
                       per_head: bool = False) -> list[float | None]:
    """The smallest density k / (nb * nb) whose top-k layout (plus diagonal blocks) reaches each target recall;
    None where no layout does (a layer without mass)."""
    nb = block_mass.shape[-1]
    by_blocks = recall_by_blocks(block_mass, per_head)
    out: list[float | None] = []
    for target in targets:
        hits = (by_blocks >= target).nonzero()
        out.append(None if len(hits) == 0 else (int(hits[0]) + 1) / (nb * nb))
    return out


def recall_summary(block_mass: torch.Tensor, layout: torch.Tensor, per_head: bool,
                   densities: Sequence[float] = RECALL_DENSITIES,
                   targets: Sequence[float] = RECALL_TARGETS) -> dict:
    """One layer's recall numbers, ready for JSON (nan becomes None): the chosen layout's recall per head and
    for the layer, the curve at `densities`, the smallest density reaching each target."""
    heads, layer = layout_recall(block_mass, layout)
    curve = recall_curve(block_mass, densities, per_head)
    reach = density_for_recall(block_mass, targets, per_head)

    def finite(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {"recall": finite(layer), "recall_per_head": [finite(x) for x in heads],
            "curve": {f"{d:g}": finite(r) for d, r in zip(densities, curve, strict=True)},
            "density_for_recall": {f"{t:g}": d for t, d in zip(targets, reach, strict=True)}}


def _probe(index: int, masses: list[torch.Tensor | None]):
    """A forward hook for Attention layer `index` that adds its batch's block mass to masses[index]."""

    def hook(module: Attention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if module.is_sparse:
            raise ValueError("the layout recall is measured on dense attention, before the switch")
        x = args[0]
        mask = args[1] if len(args) > 1 else kwargs.get("key_padding_mask")
        B, N, _ = x.shape
        qkv = module.qkv(x).view(B, N, 3, module.num_heads, module.head_dim)  # the model's precision
        q, k = qkv.permute(2, 0, 3, 1, 4).unbind(0)[:2]  # each (B, H, N, hd)
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            total = None
            for b in range(B):  # one element's (H, N, N) probabilities at a time
                s = (q[b:b + 1].to(dtype) @ k[b:b + 1].to(dtype).transpose(-2, -1)) / math.sqrt(module.head_dim)
                kpm = None if mask is None else mask[b:b + 1]
                if kpm is not None:
                    s = s.masked_fill(~kpm.bool()[:, None, None, :], float("-inf"))
                m = block_mass(torch.softmax(s, dim=-1), kpm, module.block_size)
                total = m if total is None else total + m
        masses[index] = total if masses[index] is None else masses[index] + total

    return hook


def measure_block_mass(model: nn.Module, batches: Iterable[Any], run: Callable[[Any], Any]) -> list[torch.Tensor]:
    """Block masses (H, nb, nb) float64 of every Attention layer of `model`, in model order, summed over
    `batches`; `run(batch)` does one forward pass (device transfer and autocast included).

    The model runs in eval mode under no_grad (its mode is restored afterwards): no dropout, so no random
    generator is drawn from and the training trajectory is left as it was. Each layer's probabilities are
    recomputed from its input in a forward hook, one batch element at a time, since the dense phase's fast path
    (scaled_dot_product_attention) never materialises them.
    """
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    masses: list[torch.Tensor | None] = [None] * len(layers)
    was_training = model.training
    hooks = [layer.register_forward_hook(_probe(i, masses), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                run(batch)
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    if any(m is None for m in masses):
        raise ValueError("no batch reached every attention layer; the recall needs at least one dev batch")
    return masses
