import itertools

import pytest
import torch

from sat.sparsity.pattern import (
    block_pool,
    coverage_layout,
    fill_empty_rows,
    pattern_loss,
    ranked_blocks,
    ranked_layout,
    topk_layout,
)


@pytest.mark.parametrize("nb,density", [(4, 0.25), (8, 0.05), (16, 0.1), (32, 0.04), (7, 0.5)])
@pytest.mark.parametrize("heads", [None, 3])
def test_topk_count_plus_added_diagonal(nb, density, heads):
    g = torch.rand((nb, nb) if heads is None else (heads, nb, nb))
    layout, added_blocks = topk_layout(g, density)
    added = int(added_blocks.sum())
    h = 1 if heads is None else heads
    k = int(nb * nb * density)
    assert layout.shape == (h, nb, nb) and layout.dtype == torch.bool
    assert int(layout.sum()) == h * k + added
    assert not (added_blocks & ~torch.eye(nb, dtype=torch.bool)).any()  # only diagonal blocks are ever added
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
    assert added.nonzero().tolist() == [[0, 2, 2], [0, 3, 3]]  # exactly the two blocks the rule added
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


# ------------------------------------------------------------------------------------------------ coverage


def fewest_by_search(mass, target):
    """The smallest number of blocks of a (nb, nb) map holding `target` of its mass, over every subset."""
    flat = mass.flatten().tolist()
    need = target * sum(flat)
    for size in range(len(flat) + 1):
        if any(sum(flat[i] for i in subset) >= need for subset in itertools.combinations(range(len(flat)), size)):
            return size
    raise AssertionError("unreachable")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.3, 0.6, 0.9, 0.99])
def test_coverage_keeps_the_fewest_blocks(seed, target):
    gen = torch.Generator().manual_seed(seed)
    mass = torch.rand(1, 3, 3, generator=gen, dtype=torch.float64) ** 3  # skewed, like attention maps
    result = coverage_layout(mass, target, 0.01, 1.0, per_head=False)
    (count,) = result.selected
    assert count == fewest_by_search(mass[0], target)
    chosen = mass.flatten().sort(descending=True).indices[:count]  # the heaviest `count` blocks
    assert bool(result.layout.flatten()[chosen].all())
    assert float(mass.flatten()[chosen].sum()) >= target * float(mass.sum())  # reached without the fix-up
    assert int(result.layout.sum()) == count + result.added
    assert bool(result.layout.any(dim=-1).all())


def test_coverage_diagonal_fix_up_is_on_top_of_the_count():
    mass = torch.zeros(1, 4, 4, dtype=torch.float64)
    mass[0, 0, 1], mass[0, 1, 0] = 10.0, 9.0  # 19 of 21
    mass[0, 2, 3], mass[0, 3, 3] = 1.0, 1.0
    result = coverage_layout(mass, 0.9, 0.01, 1.0, per_head=False)
    assert result.added == 2 and bool(result.layout[0, 2, 2]) and bool(result.layout[0, 3, 3])
    assert int(result.layout.sum()) == 2 + 2 and result.density_used == 4 / 16


def test_coverage_bounds():
    gen = torch.Generator().manual_seed(1)
    mass = torch.rand(2, 8, 8, generator=gen, dtype=torch.float64)
    capped = coverage_layout(mass, 1.0, 0.02, 0.25, per_head=True)  # full mass would need all 64
    assert capped.selected == [16, 16]
    floored = coverage_layout(mass, 0.01, 0.3, 0.5, per_head=True)  # one block would do
    assert floored.selected == [int(64 * 0.3)] * 2
    tiny = coverage_layout(mass, 0.01, 0.001, 0.5, per_head=False)  # int(64 * 0.001) = 0: still one block
    assert tiny.selected[0] == 1 and tiny.added == 7
    for result in (capped, floored, tiny):
        assert bool(result.layout.any(dim=-1).all())
        assert result.density_used == int(result.layout.sum()) / result.layout.numel()


def test_coverage_with_equal_bounds_is_the_top_k_of_the_mass():
    mass = torch.rand(3, 8, 8, dtype=torch.float64)
    for density in (0.05, 0.2, 0.5):
        for per_head in (False, True):
            result = coverage_layout(mass, 0.5, density, density, per_head)
            expected, added = topk_layout(mass if per_head else mass.sum(dim=0), density)
            assert torch.equal(result.layout, expected) and torch.equal(result.added_blocks, added)
            assert result.added == int(added.sum())


