"""Attention kernels: one entry point for block-sparse attention, several interchangeable backends.

    block_sparse_attention(q, k, v, layout, block_size, key_padding_mask=None, backend="auto")

Backends: "reference" (dense math with a mask, for tests), "torch" (computes only the active blocks, any
device), "triton" (fused GPU kernel). "auto" picks "triton" on CUDA tensors when Triton is importable,
otherwise "torch".
"""

from __future__ import annotations

import os

import torch

from sat.kernels.reference import reference_attention

BACKENDS = ("auto", "triton", "torch", "reference")


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_layout(q: torch.Tensor, layout: torch.Tensor, block_size: int) -> None:
    """Raise ValueError with a clear message when shapes do not fit together."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, N, D), got shape {tuple(q.shape)}")
    B, H, N, D = q.shape
    if block_size <= 0 or N % block_size != 0:
        raise ValueError(f"sequence length {N} is not a multiple of block_size {block_size}: pad it first")
    nb = N // block_size
    if layout.dim() != 3 or layout.shape[1:] != (nb, nb) or layout.shape[0] not in (1, H):
        raise ValueError(f"layout must be (1 or {H}, {nb}, {nb}) for N={N}, block {block_size}; "
                         f"got {tuple(layout.shape)}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v restricted to the active blocks of `layout` (SPEC.md section 4).

    q, k, v: (B, H, N, D); layout: bool (H or 1, N/bs, N/bs); key_padding_mask: (B, N), 1 keep / 0 pad.
    Differentiable in q, k, v. Rows with no allowed key give zeros.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_layout(q, layout, block_size)
    layout = layout.to(device=q.device, dtype=torch.bool)
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" and _triton_usable(q.device) else "torch"
    if backend == "reference":
        return reference_attention(q, k, v, layout, block_size, key_padding_mask)
    if backend == "torch":
        from sat.kernels.blocksparse_torch import torch_block_sparse_attention

        return torch_block_sparse_attention(q, k, v, layout, block_size, key_padding_mask)
    if not _triton_usable(q.device):
        raise RuntimeError("backend 'triton' needs a CUDA GPU with Triton installed (or TRITON_INTERPRET=1 "
                           "for the CPU interpreter); use --backend torch on this machine")
    from sat.kernels.blocksparse_triton import triton_block_sparse_attention

    return triton_block_sparse_attention(q, k, v, layout, block_size, key_padding_mask)


__all__ = ["block_sparse_attention", "reference_attention", "check_layout", "BACKENDS"]
