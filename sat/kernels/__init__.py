"""Attention kernels: one entry point for block-sparse attention, several interchangeable backends.

    block_sparse_attention(q, k, v, layout, block_size, key_padding_mask=None, backend="auto")

Backends: "reference" (dense math with a mask, for tests), "torch" (computes only the active blocks, any
device), "triton" (fused GPU kernel). "auto" picks "triton" on CUDA tensors when Triton is installed and
supports the shape (dtype, block size, head dim, batch), otherwise "torch", saying why once in the log
(`check_backend`, docs/gpu.md).
"""

from __future__ import annotations

import torch

from sat.kernels.reference import reference_attention
from sat.kernels.triton_support import BACKENDS, check_backend, check_layout, fp32_matmul_precision


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v restricted to the active blocks of `layout` (docs/block-sparse.md).

    q, k, v: (B, H, N, D); layout: bool (H or 1, N/bs, N/bs); key_padding_mask: (B, N), 1 keep / 0 pad.
    Differentiable in q, k, v. Rows with no allowed key give zeros.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("auto", "triton"):
        if q.dim() == 4:  # else check_layout below says what is wrong
            B, H, _, D = q.shape
            backend = check_backend(backend, q.dtype, block_size, D, B, q.device, heads=H)
    if backend != "triton":  # the Triton entry checks its inputs, the layout among them
        check_layout(q, layout, block_size)
    layout = layout.to(device=q.device, dtype=torch.bool)
    if backend == "reference":
        return reference_attention(q, k, v, layout, block_size, key_padding_mask)
    if backend == "torch":
        from sat.kernels.blocksparse_torch import torch_block_sparse_attention

        return torch_block_sparse_attention(q, k, v, layout, block_size, key_padding_mask)
    from sat.kernels.blocksparse_triton import triton_block_sparse_attention

    return triton_block_sparse_attention(q, k, v, layout, block_size, key_padding_mask)


__all__ = ["block_sparse_attention", "reference_attention", "check_layout", "check_backend",
           "fp32_matmul_precision", "BACKENDS"]
