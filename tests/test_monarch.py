"""Tests for sat.models.monarch: MonarchLinear against explicit dense oracles, to_linear, densify."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sat.models.monarch import MonarchLinear, count_parameters, densify

ATOL = 1e-5
RTOL = 1e-5

# (in_features, out_features, nblocks): in < out, in > out, in == out, not divisible, nblocks 1/2/4.
SIZES = [
    (16, 64, 4),
    (64, 16, 4),
    (32, 32, 4),
    (10, 30, 4),
    (30, 10, 4),
    (13, 13, 4),
    (3, 7, 4),
    (7, 3, 4),
    (12, 20, 1),
    (20, 12, 1),
    (18, 18, 2),
    (9, 22, 2),
    (22, 9, 2),
    (64, 256, 4),
    (256, 64, 4),
]


def _perm_matrix(rows: int, cols: int, dst_src: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """Permutation matrix P (rows, cols) with P[dst, src] = 1, so (P @ v)[dst] = v[src]."""
    p = torch.zeros(rows, cols, dtype=like.dtype, device=like.device)
    for dst, src in dst_src:
        p[dst, src] = 1.0
    return p


def explicit_dense(layer: MonarchLinear) -> torch.Tensor:
    """Build W (out, in) from block-diagonal and permutation matrices (differentiable in the blocks)."""
    b1, b2 = layer.blkdiag1, layer.blkdiag2
    k, q, p = b1.shape
    l, s, r = b2.shape
    n, m = layer.in_features_extended, layer.out_features_extended
    assert k * p == n and k * q == r * l and l * s == m
    d1 = torch.block_diag(*b1.unbind(0))  # (k*q, n): index of y1 is ki*q + qi
    # y1 viewed as (r, l) and transposed to (l, r): z[li*r + ri] = y1[ri*l + li]
    perm = _perm_matrix(l * r, k * q, [(li * r + ri, ri * l + li) for li in range(l) for ri in range(r)], b1)
    d2 = torch.block_diag(*b2.unbind(0))  # (l*s, l*r): index of y2 is li*s + si
    # output is y2 as (s, l) flattened: out[si*l + li] = y2[li*s + si]
    perm_out = _perm_matrix(m, l * s, [(si * l + li, li * s + si) for si in range(s) for li in range(l)], b1)
    w_full = perm_out @ d2 @ perm @ d1  # (m, n)
    return w_full[: layer.out_features, : layer.in_features]


def spec_forward(layer: MonarchLinear, x: torch.Tensor) -> torch.Tensor:
    """docs/monarch.md's einsum sequence, written literally; x (batch, in_features)."""
    batch = x.shape[0]
    blkdiag1, blkdiag2 = layer.blkdiag1, layer.blkdiag2
    k, q, p = blkdiag1.shape
    l, s, r = blkdiag2.shape
    x = F.pad(x, (0, layer.in_features_extended - layer.in_features))
    x1 = x.reshape(batch, k, p)
    y1 = torch.einsum("kqp,bkp->bkq", blkdiag1, x1)
    y1 = y1.reshape(batch, k * q).reshape(batch, r, l).transpose(1, 2)
    y2 = torch.einsum("lsr,blr->bsl", blkdiag2, y1)
    out = y2.reshape(batch, s * l)[:, : layer.out_features]
    if layer.bias is not None:
        out = out + layer.bias
    return out


