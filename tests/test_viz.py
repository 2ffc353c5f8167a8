"""TensorBoard pictures: scaled-up layouts with a grid, attention maps with the layout outlined."""

from __future__ import annotations

import numpy as np
import torch

from sat.viz import ACTIVE, ADDED, GRID, OUTLINE, WHITE, attention_overlay, cell_size, layout_image, monitor_layout


def px(img: np.ndarray, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in img[:, y, x])


def test_layout_image_is_scaled_with_a_grid_and_one_panel_per_head() -> None:
    layout = torch.zeros(2, 8, 8, dtype=torch.bool)
    layout[0, 0, 0] = layout[0, 3, 5] = layout[1, 7, 7] = True
    added = torch.zeros(1, 8, 8, dtype=torch.bool)
    added[0, 7, 7] = True
    img = layout_image(layout, added)
    cell = cell_size(8)
    assert cell == 32 and img.dtype == np.uint8
    side = 8 * cell + 1
    assert img.shape == (3, side, 2 * side + 6)
    center = cell // 2
    assert px(img, center, center) == ACTIVE  # head 0, block (0, 0)
    assert px(img, 3 * cell + center, 5 * cell + center) == ACTIVE
    assert px(img, cell + center, cell + center) == WHITE  # a skipped block
    assert px(img, cell, 10) == GRID and px(img, 10, 2 * cell) == GRID  # grid lines between blocks
    off = side + 6  # head 1's panel
    assert px(img, 7 * cell + center, off + 7 * cell + center) == ADDED
    assert px(img, center, off + center) == WHITE


def test_small_cells_never_vanish() -> None:
    img = layout_image(torch.ones(1, 128, 128, dtype=torch.bool))
    assert cell_size(128) == 4 and img.shape[1:] == (128 * 4 + 1, 128 * 4 + 1)


def test_attention_overlay_shades_mass_and_outlines_the_layout() -> None:
    pooled = torch.full((1, 4, 4), 1e-6)
    pooled[0, 1, 2] = 1.0
    pooled[0, 0, 0] = 0.01  # two decades below the top: one third dark on a 3-decade scale
    layout = torch.zeros(1, 4, 4, dtype=torch.bool)
    layout[0, 1, 2] = True
    img = attention_overlay(pooled, layout)
    cell = cell_size(4)
    c = cell // 2
    assert px(img, cell + c, 2 * cell + c) == (0, 0, 0)  # the heaviest block is black
    assert px(img, c, c) == (170, 170, 170)
    assert px(img, 3 * cell + c, 3 * cell + c) == WHITE  # below the scale
    assert px(img, cell, 2 * cell + c) == OUTLINE and px(img, cell + c, 3 * cell) == OUTLINE
    assert px(img, 0, c) != OUTLINE  # block (0, 0) is not in the layout


def test_monitor_layout_names_every_layer_and_the_thresholds() -> None:
    lay = monitor_layout(2, "monitor/skewness/layer", "monitor/drift/layer", "monitor/threshold/sk",
                         "monitor/threshold/ds")
    charts = lay["switch"]
    skew, drift = charts.values()
    assert skew == ["Multiline", ["monitor/skewness/layer0$", "monitor/skewness/layer1$", "monitor/threshold/sk$"]]
    assert drift[1][-1] == "monitor/threshold/ds$"


def test_monitor_layout_tags_match_one_layer_each() -> None:
    """TensorBoard matches each entry as a regex at the start of a tag: layer1 must not draw layer10."""
    import re

    lay = monitor_layout(12, "monitor/skewness/layer", "monitor/drift/layer", "monitor/threshold/sk",
                         "monitor/threshold/ds")
    skew = next(iter(lay["switch"].values()))[1]
    tags = [f"monitor/skewness/layer{i}" for i in range(12)]
    assert [t for t in tags if re.match(skew[1], t)] == ["monitor/skewness/layer1"]
