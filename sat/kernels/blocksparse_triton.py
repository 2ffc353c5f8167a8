"""Fused block-sparse attention in Triton (SPEC.md section 4), FlashAttention-2 style.

Forward: one program per (query tile, head, batch row) walks the active key blocks of its query-block row
through a lookup table, keeps an online softmax in base 2 (running max, running sum) and saves the
log-sum-exp. Backward recomputes the probabilities from that log-sum-exp instead of storing them: a pre-pass
computes delta = rowsum(O * dO); one kernel per key tile walks the active query blocks of its key-block
column (the transposed table) to accumulate dK and dV; one kernel per query tile walks the active key blocks
again to accumulate dQ. `_BlockSparseAttention` wraps the four kernels; reference.py is the ground truth.

Shapes reach the kernels as runtime arguments and strides; only tile sizes, the head dimension, the dtype
and whether there is a padding mask are compile-time constants.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sat.kernels import check_layout

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535  # CUDA limit on the second and third grid dimensions (heads, batch)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, lut_row, n_iters,
                    stride_kn, stride_vn, stride_kpmn, qk_scale,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over the active key tiles of one query tile; scores are in log2 units."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # head dims that are not a power of two are padded with zeros
    for j in range(0, n_iters):
        # tile j is sub-tile (j % SUB) of the (j // SUB)-th active key block, SUB = BLOCK_SIZE // BLOCK_N
        kb = tl.load(lut_row + j // (BLOCK_SIZE // BLOCK_N))
        offs_n = kb * BLOCK_SIZE + (j % (BLOCK_SIZE // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        qk = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        if HAS_PAD:
            keep = tl.load(kpm_base + offs_n * stride_kpmn)  # (BLOCK_N,)
            qk = tl.where(keep[None, :] != 0, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no allowed key so far
        p = tl.exp2(qk - m_safe[:, None])  # (BLOCK_M, BLOCK_N), 0 at masked keys
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KPM, LUT_CNT, LUT_IDX,
              stride_qb, stride_qh, stride_qn,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_on,
              stride_kpmb, stride_kpmn,
              lut_per_head, H, N, NB, qk_scale,
              BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """O and the base-2 log-sum-exp of one (query tile, head, batch row)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lut_r = (h * lut_per_head) * NB + pid_m * BLOCK_M // BLOCK_SIZE  # row of the lookup table
    n_iters = tl.load(LUT_CNT + lut_r) * (BLOCK_SIZE // BLOCK_N)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
        KPM + b * stride_kpmb, LUT_IDX + lut_r.to(tl.int64) * NB, n_iters,
        stride_kn, stride_vn, stride_kpmn, qk_scale,
        BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, HAS_PAD, DOT_PREC)

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows with no allowed key stay 0
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))  # +inf makes their backward p = 0
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=d_ok[None, :])
    tl.store(LSE + (b * H + h) * N + offs_m, lse)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_ob, stride_oh, stride_on,
                         stride_dob, stride_doh, stride_don,
                         H, N,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(O * dO), the softmax-backward correction term, in fp32."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=d_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=d_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + (b * H + h) * N + offs_m, delta)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, KPM, LUT_CNT, LUT_IDX,
                   stride_qb, stride_qh, stride_qn,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_don,
                   stride_dkb, stride_dkh, stride_dkn,
                   stride_kpmb, stride_kpmn,
                   lut_per_head, H, N, NB, sm_scale, qk_scale,
                   BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """dK and dV of one key tile, walking the active query blocks of its key-block column.

    dK and dV share one layout of strides (both are allocated by the wrapper).
    """
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lut_r = (h * lut_per_head) * NB + pid_n * BLOCK_N // BLOCK_SIZE  # key-block column, transposed table
    n_iters = tl.load(LUT_CNT + lut_r) * (BLOCK_SIZE // BLOCK_M)
    lut_row = LUT_IDX + lut_r.to(tl.int64) * NB

    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    if HAS_PAD:
        keep = tl.load(KPM + b * stride_kpmb + offs_n * stride_kpmn) != 0  # (BLOCK_N,)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = (b * H + h) * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_iters):
        qb = tl.load(lut_row + j // (BLOCK_SIZE // BLOCK_M))
        offs_m = qb * BLOCK_SIZE + (j % (BLOCK_SIZE // BLOCK_M)) * BLOCK_M + tl.arange(0, BLOCK_M)
        qT = tl.load(q_base + offs_m[None, :] * stride_qn + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_M)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :],
                     mask=d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(LSE + row_base + offs_m)  # (BLOCK_M,)
        delta = tl.load(DELTA + row_base + offs_m)  # (BLOCK_M,)
        qkT = tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        if HAS_PAD:
            qkT = tl.where(keep[:, None], qkT, float("-inf"))
        pT = tl.exp2(qkT - lse[None, :])  # P^T, exact probabilities
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
    dk *= sm_scale
    out_offs = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=d_ok[None, :])
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=d_ok[None, :])


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, KPM, LUT_CNT, LUT_IDX,
                 stride_qb, stride_qh, stride_qn,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_don,
                 stride_dqb, stride_dqh, stride_dqn,
                 stride_kpmb, stride_kpmn,
                 lut_per_head, H, N, NB, sm_scale, qk_scale,
                 BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """dQ of one query tile, walking the active key blocks of its query-block row."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lut_r = (h * lut_per_head) * NB + pid_m * BLOCK_M // BLOCK_SIZE
    n_iters = tl.load(LUT_CNT + lut_r) * (BLOCK_SIZE // BLOCK_N)
    lut_row = LUT_IDX + lut_r.to(tl.int64) * NB

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(LSE + (b * H + h) * N + offs_m)
    delta = tl.load(DELTA + (b * H + h) * N + offs_m)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_base = KPM + b * stride_kpmb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_iters):
        kb = tl.load(lut_row + j // (BLOCK_SIZE // BLOCK_N))
        offs_n = kb * BLOCK_SIZE + (j % (BLOCK_SIZE // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        vT = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        if HAS_PAD:
            keep = tl.load(kpm_base + offs_n * stride_kpmn)
            qk = tl.where(keep[None, :] != 0, qk, float("-inf"))
        p = tl.exp2(qk - lse[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=d_ok[None, :])


# ----------------------------------------------------------------------------------------- lookup tables


@dataclass(frozen=True)
class LookupTables:
    """Active blocks per layout row, built once per layout.

    fwd_cnt (Hl, nb) int32: active key blocks of each query-block row; fwd_idx (Hl, nb, nb) int32: their
    indices, ascending, in the first fwd_cnt entries. bwd_cnt / bwd_idx: the same for the transposed layout
    (active query blocks of each key-block column). Hl is 1 for a layout shared by all heads.
    """

    fwd_cnt: torch.Tensor
    fwd_idx: torch.Tensor
    bwd_cnt: torch.Tensor
    bwd_idx: torch.Tensor


def _active_blocks(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hl, nb, nb) bool -> counts (Hl, nb) and active column indices first (Hl, nb, nb); no host sync."""
    cnt = layout.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return cnt.contiguous(), idx.contiguous()


def build_lookup_tables(layout: torch.Tensor) -> LookupTables:
    """Lookup tables of a bool layout (Hl, nb, nb) on its own device."""
    layout = layout.bool()
    fwd_cnt, fwd_idx = _active_blocks(layout)
    bwd_cnt, bwd_idx = _active_blocks(layout.transpose(-2, -1))
    return LookupTables(fwd_cnt, fwd_idx, bwd_cnt, bwd_idx)


# id(layout) -> (weak reference to the layout, its version counter, tables). The weak reference makes a
# reused id harmless and drops the entry with the layout; the version counter catches in-place edits.
_LUT_CACHE: dict[int, tuple[weakref.ref, int, LookupTables]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _LUT_CACHE.get(key)
    if entry is not None and entry[0] is ref:
        del _LUT_CACHE[key]


def lookup_tables(layout: torch.Tensor) -> LookupTables:
    """Cached `build_lookup_tables`: rebuilt only for a new layout tensor or after an in-place change."""
    try:
        version = layout._version
    except RuntimeError:  # inference tensors have no version counter: do not cache them
        return build_lookup_tables(layout)
    key = id(layout)
    entry = _LUT_CACHE.get(key)
    if entry is not None and entry[0]() is layout and entry[1] == version:
        return entry[2]
    tables = build_lookup_tables(layout)
    ref = weakref.ref(layout, lambda r, key=key: _forget(key, r))
    _LUT_CACHE[key] = (ref, version, tables)
    return tables


# ---------------------------------------------------------------------------------------------- launching


@dataclass(frozen=True)
class _LaunchConfig:
    block_size: int
    block_m: int
    block_n: int
    block_d: int
    head_dim: int
    dot_prec: str
    num_warps: int
    num_stages: int


def _launch_config(block_size: int, head_dim: int, dtype: torch.dtype) -> _LaunchConfig:
    """Tiles of at most 64 x 64 (a 128 block is walked as 2 x 2 tiles); fp32 inputs use exact fp32 dots and
    at most 32 x 32 tiles, which keeps their shared memory under 100 KB."""
    tile = min(block_size, 32 if dtype == torch.float32 else 64)
    block_d = max(16, triton.next_power_of_2(head_dim))
    big = tile * block_d >= 64 * 128
    num_warps = 8 if big else (4 if tile >= 32 else 2)
    num_stages = 2 if (dtype == torch.float32 or big) else 3
    return _LaunchConfig(block_size, tile, tile, block_d, head_dim,
                         "ieee" if dtype == torch.float32 else "tf32", num_warps, num_stages)


def _consts(cfg: _LaunchConfig, has_pad: bool) -> dict:
    return dict(BLOCK_SIZE=cfg.block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                HEAD_DIM=cfg.head_dim, HAS_PAD=has_pad, DOT_PREC=cfg.dot_prec,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _device_context(x: torch.Tensor):
    """Launch on the tensor's GPU, not whichever one is current."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _forward(q, k, v, tables, kpm, cfg):
    """q, k, v: (B, H, N, D) -> out (B, H, N, D), lse (B, H, N) fp32 in log2 units."""
    B, H, N, D = q.shape
    nb = N // cfg.block_size
    out = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    has_pad = kpm is not None
    kpm_arg = kpm if has_pad else lse  # never read when HAS_PAD is False
    kpm_strides = kpm.stride() if has_pad else (0, 0)
    grid = (N // cfg.block_m, H, B)
    with _device_context(q):
        _attn_fwd[grid](
            q, k, v, out, lse, kpm_arg, tables.fwd_cnt, tables.fwd_idx,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *kpm_strides,
            int(tables.fwd_cnt.shape[0] > 1), H, N, nb, _LOG2E / math.sqrt(D),
            **_consts(cfg, has_pad))
    return out, lse


def _backward(do, q, k, v, out, lse, tables, kpm, cfg):
    """Gradients (dq, dk, dv) of the attention output, each (B, H, N, D) in the input dtype."""
    B, H, N, D = q.shape
    nb = N // cfg.block_size
    do = _last_dim_contiguous(do)
    delta = torch.empty_like(lse)  # (B, H, N) fp32
    dq = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, N, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, H, N, D), device=q.device, dtype=v.dtype)
    has_pad = kpm is not None
    kpm_arg = kpm if has_pad else lse
    kpm_strides = kpm.stride() if has_pad else (0, 0)
    per_head = int(tables.fwd_cnt.shape[0] > 1)
    sm_scale = 1.0 / math.sqrt(D)
    consts = _consts(cfg, has_pad)
    with _device_context(q):
        _attn_bwd_preprocess[(N // cfg.block_m, H, B)](
            out, do, delta, *_strides3(out), *_strides3(do), H, N,
            BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, HEAD_DIM=D)
        _attn_bwd_dkdv[(N // cfg.block_n, H, B)](
            q, k, v, do, dk, dv, lse, delta, kpm_arg, tables.bwd_cnt, tables.bwd_idx,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *kpm_strides,
            per_head, H, N, nb, sm_scale, sm_scale * _LOG2E, **consts)
        _attn_bwd_dq[(N // cfg.block_m, H, B)](
            q, k, v, do, dq, lse, delta, kpm_arg, tables.fwd_cnt, tables.fwd_idx,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq), *kpm_strides,
            per_head, H, N, nb, sm_scale, sm_scale * _LOG2E, **consts)
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    """Fused forward, FlashAttention-2 style backward (probabilities recomputed from the log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, block_size, kpm):
        tables = lookup_tables(layout)
        cfg = _launch_config(block_size, q.shape[-1], q.dtype)
        out, lse = _forward(q, k, v, tables, kpm, cfg)
        ctx.save_for_backward(q, k, v, out, lse, kpm)
        ctx.tables = tables
        ctx.cfg = cfg
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse, kpm = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, out, lse, ctx.tables, kpm, ctx.cfg)
        return dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------------------------- entry


def _check_inputs(q, k, v, layout, block_size, key_padding_mask) -> None:
    check_layout(q, layout, block_size)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape (B, H, N, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton backend takes q, k, v of one dtype among float16, bfloat16, float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on one device")
    B, H, N, D = q.shape
    if not 16 <= D <= 128:
        raise ValueError(f"triton backend supports head_dim 16..128, got {D}; use backend='torch'")
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"triton backend supports block_size 16, 32, 64 or 128, got {block_size}; "
                         f"use backend='torch'")
    if H > _MAX_GRID_YZ or B > _MAX_GRID_YZ:
        raise ValueError(f"batch {B} and heads {H} must each be at most {_MAX_GRID_YZ} (triton backend)")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask must be (B, N) = ({B}, {N}); got {tuple(key_padding_mask.shape)}")


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over the active blocks of `layout`, fused (SPEC.md section 4).

    q, k, v: (B, H, N, D), one dtype (fp16/bf16/fp32; fp32 accumulation), 16 <= D <= 128;
    layout: bool (H or 1, N/bs, N/bs); block_size: 16, 32, 64 or 128; key_padding_mask: (B, N), 1 keep /
    0 pad. Rows with no allowed key give zeros. Differentiable in q, k, v.
    """
    _check_inputs(q, k, v, layout, block_size, key_padding_mask)
    layout = layout.to(device=q.device, dtype=torch.bool)
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()  # (B, N)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return _BlockSparseAttention.apply(q, k, v, layout, block_size, kpm)


__all__ = ["triton_block_sparse_attention", "lookup_tables", "build_lookup_tables", "LookupTables"]