def test_coverage_target_one_stops_at_the_last_block_with_mass():
    # 14 blocks with mass whose sum in ranked order rounds below torch.sum's: the target must still be met there
    mass = torch.tensor([[[0.600666975770498, 0.149139720214304, 0.39413691214162916, 0.8634036173086611],
                          [0.11116918261510422, 0.8095259532666201, 0.7889851942984908, 0.7976543949243411],
                          [0.4067139891217675, 0.7236211067005224, 0.011814603799663703, 0.25659200749918054],
                          [0.0, 0.0, 0.4951283840625459, 0.15435919220980943]]], dtype=torch.float64)
    assert float(mass.flatten().sort(descending=True).values.cumsum(0)[-1]) < float(mass.sum())
    result = coverage_layout(mass, 1.0, 0.01, 1.0, per_head=False)
    assert result.selected == [14] and result.added == 0 and not result.layout[0, 3, :2].any()


def test_coverage_per_head_layouts_follow_each_head():
    mass = torch.full((2, 4, 4), 0.01, dtype=torch.float64)
    mass[0, :, 0] = 1.0  # head 0 looks at the first key block, head 1 along the diagonal
    mass[1] += torch.eye(4, dtype=torch.float64)
    per_head = coverage_layout(mass, 0.9, 0.01, 1.0, per_head=True)
    assert per_head.layout.shape == (2, 4, 4) and per_head.added == 0
    assert torch.equal(per_head.layout[0], torch.zeros(4, 4, dtype=torch.bool).index_fill_(1, torch.tensor(0), True))
    assert torch.equal(per_head.layout[1], torch.eye(4, dtype=torch.bool))
    assert per_head.density_used == 8 / 32 and per_head.selected == [4, 4]
    shared = coverage_layout(mass, 0.9, 0.01, 1.0, per_head=False)
    assert shared.layout.shape == (1, 4, 4)
    # the shared layout ranks the head-summed mass: column 0 and the diagonal, (0, 0) counted once
    assert torch.equal(shared.layout[0], per_head.layout[0] | per_head.layout[1])
    assert shared.density_used == 7 / 16 and shared.selected == [7]


def test_coverage_breaks_ties_in_row_major_order():
    mass = torch.ones(1, 4, 4)
    result = coverage_layout(mass, 0.5, 0.01, 1.0, per_head=False)  # 8 of 16 equal blocks: rows 0 and 1
    assert result.layout[0, :2].all() and result.added == 2
    assert torch.equal(result.layout[0, 2:], torch.eye(4, dtype=torch.bool)[2:])
    assert ranked_blocks(torch.tensor([[[1.0, 3.0], [3.0, 2.0]]])).tolist() == [[1, 2, 3, 0]]


@pytest.mark.parametrize("args,match", [
    ((0.0, 0.02, 0.5), "recall_target"),
    ((1.5, 0.02, 0.5), "recall_target"),
    ((0.9, 0.0, 0.5), "min_density"),
    ((0.9, 0.6, 0.5), "min_density"),
    ((0.9, 0.02, 1.5), "max_density"),
    ((0.9, 0.01, 0.05), "keeps no block"),  # int(16 * 0.05) = 0
])
def test_coverage_refuses_impossible_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        coverage_layout(torch.rand(2, 4, 4), *args, per_head=False)
    with pytest.raises(ValueError, match="shape"):
        coverage_layout(torch.rand(4, 4), 0.9, 0.02, 0.5, per_head=False)


def test_ranked_layout_and_fill_empty_rows():
    scores = torch.tensor([[[4.0, 3.0], [0.0, 1.0]], [[0.0, 1.0], [2.0, 0.0]]])
    layout, added = ranked_layout(scores, torch.tensor([2, 1]))
    assert layout.tolist() == [[[True, True], [False, True]], [[True, False], [True, False]]]
    assert added.nonzero().tolist() == [[0, 1, 1], [1, 0, 0]]  # map 0: row 1 gets (1, 1); map 1: row 0 gets (0, 0)
    full, none_added = fill_empty_rows(torch.ones(1, 3, 3, dtype=torch.bool))
    assert not none_added.any() and bool(full.all())


