"""How a top-k layout spreads its blocks (sparsity.selection), and the random-layout control (pattern random),
each against a plain re-statement of its rule."""

from __future__ import annotations

import pytest
import torch

from sat.sparsity.pattern import topk_layout


def _maps(seed: int, h: int = 2, nb: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, nb, nb, generator=g)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("density", [0.1, 0.2, 0.3, 0.5])
def test_rows_spreads_the_budget_evenly_over_query_rows(seed, density):
    g = _maps(seed)
    h, nb, _ = g.shape
    k = int(nb * nb * density)
    layout, added = topk_layout(g, density, selection="rows")
    per_row = max(1, k // nb)
    # fewer blocks than rows: the rows with the largest best block get it, the others their diagonal block
    assert int(added.sum()) == h * max(0, nb - k)
    layout = layout & ~added
    for i in range(h):
        counts = layout[i].sum(dim=-1)
        assert int(layout[i].sum()) == k
        assert int(counts.max() - counts.min()) <= 1  # no row gets more than one block above another
        for r in range(nb):  # each row holds its own best blocks
            best = g[i, r].argsort(descending=True)[:int(counts[r])]
            assert layout[i, r, best].all()
        top = per_row if k >= nb else 0
        extra_rows = (counts > top).nonzero().flatten()  # the leftover went to the largest next-best blocks
        if 0 < len(extra_rows) < nb:
            nxt = g[i].sort(dim=-1, descending=True).values[:, top]
            assert nxt[extra_rows].min() >= nxt[counts == top].max()


@pytest.mark.parametrize("seed", range(5))
def test_rows_with_the_diagonal_counts_it_among_the_rows_blocks(seed):
    g = _maps(seed, nb=10)
    layout, _ = topk_layout(g, 0.25, keep_diagonal=True, selection="rows")  # k = 25: 2 per row, 5 rows a third
    eye = torch.eye(10, dtype=torch.bool)
    assert (layout & eye).sum() == 2 * 10
    counts = layout.sum(dim=-1)
    assert int(layout.sum()) == 2 * 25 and counts.min() == 2 and counts.max() == 3


@pytest.mark.parametrize("seed", range(5))
def test_stripes_take_whole_key_columns_in_order_of_their_mass(seed):
    g = _maps(seed, h=1, nb=8)
    layout, _ = topk_layout(g, 20 / 64, selection="stripes")  # k = 20: two whole columns and 4 of the third
    columns = g[0].sum(dim=0).argsort(descending=True)
    assert layout[0][:, columns[0]].all() and layout[0][:, columns[1]].all()
    third = layout[0][:, columns[2]]
    assert int(third.sum()) == 4
    assert set(third.nonzero().flatten().tolist()) == set(g[0][:, columns[2]].argsort(descending=True)[:4].tolist())
    assert int(layout.sum()) == 20


def test_stripes_with_the_diagonal_then_the_heaviest_column():
    g = torch.zeros(1, 6, 6)
    g[0, :, 4] = 1.0  # key block 4: what every query reads
    g[0, 2, 4] = 0.5
    layout, _ = topk_layout(g, 11 / 36, keep_diagonal=True, selection="stripes")  # k = 11: diagonal + 5
    expected = torch.eye(6, dtype=torch.bool)
    expected[:, 4] = True
    assert torch.equal(layout[0], expected)


def test_global_is_unchanged_and_an_unknown_selection_is_refused():
    g = _maps(9)
    assert torch.equal(topk_layout(g, 0.2)[0], topk_layout(g, 0.2, selection="global")[0])
    with pytest.raises(ValueError, match="unknown selection"):
        topk_layout(g, 0.2, selection="diagonal")


def test_random_pattern_is_a_seeded_random_layout_at_the_density():
    from sat.config import load_config
    from sat.models.build import build_model
    from sat.sparsity.scheduler import TransitionScheduler

    over = {"model": {"num_layers": 2, "dim": 16, "hidden_dim": 32, "head_dim": 8},
            "dataset": {"max_seq_len": 128}, "sparsity": {"pattern": "random", "keep_diagonal": True,
                                                          "block_size": 16, "density": 0.25}}
    cfg = load_config("lra-listops", overrides=over)

    def layouts(seed):
        torch.manual_seed(seed)
        model = build_model(cfg, 20, "torch")
        scheduler = TransitionScheduler(cfg.sparsity, 2, 100)
        rng = torch.get_rng_state()
        scheduler._sparsify(1, model, "forced")
        assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream is untouched
        return [layer.pattern.layout.clone() for layer in model.attention_layers()]

    a, b, c = layouts(1), layouts(1), layouts(2)
    eye = torch.eye(8, dtype=torch.bool)
    for la, lb, lc in zip(a, b, c, strict=True):
        assert torch.equal(la, lb) and not torch.equal(la, lc)
        assert int(la.sum()) == 16 and (la[0] & eye).sum() == 8  # k = int(64 * 0.25), the diagonal among them
    assert not torch.equal(a[0], a[1])  # each layer its own draw