def _grads(layer: MonarchLinear, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    params = [x, layer.blkdiag1, layer.blkdiag2] + ([layer.bias] if layer.bias is not None else [])
    return list(torch.autograd.grad(out, params, g))


@pytest.mark.parametrize("in_f,out_f,nb", SIZES)
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_forward_and_grads_match_explicit_dense(
    in_f: int, out_f: int, nb: int, lead: tuple[int, ...]
) -> None:
    torch.manual_seed(1000 * in_f + 10 * out_f + nb)
    layer = MonarchLinear(in_f, out_f, nblocks=nb)
    with torch.no_grad():  # make the bias non-trivial
        layer.bias.normal_()
    x = torch.randn(*lead, in_f, requires_grad=True)
    g = torch.randn(*lead, out_f)

    out = layer(x)
    assert out.shape == (*lead, out_f)
    got = _grads(layer, x, out, g)

    w = explicit_dense(layer)
    ref = x @ w.t() + layer.bias
    want = _grads(layer, x, ref, g)

    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("in_f,out_f,nb", SIZES)
def test_forward_follows_spec_formula(in_f: int, out_f: int, nb: int) -> None:
    torch.manual_seed(7 + in_f * out_f + nb)
    layer = MonarchLinear(in_f, out_f, nblocks=nb)
    x = torch.randn(6, in_f)
    torch.testing.assert_close(layer(x), spec_forward(layer, x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("in_f,out_f,nb", SIZES)
def test_dense_weight_and_to_linear(in_f: int, out_f: int, nb: int) -> None:
    torch.manual_seed(3 * in_f + out_f + nb)
    layer = MonarchLinear(in_f, out_f, nblocks=nb)
    w = layer.dense_weight()
    assert w.shape == (out_f, in_f)
    torch.testing.assert_close(w, explicit_dense(layer), atol=ATOL, rtol=RTOL)

    lin = layer.to_linear()
    assert isinstance(lin, nn.Linear)
    assert (lin.in_features, lin.out_features) == (in_f, out_f)
    torch.testing.assert_close(lin.bias, layer.bias)
    x = torch.randn(2, 4, in_f)
    torch.testing.assert_close(lin(x), layer(x), atol=ATOL, rtol=RTOL)


def test_no_bias() -> None:
    torch.manual_seed(0)
    layer = MonarchLinear(10, 30, nblocks=4, bias=False)
    assert layer.bias is None
    assert set(layer.state_dict()) == {"blkdiag1", "blkdiag2"}
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), x @ explicit_dense(layer).t(), atol=ATOL, rtol=RTOL)
    lin = layer.to_linear()
    assert lin.bias is None
    torch.testing.assert_close(lin(x), layer(x), atol=ATOL, rtol=RTOL)


def test_to_linear_keeps_dtype_and_is_detached() -> None:
    torch.manual_seed(0)
    layer = MonarchLinear(12, 20, nblocks=4, dtype=torch.float64)
    lin = layer.to_linear()
    assert lin.weight.dtype == torch.float64 and lin.weight.device == layer.blkdiag1.device
    assert lin.weight.grad_fn is None and lin.weight.is_leaf and lin.weight.requires_grad
    # The new parameters are independent copies.
    with torch.no_grad():
        lin.bias.add_(1.0)
    assert not torch.allclose(lin.bias, layer.bias)


@pytest.mark.parametrize(
    "in_f,out_f,nb,shape1,shape2",
    [
        (64, 256, 4, (4, 16, 16), (4, 64, 16)),
        (256, 64, 4, (4, 16, 64), (4, 16, 16)),
        (256, 256, 4, (4, 64, 64), (4, 64, 64)),
        (10, 30, 4, (4, 3, 3), (4, 8, 3)),  # padded to 12 -> 32
        (30, 10, 4, (4, 3, 8), (4, 3, 3)),  # padded to 32 -> 12
    ],
)
def test_state_dict_layout_loads(in_f: int, out_f: int, nb: int, shape1: tuple, shape2: tuple) -> None:
    layer = MonarchLinear(in_f, out_f, nblocks=nb)
    assert tuple(layer.blkdiag1.shape) == shape1
    assert tuple(layer.blkdiag2.shape) == shape2
    g = torch.Generator().manual_seed(42)
    sd = {
        "blkdiag1": torch.randn(shape1, generator=g),
        "blkdiag2": torch.randn(shape2, generator=g),
        "bias": torch.randn(out_f, generator=g),
    }
    layer.load_state_dict(sd, strict=True)
    for key, value in sd.items():
        torch.testing.assert_close(getattr(layer, key).detach(), value)
    x = torch.randn(3, in_f, generator=g)
    torch.testing.assert_close(layer(x), spec_forward(layer, x), atol=1e-4, rtol=1e-5)


def test_parameter_count_smaller_than_dense() -> None:
    monarch = MonarchLinear(256, 256, nblocks=4)
    dense = nn.Linear(256, 256)
    assert count_parameters(monarch) == 2 * 4 * 64 * 64 + 256
    assert count_parameters(monarch) < count_parameters(dense)
    assert count_parameters(monarch.to_linear()) == count_parameters(dense)


def test_init_bounds() -> None:
    torch.manual_seed(0)
    layer = MonarchLinear(256, 64, nblocks=4)  # blkdiag1 (4, 16, 64), blkdiag2 (4, 16, 16)
    assert layer.blkdiag1.abs().max() <= 1 / 64**0.5
    assert layer.blkdiag2.abs().max() <= 1 / 16**0.5
    assert layer.bias.abs().max() <= 1 / 256**0.5
    assert layer.blkdiag1.std() > 0.5 / 64**0.5  # not degenerate


class _Block(nn.Module):
    def __init__(self, dim: int, hidden: int, nb: int) -> None:
        super().__init__()
        self.fc1 = MonarchLinear(dim, hidden, nb)
        self.act = nn.GELU()
        self.fc2 = MonarchLinear(hidden, dim, nb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 20)
        self.blocks = nn.ModuleList([_Block(20, 52, 4), _Block(20, 30, 2)])
        self.head = nn.Sequential(nn.LayerNorm(20), MonarchLinear(20, 7, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def test_densify_nested_module() -> None:
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(3, 5, 12)
    before = net(x)
    names = densify(net)
    assert names == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head.1"]
    assert not any(isinstance(m, MonarchLinear) for m in net.modules())
    for name in names:
        assert type(net.get_submodule(name)) is nn.Linear
    torch.testing.assert_close(net(x), before, atol=ATOL, rtol=RTOL)
    assert densify(net) == []  # idempotent


def test_densify_sequential_and_shared() -> None:
    torch.manual_seed(1)
    shared = MonarchLinear(16, 16, 4)
    seq = nn.Sequential(MonarchLinear(8, 16, 4), nn.ReLU(), shared, nn.Tanh(), shared)
    x = torch.randn(4, 8)
    before = seq(x)
    names = densify(seq)
    assert names == ["0", "2", "4"]
    assert isinstance(seq[0], nn.Linear) and seq[2] is seq[4]  # sharing preserved
    torch.testing.assert_close(seq(x), before, atol=ATOL, rtol=RTOL)


def test_densify_then_train_step_runs() -> None:
    torch.manual_seed(2)
    net = _Net()
    densify(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.randn(2, 12)).square().mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in net.parameters())


def test_densify_rejects_bare_monarch() -> None:
    with pytest.raises(TypeError):
        densify(MonarchLinear(8, 8))


def test_bad_input_shape() -> None:
    with pytest.raises(ValueError):
        MonarchLinear(8, 8)(torch.randn(2, 9))


def test_empty_batch() -> None:
    layer = MonarchLinear(10, 6, 4)
    assert layer(torch.randn(0, 10)).shape == (0, 6)
