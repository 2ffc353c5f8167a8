"""Monarch linear layers and their densification (docs/monarch.md).

A Monarch matrix is the product of two block-diagonal matrices with a fixed permutation between
them. ``MonarchLinear`` stores the two block-diagonal factors as ``blkdiag1`` (k, q, p) and
``blkdiag2`` (l, s, r) with the layout of the public Monarch implementation, so its state dicts
load unchanged. ``densify`` swaps every Monarch layer of a model for an ``nn.Linear`` holding the
equivalent dense weight (the S2D "sparse to dense" step).

Initialisation (our choice, documented here): every block is initialised like an ``nn.Linear`` of
that block's size, i.e. uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` with ``fan_in`` the block's
input width (``p`` for ``blkdiag1``, ``r`` for ``blkdiag2``); this is what ``kaiming_uniform_(a=sqrt(5))``
gives for a block. The bias is uniform in ``[-1/sqrt(in_features), 1/sqrt(in_features)]`` as in
``nn.Linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MonarchLinear", "count_parameters", "densify"]


def _round_up(x: int, multiple: int) -> int:
    return ((x + multiple - 1) // multiple) * multiple


class MonarchLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear(in_features, out_features)`` with a Monarch weight.

    Sizes are padded up to multiples of ``nblocks``: the input is zero-padded, the output trimmed.
    With n, m the padded input/output sizes and nb = ``nblocks``:
    if n < m: ``blkdiag1`` (nb, n/nb, n/nb), ``blkdiag2`` (nb, m/nb, n/nb);
    else:     ``blkdiag1`` (nb, m/nb, n/nb), ``blkdiag2`` (nb, m/nb, m/nb).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        if nblocks <= 0:
            raise ValueError(f"nblocks must be positive, got {nblocks}")
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        n = _round_up(in_features, nblocks)
        m = _round_up(out_features, nblocks)
        self.in_features_extended = n
        self.out_features_extended = m
        factory = {"device": device, "dtype": dtype}
        if n < m:
            shape1 = (nblocks, n // nblocks, n // nblocks)
            shape2 = (nblocks, m // nblocks, n // nblocks)
        else:
            shape1 = (nblocks, m // nblocks, n // nblocks)
            shape2 = (nblocks, m // nblocks, m // nblocks)
        self.blkdiag1 = nn.Parameter(torch.empty(shape1, **factory))  # (k, q, p)
        self.blkdiag2 = nn.Parameter(torch.empty(shape2, **factory))  # (l, s, r)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each block uniform like an ``nn.Linear`` of the block's size; bias like ``nn.Linear``."""
        for blkdiag in (self.blkdiag1, self.blkdiag2):
            fan_in = blkdiag.shape[-1]  # p for blkdiag1, r for blkdiag2
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(blkdiag, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _monarch(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the Monarch map (no bias) to x (b, in_features) -> (b, out_features)."""
        b = x.shape[0]
        k, q, p = self.blkdiag1.shape
        l, s, r = self.blkdiag2.shape
        n = self.in_features_extended
        if n != self.in_features:
            x = F.pad(x, (0, n - self.in_features))  # (b, n), zero-padded
        x1 = x.reshape(b, k, p).transpose(0, 1)  # (k, b, p)
        y1 = torch.bmm(x1, self.blkdiag1.transpose(1, 2))  # (k, b, q) == einsum('kqp,bkp->bkq') transposed
        y1 = y1.transpose(0, 1).reshape(b, r, l)  # (b, k*q) viewed as (b, r, l): the Monarch permutation
        y1 = y1.permute(2, 0, 1)  # (l, b, r)
        y2 = torch.bmm(y1, self.blkdiag2.transpose(1, 2))  # (l, b, s) == einsum('lsr,blr->bsl') permuted
        out = y2.permute(1, 2, 0).reshape(b, s * l)  # (b, s, l) -> (b, m)
        return out[:, : self.out_features]  # (b, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        out = self._monarch(x.reshape(-1, self.in_features))  # (B, out_features)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The dense W (out_features, in_features) with ``forward(x) == x @ W.T + bias``.

        Computed by pushing the identity through the map; differentiable w.r.t. the blocks.
        """
        eye = torch.eye(self.in_features, device=self.blkdiag1.device, dtype=self.blkdiag1.dtype)
        return self._monarch(eye).t()  # rows of eye -> (in, out); transpose -> (out, in)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` (same device/dtype, same training mode) computing the same function."""
        w = self.dense_weight()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        linear.weight.copy_(w)
        linear.weight.requires_grad_(self.blkdiag1.requires_grad)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
            linear.bias.requires_grad_(self.bias.requires_grad)
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nblocks={self.nblocks}, bias={self.bias is not None}"
        )


def densify(model: nn.Module) -> list[str]:
    """Replace every ``MonarchLinear`` inside ``model`` in place by its ``.to_linear()``.

    Returns the qualified names of the replaced modules (in ``named_modules`` order). A Monarch layer
    registered under several names is replaced by one shared ``nn.Linear``. The model itself cannot be
    replaced in place; pass its parent instead.
    """
    if isinstance(model, MonarchLinear):
        raise TypeError("densify replaces submodules in place; call .to_linear() on a bare MonarchLinear")
    found = [
        (name, mod)
        for name, mod in model.named_modules(remove_duplicate=False)
        if isinstance(mod, MonarchLinear)
    ]
    replacements: dict[int, nn.Linear] = {}
    for name, mod in found:
        if id(mod) not in replacements:
            replacements[id(mod)] = mod.to_linear()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, replacements[id(mod)])
    return [name for name, _ in found]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
