"""The block grid's shape rule, stated once: a sequence of N tokens splits into N / block_size blocks, so
block_size must divide N, and a layout is (1 or H, N / block_size, N / block_size). The config, the attention
layers, the kernels and the recall measurement all ask here. No imports: the config reads it at start-up."""

from __future__ import annotations


def block_grid_problem(seq_len: int, block_size: int) -> str:
    """Why `seq_len` tokens do not split into blocks of `block_size`, or '' when they do."""
    if block_size <= 0 or seq_len % block_size:
        return f"block_size {block_size} does not divide the padded length {seq_len}"
    return ""


def num_blocks(seq_len: int, block_size: int) -> int:
    """seq_len / block_size; ValueError when block_size does not divide seq_len."""
    problem = block_grid_problem(seq_len, block_size)
    if problem:
        raise ValueError(f"{problem}: pad the sequence to a multiple of the block or choose another block size")
    return seq_len // block_size


def layout_shape_problem(shape: tuple[int, ...], heads: int, seq_len: int, block_size: int) -> str:
    """Why a layout of `shape` does not fit `heads` heads of `seq_len` tokens in blocks of `block_size`, or ''."""
    nb = num_blocks(seq_len, block_size)
    if len(shape) != 3 or tuple(shape[1:]) != (nb, nb) or shape[0] not in (1, heads):
        return (f"layout must be (1 or {heads}, {nb}, {nb}) for N={seq_len}, block {block_size}; "
                f"got {tuple(shape)}")
    return ""