# ----------------------------------------------------------------------------------- keep_diagonal (option)


def fewest_with_diagonal_by_search(mass, target):
    """The smallest number of blocks, the nb diagonal ones included, of a (nb, nb) map holding `target` of its
    mass, over every subset of the off-diagonal blocks."""
    nb = mass.shape[-1]
    off = [float(mass[i, j]) for i in range(nb) for j in range(nb) if i != j]
    need, diagonal = target * float(mass.sum()), float(mass.diagonal().sum())
    for size in range(len(off) + 1):
        subsets = itertools.combinations(range(len(off)), size)
        if any(diagonal + sum(off[i] for i in subset) >= need for subset in subsets):
            return nb + size
    raise AssertionError("unreachable")


@pytest.mark.parametrize("nb,density", [(4, 0.5), (8, 0.25), (16, 0.1), (8, 0.05)])
@pytest.mark.parametrize("heads", [None, 3])
def test_topk_keep_diagonal_keeps_the_diagonal_within_the_count(nb, density, heads):
    gen = torch.Generator().manual_seed(nb)
    g = torch.rand((nb, nb) if heads is None else (heads, nb, nb), generator=gen)
    g = g.unsqueeze(0) if heads is None else g
    g = g.masked_fill(torch.eye(nb, dtype=torch.bool), -1.0)  # the diagonal scores lowest: kept all the same
    layout, added = topk_layout(g, density, keep_diagonal=True)
    k = max(int(nb * nb * density), nb)  # (8, 0.05): 3 blocks asked, the diagonal alone is 8
    eye = torch.eye(nb, dtype=torch.bool)
    assert not added.any() and bool(layout[:, eye].all())
    assert layout.sum(dim=(1, 2)).tolist() == [k] * g.shape[0]
    for i in range(g.shape[0]):  # the rest are the k - nb heaviest off-diagonal blocks
        off = g[i][~eye]
        kept = g[i][layout[i] & ~eye]
        assert kept.numel() == k - nb
        if k > nb:
            assert kept.min() >= off.topk(k - nb).values.min()


def test_topk_without_keep_diagonal_is_sat_rule_unchanged():
    g = torch.zeros(4, 4)
    g[0, 1] = g[0, 2] = g[0, 3] = g[1, 0] = 1.0
    assert not bool(topk_layout(g, 0.25)[0][0, 0, 0])  # SAT's rule: (0, 0) is not among the top 4
    kept, _ = topk_layout(g, 0.25, keep_diagonal=True)
    assert bool(kept[0].diagonal().all()) and int(kept.sum()) == 4  # four blocks: the diagonal alone


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [0.3, 0.6, 0.9])
def test_coverage_keep_diagonal_keeps_the_fewest_blocks_with_the_diagonal(seed, target):
    gen = torch.Generator().manual_seed(seed)
    mass = torch.rand(1, 3, 3, generator=gen, dtype=torch.float64) ** 3
    result = coverage_layout(mass, target, 0.01, 1.0, per_head=False, keep_diagonal=True)
    (count,) = result.selected
    assert count == fewest_with_diagonal_by_search(mass[0], target)
    assert bool(result.layout[0].diagonal().all()) and result.added == 0
    assert int(result.layout.sum()) == count


def test_coverage_keep_diagonal_bounds_and_per_head():
    mass = torch.zeros(2, 4, 4, dtype=torch.float64)
    mass[0, 0, 3] = 100.0  # head 0: one heavy block far from the diagonal
    mass[1, 3, 0] = 100.0
    mass += 0.01
    result = coverage_layout(mass, 0.9, 0.01, 0.25, per_head=True, keep_diagonal=True)
    # max_density 0.25 allows 4 blocks, the diagonal alone: the heavy blocks do not fit
    assert result.selected == [4, 4] and not bool(result.layout[:, 0, 3].any())
    result = coverage_layout(mass, 0.9, 0.01, 0.5, per_head=True, keep_diagonal=True)
    assert result.selected == [5, 5]
    assert bool(result.layout[0, 0, 3]) and bool(result.layout[1, 3, 0]) and not bool(result.layout[0, 3, 0])
    assert bool(result.layout[:, torch.eye(4, dtype=torch.bool)].all())
