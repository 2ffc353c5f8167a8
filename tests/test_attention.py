"""The attention module's three paths compute the same function: SDPA (unmonitored dense steps), the explicit
form of monitored steps (which also yields the monitor's map and the pattern loss), and block-sparse with a
full layout."""

import torch

from sat.models.attention import Attention


def setup():
    torch.manual_seed(0)
    attn = Attention(16, 2, 8, 64, 16, attn_dropout=0.0).eval()
    x = torch.randn(3, 64, 16)
    mask = torch.arange(64) < torch.tensor([[64], [30], [5]])
    return attn, x, mask


def test_monitored_and_unmonitored_dense_paths_agree():
    attn, x, mask = setup()
    monitored = attn(x, mask, collect=True)
    stats = attn.stats
    plain = attn(x, mask)
    torch.testing.assert_close(monitored, plain, atol=1e-5, rtol=1e-5)
    assert stats.mean_map.shape == (64, 64)
    torch.testing.assert_close(stats.mean_map.sum(-1), torch.ones(64))  # rows of probabilities
    assert stats.mean_map[:, 30:].max() < stats.mean_map[:, :5].min()  # padded keys get less mass
    stats.pattern_loss.backward()
    assert attn.pattern_weight.grad is not None and attn.pattern_weight.grad.abs().sum() > 0
    assert attn.qkv.weight.grad is None  # the pattern loss does not pull the attention towards G


def test_sparse_with_full_layout_equals_dense():
    attn, x, mask = setup()
    dense = attn(x, mask)
    attn.sparsify(1.0)
    assert attn.is_sparse and bool(attn.layout.all()) and not attn.pattern_weight.requires_grad
    torch.testing.assert_close(attn(x, mask), dense, atol=1e-5, rtol=1e-5)
