"""Pictures for TensorBoard that a person can read: block layouts drawn as scaled-up grids, the block-pooled
dense attention with the chosen layout outlined over it, and a custom-scalars layout that plots the
monitor's statistics against their thresholds.

Images are uint8 arrays in (3, H, W) order (TensorBoard's CHW), built with numpy only.
"""

from __future__ import annotations

import re

import numpy as np
import torch

WHITE, GRID, ACTIVE, ADDED, OUTLINE = (255, 255, 255), (205, 205, 205), (31, 78, 160), (232, 135, 30), (220, 30, 30)
TARGET_PX = 256  # cells are scaled so that a block grid is about this wide
HEAD_GAP = 6  # white pixels between the panels of several heads


def cell_size(nb: int, target: int = TARGET_PX) -> int:
    """Pixels per block: about `target` pixels across the grid, at least 4 so that the grid lines show."""
    return max(4, target // max(nb, 1))


def _canvas(nb: int, cell: int) -> np.ndarray:
    """(side, side, 3) white canvas with a 1-pixel grid line at every block boundary."""
    side = nb * cell + 1
    img = np.full((side, side, 3), WHITE, dtype=np.uint8)
    img[::cell, :, :] = GRID
    img[:, ::cell, :] = GRID
    return img


def _fill(img: np.ndarray, mask: np.ndarray, cell: int, color: tuple[int, int, int]) -> None:
    """Colour the inside (grid lines excluded) of every block where `mask` (nb, nb) is True."""
    for r, c in zip(*np.nonzero(mask), strict=True):
        img[r * cell + 1:(r + 1) * cell, c * cell + 1:(c + 1) * cell] = color


def _side_by_side(panels: list[np.ndarray]) -> np.ndarray:
    """HWC panels of equal height joined left to right with white gaps; returned as CHW."""
    gap = np.full((panels[0].shape[0], HEAD_GAP, 3), WHITE, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, p in enumerate(panels):
        parts.extend([gap, p] if i else [p])
    return np.ascontiguousarray(np.concatenate(parts, axis=1).transpose(2, 0, 1))


def layout_image(layout: torch.Tensor, added: torch.Tensor | None = None, target: int = TARGET_PX) -> np.ndarray:
    """A block layout (H or 1, nb, nb) as a picture: one panel per head, each block a `cell`-pixel square
    (blue = kept, white = skipped) on a visible grid; blocks in `added` (diagonal blocks added so that no
    query-block row is empty) are orange. Returns uint8 (3, height, width)."""
    lay = layout.detach().to("cpu", torch.bool).numpy()
    add = None if added is None else added.detach().to("cpu", torch.bool).expand(layout.shape).numpy()
    nb = lay.shape[-1]
    cell = cell_size(nb, target)
    panels = []
    for h in range(lay.shape[0]):
        img = _canvas(nb, cell)
        kept = lay[h] & ~add[h] if add is not None else lay[h]
        _fill(img, kept, cell, ACTIVE)
        if add is not None:
            _fill(img, lay[h] & add[h], cell, ADDED)
        panels.append(img)
    return _side_by_side(panels)


def attention_overlay(pooled: torch.Tensor, layout: torch.Tensor, target: int = TARGET_PX,
                      decades: float = 3.0) -> np.ndarray:
    """The block-pooled dense attention (H or 1, nb, nb) as a grey map -- darker = more mass, on a log scale
    covering `decades` powers of ten below each panel's largest block -- with every block of the layout
    (H or 1, nb, nb, broadcast over the map's heads) outlined in red. Returns uint8 (3, height, width)."""
    mass = pooled.detach().to("cpu", torch.float64).numpy()
    lay = layout.detach().to("cpu", torch.bool).expand(mass.shape).numpy()
    nb = mass.shape[-1]
    cell = cell_size(nb, target)
    panels = []
    for h in range(mass.shape[0]):
        m = np.clip(mass[h], 0.0, None)
        top = m.max()
        level = np.zeros_like(m) if top <= 0 else np.clip(np.log10(np.maximum(m / top, 1e-300)) / decades + 1, 0, 1)
        grey = np.rint(255 * (1 - level)).astype(np.uint8)  # (nb, nb): 0 = the heaviest block
        img = np.repeat(np.repeat(grey, cell, 0), cell, 1)
        img = np.pad(img, ((0, 1), (0, 1)), constant_values=255)
        img = np.repeat(img[:, :, None], 3, axis=2)
        width = max(1, cell // 8)  # outline thickness
        for r, c in zip(*np.nonzero(lay[h]), strict=True):
            y0, x0, y1, x1 = r * cell, c * cell, (r + 1) * cell, (c + 1) * cell
            img[y0:y0 + width, x0:x1 + 1] = OUTLINE
            img[y1 - width + 1:y1 + 1, x0:x1 + 1] = OUTLINE
            img[y0:y1 + 1, x0:x0 + width] = OUTLINE
            img[y0:y1 + 1, x1 - width + 1:x1 + 1] = OUTLINE
        panels.append(img)
    return _side_by_side(panels)


def monitor_layout(num_layers: int, skew_tag: str, drift_tag: str, sk_tag: str, ds_tag: str) -> dict:
    """A TensorBoard custom-scalars layout: one chart of every layer's skewness with the `--sk` threshold,
    one of every layer's drift with the `--ds` threshold, so a user sees when and why the switch fired.
    `skew_tag`/`drift_tag` are tag prefixes to which the layer index is appended. TensorBoard reads each entry
    as a regular expression matched at the start of a tag, so each is escaped and anchored at its end too
    (otherwise layer1 would also draw layer10-19)."""
    skew = [_exact(f"{skew_tag}{i}") for i in range(num_layers)] + [_exact(sk_tag)]
    drift = [_exact(f"{drift_tag}{i}") for i in range(num_layers)] + [_exact(ds_tag)]
    return {"switch": {"skewness (switch needs every layer >= sk)": ["Multiline", skew],
                       "drift % (switch needs every layer < ds)": ["Multiline", drift]}}


def _exact(tag: str) -> str:
    return re.escape(tag) + "$"
