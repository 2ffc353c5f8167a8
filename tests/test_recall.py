import json
import math

import pytest
import torch
import torch.nn as nn

from sat.kernels.dense import dense_attention
from sat.models.attention import Attention
from sat.sparsity.pattern import ranked_layout, topk_layout
from sat.sparsity.recall import (
    block_mass,
    density_for_recall,
    layout_recall,
    measure_block_mass,
    recall_by_blocks,
    recall_curve,
    recall_summary,
)


def random_probs(B, H, N, mask=None):
    scores = torch.randn(B, H, N, N, dtype=torch.float64)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def brute_force_mass(probs, mask, bs):
    """Explicit loops over batch, head, query row and key."""
    B, H, N, _ = probs.shape
    nb = N // bs
    out = [[[0.0] * nb for _ in range(nb)] for _ in range(H)]
    for b in range(B):
        for h in range(H):
            for i in range(N):
                for j in range(N):
                    if mask is None or (mask[b, i] and mask[b, j]):
                        out[h][i // bs][j // bs] += float(probs[b, h, i, j])
    return torch.tensor(out, dtype=torch.float64)


def suffix_mask(lengths, N):
    return torch.arange(N).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # (B, N)


@pytest.mark.parametrize("bs", [2, 4])
def test_block_mass_matches_brute_force_with_padding(bs):
    mask = suffix_mask([8, 5, 3], 8)
    mask[0, 2] = False  # a hole inside the sequence, not only a padded tail
    probs = random_probs(3, 2, 8, mask)
    probs[1, :, 6, :] = float("nan")  # whatever padded rows hold is left out
    mass = block_mass(probs, mask, bs)
    assert mass.dtype == torch.float64 and mass.shape == (2, 8 // bs, 8 // bs)
    torch.testing.assert_close(mass, brute_force_mass(probs, mask, bs), rtol=1e-12, atol=1e-12)
    # every real row holds mass 1: the total per head is the number of real rows
    torch.testing.assert_close(mass.sum(dim=(1, 2)), torch.full((2,), float(mask.sum()), dtype=torch.float64))


def test_block_mass_leaves_out_padded_keys_even_when_they_hold_mass():
    probs = torch.full((1, 1, 4, 4), 0.25)  # uniform rows that (wrongly) spread mass over padded keys too
    mask = torch.tensor([[1, 1, 1, 0]])  # an integer mask: nonzero = real
    mass = block_mass(probs, mask, 2)
    torch.testing.assert_close(mass, brute_force_mass(probs, mask.bool(), 2))
    assert float(mass.sum()) == pytest.approx(3 * 0.75)


def test_block_mass_without_mask_and_float32_input():
    probs = random_probs(2, 3, 8).float()
    mass = block_mass(probs, None, 4)
    assert mass.dtype == torch.float64
    torch.testing.assert_close(mass, brute_force_mass(probs.double(), None, 4), rtol=1e-12, atol=1e-12)


def test_block_mass_accumulates_over_batches():
    mask = suffix_mask([8, 6, 8, 2], 8)
    probs = random_probs(4, 2, 8, mask)
    whole = block_mass(probs, mask, 2)
    parts = block_mass(probs[:1], mask[:1], 2) + block_mass(probs[1:], mask[1:], 2)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


def test_block_mass_refuses_bad_shapes():
    with pytest.raises(ValueError, match="does not divide"):
        block_mass(torch.rand(1, 1, 6, 6), None, 4)
    with pytest.raises(ValueError, match=r"\(B, H, N, N\)"):
        block_mass(torch.rand(1, 1, 4, 8), None, 4)


def brute_force_recall(mass, layout):
    H, nb, _ = mass.shape
    per_head = []
    for h in range(H):
        lay = layout[0] if layout.shape[0] == 1 else layout[h]
        inside = sum(float(mass[h, i, j]) for i in range(nb) for j in range(nb) if lay[i, j])
        per_head.append(inside / float(mass[h].sum()))
    return per_head


@pytest.mark.parametrize("layout_heads", [1, 3])
def test_layout_recall_matches_brute_force(layout_heads):
    mass = block_mass(random_probs(2, 3, 16), None, 4)
    layout = torch.rand(layout_heads, 4, 4) < 0.4
    heads, layer = layout_recall(mass, layout)
    assert heads == pytest.approx(brute_force_recall(mass, layout), abs=1e-12)
    inside = sum(r * float(mass[h].sum()) for h, r in enumerate(heads))
    assert layer == pytest.approx(inside / float(mass.sum()), abs=1e-12)


def test_full_layout_has_recall_one_and_empty_layout_zero():
    mask = suffix_mask([16, 11], 16)
    mass = block_mass(random_probs(2, 2, 16, mask), mask, 4)
    heads, layer = layout_recall(mass, torch.ones(1, 4, 4, dtype=torch.bool))
    assert heads == pytest.approx([1.0, 1.0], abs=1e-12) and layer == pytest.approx(1.0, abs=1e-12)
    heads, layer = layout_recall(mass, torch.zeros(2, 4, 4, dtype=torch.bool))
    assert heads == [0.0, 0.0] and layer == 0.0


def test_layout_recall_of_a_head_without_mass_is_nan():
    mass = torch.zeros(2, 2, 2, dtype=torch.float64)
    mass[0, 0, 0] = 1.0
    heads, layer = layout_recall(mass, torch.eye(2, dtype=torch.bool).unsqueeze(0))
    assert heads[0] == 1.0 and math.isnan(heads[1]) and layer == 1.0
    heads, layer = layout_recall(torch.zeros(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool))
    assert math.isnan(heads[0]) and math.isnan(layer)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("nb", [3, 5])
def test_recall_by_blocks_matches_explicit_layouts(per_head, nb):
    """Against building the top-k + diagonal layout for every k and measuring it."""
    mass = block_mass(random_probs(2, 3, 2 * nb), None, 2)
    curve = recall_by_blocks(mass, per_head)
    scores = mass if per_head else mass.sum(dim=0, keepdim=True)
    for k in range(1, nb * nb + 1):
        layout, _ = ranked_layout(scores, torch.full((scores.shape[0],), k))
        assert float(curve[k - 1]) == pytest.approx(layout_recall(mass, layout)[1], abs=1e-12), k
    assert float(curve[-1]) == 1.0


def test_recall_by_blocks_counts_the_diagonal_blocks_of_empty_rows():
    mass = torch.zeros(1, 3, 3, dtype=torch.float64)
    mass[0, 0] = torch.tensor([5.0, 4.0, 0.0])
    mass[0, 1, 1], mass[0, 2, 0], mass[0, 2, 2] = 2.0, 3.0, 1.0  # total 15
    curve = recall_by_blocks(mass, per_head=False).tolist()
    # k=1: {(0,0)} + diagonals (1,1), (2,2); k=2: (0,1) too; k=3: (2,0) replaces (2,2); k=4: (1,1) ranked
    assert curve[:4] == pytest.approx([8 / 15, 12 / 15, 14 / 15, 14 / 15])
    assert curve[4:] == pytest.approx([1.0] * 5)


@pytest.mark.parametrize("per_head", [False, True])
def test_recall_curve_monotone_and_read_off(per_head):
    mask = suffix_mask([32, 20], 32)
    mass = block_mass(random_probs(2, 2, 32, mask), mask, 4)  # 8 x 8 blocks
    densities = [0.01, 0.015, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
    curve = recall_curve(mass, densities, per_head)
    assert math.isnan(curve[0]) and math.isnan(curve[1])  # int(64 * d) < 1
    assert all(b >= a - 1e-12 for a, b in zip(curve[2:-1], curve[3:], strict=True))  # monotone up to rounding
    assert curve[-1] == 1.0
    by_blocks = recall_by_blocks(mass, per_head).tolist()
    assert all(b >= a - 1e-12 for a, b in zip(by_blocks[:-1], by_blocks[1:], strict=True))
    assert curve[4] == by_blocks[int(64 * 0.2) - 1]
    targets = [0.5, 0.9, 0.99, 1.0]
    for target, density in zip(targets, density_for_recall(mass, targets, per_head), strict=True):
        k = round(density * 64)
        assert by_blocks[k - 1] >= target and (k == 1 or by_blocks[k - 2] < target)


def test_recall_by_blocks_ranks_like_the_top_k_rule():
    mass = block_mass(random_probs(3, 2, 32), None, 4)
    for density in (0.05, 0.25, 0.5):
        layout, _ = topk_layout(mass.sum(dim=0), density)
        assert recall_curve(mass, [density])[0] == pytest.approx(layout_recall(mass, layout)[1], abs=1e-12)


def test_no_mass_reads_off_nothing():
    mass = torch.zeros(2, 3, 3)
    assert density_for_recall(mass, [0.9]) == [None]
    assert all(math.isnan(r) for r in recall_curve(mass, [0.5]))


def test_recall_summary_is_json_ready():
    mass = block_mass(random_probs(2, 2, 16), None, 4)
    layout, _ = topk_layout(mass.sum(dim=0), 0.25)
    summary = recall_summary(mass, layout, per_head=False, densities=(0.05, 0.25), targets=(0.9,))
    json.dumps(summary, allow_nan=False)
    assert summary["recall"] == pytest.approx(layout_recall(mass, layout)[1])
    assert summary["curve"]["0.05"] is None and summary["curve"]["0.25"] == pytest.approx(summary["recall"])
    assert len(summary["recall_per_head"]) == 2
    assert summary["density_for_recall"]["0.9"] == density_for_recall(mass, [0.9])[0]


# ------------------------------------------------------------------------------------ measuring a model


class TwoLayers(nn.Module):
    """Two attention layers with dropout around them: a model that would draw random numbers in training."""

    def __init__(self, seq_len=16, block_size=4):
        super().__init__()
        self.layers = nn.ModuleList(Attention(8, 2, 4, seq_len, block_size, attn_dropout=0.5) for _ in range(2))
        self.drop = nn.Dropout(0.5)

    def forward(self, x, mask):
        for i, layer in enumerate(self.layers):
            x = self.drop(x + layer(x, mask) if i == 0 else x + layer(x, key_padding_mask=mask))
        return x


def reference_masses(model, batches):
    """Each layer's probabilities written out, layer inputs taken from an eval-mode forward pass."""
    out = [torch.zeros(2, 4, 4, dtype=torch.float64) for _ in model.layers]
    for x, mask in batches:
        for i, layer in enumerate(model.layers):
            B, N, _ = x.shape
            q, k, _ = layer.qkv(x).view(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
            s = (q @ k.transpose(-2, -1) / 2.0).masked_fill(~mask[:, None, None, :], float("-inf"))
            out[i] += brute_force_mass(torch.softmax(s, dim=-1), mask, 4)
            x = x + layer(x, mask)
    return out


def test_measure_block_mass_matches_reference_and_draws_no_random_numbers():
    model = TwoLayers().train()
    batches = [(torch.randn(3, 16, 8), suffix_mask([16, 9, 4], 16)), (torch.randn(2, 16, 8), suffix_mask([5, 16], 16))]
    rng = torch.get_rng_state()
    masses = measure_block_mass(model, batches, lambda b: model(*b))
    assert torch.equal(torch.get_rng_state(), rng)  # the training trajectory's generator is untouched
    assert model.training and all(layer.training for layer in model.layers)  # the mode is restored
    assert all(not layer._forward_hooks for layer in model.layers)  # the hooks are gone
    with torch.no_grad():
        expected = reference_masses(model.eval(), batches)
    for got, want in zip(masses, expected, strict=True):
        assert got.shape == (2, 4, 4) and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float(masses[0].sum()) == pytest.approx(2 * (16 + 9 + 4 + 5 + 16), rel=1e-6)  # heads x real rows


def test_measured_mass_agrees_with_the_fused_dense_attention_block_means():
    """Without padding, batch-summed block means x bs^2 (what the fused dense attention returns) are the mass."""
    attn = Attention(8, 2, 4, 16, 4, attn_dropout=0.0).eval()
    x = torch.randn(3, 16, 8)
    (mass,) = measure_block_mass(attn, [x], lambda b: attn(b))
    q, k, v = attn.qkv(x).view(3, 16, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
    _, _, pooled = dense_attention(q, k, v, None, 0.0, 4, True)
    torch.testing.assert_close(mass, pooled.sum(dim=0).double() * 16, rtol=1e-5, atol=1e-5)


def test_measure_block_mass_refuses_sparse_layers_and_no_batches():
    attn = Attention(8, 2, 4, 16, 4).eval()
    with pytest.raises(ValueError, match="at least one"):
        measure_block_mass(attn, [], lambda b: attn(b))
    attn.sparsify(0.5)
    with pytest.raises(ValueError, match="before the switch"):
        measure_block_mass(attn, [torch.randn(1, 16, 8)], lambda b: attn(b))
    assert not attn._forward_hooks and attn.training is False
