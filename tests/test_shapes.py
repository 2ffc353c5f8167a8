"""The block grid's shape rule (sat/shapes.py), which the config, the attention layer, the kernels and the
recall measurement all apply."""

import pytest
import torch

from sat.config import ConfigError, load_config
from sat.kernels import block_sparse_attention
from sat.models.attention import Attention
from sat.shapes import block_grid_problem, layout_shape_problem, num_blocks
from sat.sparsity.recall import block_mass


def test_the_rule():
    assert num_blocks(1024, 32) == 32 and block_grid_problem(1024, 32) == ""
    for n, bs in [(1000, 32), (64, 0), (64, -8)]:
        assert "does not divide" in block_grid_problem(n, bs)
        with pytest.raises(ValueError, match="does not divide"):
            num_blocks(n, bs)
    assert layout_shape_problem((1, 4, 4), 2, 64, 16) == "" and layout_shape_problem((2, 4, 4), 2, 64, 16) == ""
    assert "layout must be (1 or 2, 4, 4)" in layout_shape_problem((3, 4, 4), 2, 64, 16)
    assert "layout must be" in layout_shape_problem((1, 4), 2, 64, 16)


def test_every_layer_applies_it():
    with pytest.raises(ConfigError, match="must divide"):
        load_config("lra-image", overrides={"sparsity": {"block_size": 48}})
    with pytest.raises(ValueError, match="does not divide"):
        Attention(16, 2, 8, 60, 16)
    q = torch.zeros(1, 2, 60, 8)
    with pytest.raises(ValueError, match="does not divide"):
        block_sparse_attention(q, q, q, torch.ones(1, 4, 4, dtype=torch.bool), 16, backend="torch")
    with pytest.raises(ValueError, match="layout must be"):
        block_sparse_attention(q[:, :, :48], q[:, :, :48], q[:, :, :48], torch.ones(1, 4, 4, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="does not divide"):
        block_mass(torch.zeros(1, 2, 60, 60), None, 16)
