import pytest
import torch

from sat.sparsity.pattern import block_pool, pattern_loss, topk_layout


@pytest.mark.parametrize("nb,density", [(4, 0.25), (8, 0.05), (16, 0.1), (32, 0.04), (7, 0.5)])
@pytest.mark.parametrize("heads", [None, 3])
def test_topk_count_plus_added_diagonal(nb, density, heads):
    g = torch.rand((nb, nb) if heads is None else (heads, nb, nb))
    layout, added = topk_layout(g, density)
    h = 1 if heads is None else heads
    k = int(nb * nb * density)
    assert layout.shape == (h, nb, nb) and layout.dtype == torch.bool
    assert int(layout.sum()) == h * k + added
    assert layout.any(dim=-1).all()  # no empty query-block row
    for i in range(h):  # the top-k entries are the k largest of G
        gi = g if heads is None else g[i]
        kept = gi.flatten()[layout[i].flatten() & ~torch.eye(nb, dtype=torch.bool).flatten()]
        if added == 0:
            assert kept.min() >= gi.flatten().topk(k).values.min()


def test_empty_rows_get_their_diagonal_block():
    g = torch.zeros(4, 4)
    g[0, 1] = g[0, 2] = g[0, 3] = g[1, 0] = 1.0  # top-4 lives in rows 0 and 1
    layout, added = topk_layout(g, 0.25)
    assert added == 2
    assert layout[0, 2, 2] and layout[0, 3, 3]
    assert int(layout.sum()) == 4 + 2


def test_block_pool_and_loss():
    probs = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = block_pool(probs, 2)
    assert torch.equal(pooled, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    g = torch.zeros(2, 2, requires_grad=True)
    loss = pattern_loss(pooled.expand(3, 2, 2, 2), g)
    loss.backward()
    assert loss.item() == pytest.approx((2.5**2 + 4.5**2 + 10.5**2 + 12.5**2) / 4)
    assert g.grad is not None


def test_impossible_density():
    with pytest.raises(ValueError):
        topk_layout(torch.rand(4, 4), 0.01)
