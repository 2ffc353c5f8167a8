"""Fused block-sparse attention in Triton (docs/block-sparse.md), FlashAttention-2 style.

Forward: one program per (query tile, head, batch row) walks the active key blocks of its query-block row
through a lookup table, keeps an online softmax in base 2 (running max, running sum) and saves the
log-sum-exp. Backward recomputes the probabilities from that log-sum-exp instead of storing them: a pre-pass
computes delta = rowsum(O * dO); one kernel per key tile walks the active query blocks of its key-block
column (the transposed table) to accumulate dK and dV; one kernel per query tile walks the active key blocks
again to accumulate dQ. `_BlockSparseAttention` wraps the four kernels; reference.py is the ground truth.

A program's tile may cover GROUP > 1 consecutive layout blocks (sat.kernels.triton_support.launch_config:
64-row tiles for wgmma on Hopper with blocks of 32). Its lookup-table row is then the union of those blocks'
rows, and each entry carries one bit per block of the group; rows whose block lacks the entry are masked.
Every entry is `block index * BITS + bits` (BITS = `_BITS`, a compile-time constant of the kernels).

Shapes reach the kernels as runtime arguments and strides; only tile sizes, the head dimension, the dtype,
the dot precision and whether there is a padding mask are compile-time constants. Launches go through
`_launch`, which `record_launches` can intercept: the compile report (sat.kernels.triton_compile) builds
exactly the recorded launches.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from sat.kernels.triton_support import (
    RECORDING,
    LaunchConfig,
    check_layout,
    fp32_matmul_precision,
    launch_config,
    triton_shape_problem,
)

_LOG2E = 1.4426950408889634
_BITS = 16  # lookup-table entries are block * _BITS + one bit per block of the program's group,
_MAX_GROUP = 4  # so a group has at most 4 blocks (bits below _BITS)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _lut_step(lut_row, j, sub, BLOCK_SIZE: tl.constexpr, STEP: tl.constexpr, BITS: tl.constexpr):
    """Step j of a walk along a lookup-table row: its STEP offsets (sub-tile j % SUBS of the (j // SUBS)-th
    listed block, SUBS = BLOCK_SIZE // STEP) and, per program row, 1 if the row's own layout block (sub: its
    place in the group) has the listed block, else 0."""
    entry = tl.load(lut_row + j // (BLOCK_SIZE // STEP))
    offs = (entry // BITS) * BLOCK_SIZE + (j % (BLOCK_SIZE // STEP)) * STEP + tl.arange(0, STEP)
    on = ((entry % BITS) >> sub) & 1
    return offs, on


@triton.jit
def _mask_scores(s, on, keep, GROUP: tl.constexpr, HAS_PAD: tl.constexpr):
    """s (ROWS, STEP) with -inf where the program row is off (`_lut_step`: a group's table row is the union of
    its blocks' rows) or the key is padding. keep: pointers to the padding flags (0: pad) of the step's keys
    (forward, dQ), or the flags of the program's rows as bool (dK/dV: the rows are the keys); unused without
    padding."""
    if GROUP > 1:
        s = tl.where(on[:, None] != 0, s, float("-inf"))
    if HAS_PAD:
        if keep.dtype.is_ptr():
            keep = tl.load(keep)[None, :] != 0  # here, not before the group mask: that costs sm_90 registers
        else:
            keep = keep[:, None]
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, lut_row, n_iters, sub,
                    stride_kn, stride_vn, stride_kpmn, qk_scale,
                    BLOCK_SIZE: tl.constexpr, STEP: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                    BITS: tl.constexpr):
    """Online softmax over the active key tiles of one query tile; scores are in log2 units."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # head dims that are not a power of two are padded with zeros
    for j in range(0, n_iters):
        offs_n, row_on = _lut_step(lut_row, j, sub, BLOCK_SIZE, STEP, BITS)
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)  # (BLOCK_D, STEP)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=d_ok[None, :], other=0.0)  # (STEP, BLOCK_D)
        qk = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # (ROWS, STEP)
        qk = _mask_scores(qk, row_on, kpm_base + offs_n * stride_kpmn, GROUP, HAS_PAD)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no allowed key so far
        p = tl.exp2(qk - m_safe[:, None])  # (ROWS, STEP), 0 at masked keys
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
              lut_per_head, H, N, NB, NR, qk_scale,
              BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, STEP: tl.constexpr, GROUP: tl.constexpr,
              BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
              BITS: tl.constexpr):
    """O and the base-2 log-sum-exp of one (query tile, head, batch row).

    NB: layout blocks per side (the width of a lookup-table row); NR: lookup-table rows per head."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N  # the last tile of a group may reach past N
    lut_r = (h * lut_per_head) * NR + pid_m * ROWS // (BLOCK_SIZE * GROUP)  # row of the lookup table
    n_iters = tl.load(LUT_CNT + lut_r) * (BLOCK_SIZE // STEP)
    sub = (offs_m // BLOCK_SIZE) % GROUP  # which layout block of the group each row is in

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (ROWS, BLOCK_D)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
        KPM + b * stride_kpmb, LUT_IDX + lut_r.to(tl.int64) * NB, n_iters, sub,
        stride_kn, stride_vn, stride_kpmn, qk_scale,
        BLOCK_SIZE, STEP, GROUP, BLOCK_D, HEAD_DIM, HAS_PAD, DOT_PREC, BITS)

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows with no allowed key stay 0
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))  # +inf makes their backward p = 0
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * H + h) * N + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_ob, stride_oh, stride_on,
                         stride_dob, stride_doh, stride_don,
                         H, N,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(O * dO), the softmax-backward correction term, in fp32."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=d_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=d_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (ROWS,)
    tl.store(DELTA + (b * H + h) * N + offs_m, delta)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, KPM, LUT_CNT, LUT_IDX,
                   stride_qb, stride_qh, stride_qn,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_don,
                   stride_dkb, stride_dkh, stride_dkn,
                   stride_kpmb, stride_kpmn,
                   lut_per_head, H, N, NB, NR, sm_scale, qk_scale,
                   BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, STEP: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr,
                   DOT_PREC: tl.constexpr, BITS: tl.constexpr):
    """dK and dV of one key tile, walking the active query blocks of its key-block column.

    dK and dV share one layout of strides (both are allocated by the wrapper).
    """
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < N
    lut_r = (h * lut_per_head) * NR + pid_n * ROWS // (BLOCK_SIZE * GROUP)  # transposed table
    n_iters = tl.load(LUT_CNT + lut_r) * (BLOCK_SIZE // STEP)
    lut_row = LUT_IDX + lut_r.to(tl.int64) * NB
    sub = (offs_n // BLOCK_SIZE) % GROUP

    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (ROWS, BLOCK_D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (ROWS, BLOCK_D)
    keep = None  # read only with padding
    if HAS_PAD:  # the keys are this program's rows: their flags are loaded once
        keep = tl.load(KPM + b * stride_kpmb + offs_n * stride_kpmn, mask=n_ok, other=0) != 0  # (ROWS,)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = (b * H + h) * N
    dk = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_iters):
        offs_m, col_on = _lut_step(lut_row, j, sub, BLOCK_SIZE, STEP, BITS)
        qT = tl.load(q_base + offs_m[None, :] * stride_qn + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)  # (BLOCK_D, STEP)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :],
                     mask=d_ok[None, :], other=0.0)  # (STEP, BLOCK_D)
        lse = tl.load(LSE + row_base + offs_m)  # (STEP,)
        delta = tl.load(DELTA + row_base + offs_m)  # (STEP,)
        qkT = tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale  # (ROWS, STEP)
        qkT = _mask_scores(qkT, col_on, keep, GROUP, HAS_PAD)
        pT = tl.exp2(qkT - lse[None, :])  # P^T, exact probabilities
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (ROWS, STEP)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
    dk *= sm_scale
    out_offs = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, KPM, LUT_CNT, LUT_IDX,
                 stride_qb, stride_qh, stride_qn,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_don,
                 stride_dqb, stride_dqh, stride_dqn,
                 stride_kpmb, stride_kpmn,
                 lut_per_head, H, N, NB, NR, sm_scale, qk_scale,
                 BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, STEP: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr,
                 DOT_PREC: tl.constexpr, BITS: tl.constexpr):
    """dQ of one query tile, walking the active key blocks of its query-block row."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N
    lut_r = (h * lut_per_head) * NR + pid_m * ROWS // (BLOCK_SIZE * GROUP)
    n_iters = tl.load(LUT_CNT + lut_r) * (BLOCK_SIZE // STEP)
    lut_row = LUT_IDX + lut_r.to(tl.int64) * NB
    sub = (offs_m // BLOCK_SIZE) % GROUP

    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=q_mask, other=0.0)  # (ROWS, BLOCK_D)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=q_mask, other=0.0)  # (ROWS, BLOCK_D)
    lse = tl.load(LSE + (b * H + h) * N + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * N + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_base = KPM + b * stride_kpmb
    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_iters):
        offs_n, row_on = _lut_step(lut_row, j, sub, BLOCK_SIZE, STEP, BITS)
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)  # (BLOCK_D, STEP)
        vT = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)  # (BLOCK_D, STEP)
        qk = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # (ROWS, STEP)
        qk = _mask_scores(qk, row_on, kpm_base + offs_n * stride_kpmn, GROUP, HAS_PAD)
        p = tl.exp2(qk - lse[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PREC)  # (ROWS, STEP)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------- lookup tables


@dataclass(frozen=True)
class LookupTables:
    """Active blocks per layout row (or per group of `group` consecutive rows), built once per layout.

    fwd_cnt (Hl, nr) int32: active key blocks of each query-block row (group: of any row of the group);
    fwd_idx (Hl, nr, nb) int32: their entries `key block * _BITS + bits`, ascending, in the first fwd_cnt places,
    bit g set when row g of the group has that block (bit 0 only, for group 1). bwd_cnt / bwd_idx: the same
    for the transposed layout (active query blocks of each key-block column). Hl is 1 for a layout shared by
    all heads; nr = ceil(nb / group).
    """

    fwd_cnt: torch.Tensor
    fwd_idx: torch.Tensor
    bwd_cnt: torch.Tensor
    bwd_idx: torch.Tensor
    group: int = 1


def _active_blocks(layout: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hl, nb, nb) bool -> counts (Hl, nr) and entries, active ones first (Hl, nr, nb); no host sync."""
    hl, nb, _ = layout.shape
    nr = -(-nb // group)
    rows = torch.zeros(hl, nr * group, nb, dtype=torch.int32, device=layout.device)
    rows[:, :nb] = layout.to(torch.int32)  # rows past the layout (the last group's) have no block
    weights = (1 << torch.arange(group, dtype=torch.int32, device=layout.device)).view(1, 1, group, 1)
    bits = (rows.view(hl, nr, group, nb) * weights).sum(2, dtype=torch.int32)  # (Hl, nr, nb)
    active = bits != 0
    cnt = active.sum(-1, dtype=torch.int32)
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)
    entries = order.to(torch.int32) * _BITS + bits.gather(-1, order)
    return cnt.contiguous(), entries.contiguous()


def build_lookup_tables(layout: torch.Tensor, group: int = 1) -> LookupTables:
    """Lookup tables of a bool layout (Hl, nb, nb) on its own device, for programs of `group` blocks."""
    if not 1 <= group <= _MAX_GROUP:
        raise ValueError(f"group must be 1..{_MAX_GROUP}, got {group}")
    layout = layout.bool()
    fwd_cnt, fwd_idx = _active_blocks(layout, group)
    bwd_cnt, bwd_idx = _active_blocks(layout.transpose(-2, -1), group)
    return LookupTables(fwd_cnt, fwd_idx, bwd_cnt, bwd_idx, group)


# id(layout) -> (weak reference to the layout, its version counter, {group: tables}). The weak reference
# makes a reused id harmless and drops the entry with the layout; the version counter catches in-place edits.
_LUT_CACHE: dict[int, tuple[weakref.ref, int, dict[int, LookupTables]]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _LUT_CACHE.get(key)
    if entry is not None and entry[0] is ref:
        del _LUT_CACHE[key]


def lookup_tables(layout: torch.Tensor, group: int = 1) -> LookupTables:
    """Cached `build_lookup_tables`: rebuilt only for a new layout tensor or after an in-place change."""
    try:
        version = layout._version
    except RuntimeError:  # inference tensors have no version counter: do not cache them
        return build_lookup_tables(layout, group)
    key = id(layout)
    entry = _LUT_CACHE.get(key)
    if entry is None or entry[0]() is not layout or entry[1] != version:
        ref = weakref.ref(layout, lambda r, key=key: _forget(key, r))
        entry = (ref, version, {})
        _LUT_CACHE[key] = entry
    tables = entry[2].get(group)
    if tables is None:
        tables = entry[2][group] = build_lookup_tables(layout, group)
    return tables


# ---------------------------------------------------------------------------------------------- launching


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the wrapper makes it: kernel[grid](*args, **options)."""

    kernel: object  # a @triton.jit function
    grid: tuple[int, int, int]
    args: tuple
    options: dict = field(default_factory=dict)  # constexpr arguments, num_warps, num_stages

    @property
    def name(self) -> str:
        return self.kernel.__name__


# While recording: (launches so far, the compute capability the launches are configured for).
_RECORD: contextvars.ContextVar[tuple[list[Launch], tuple[int, int]] | None] = contextvars.ContextVar(
    "sat_triton_record", default=None)
# The compute capability to configure for instead of the tensors' device (interpreter tests of GPU tiles).
_TARGET: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("sat_triton_target",
                                                                                  default=None)


@contextlib.contextmanager
def record_launches(capability: tuple[int, int]) -> Iterator[list[Launch]]:
    """Within the block, Triton attention records its launches, configured as for a GPU of compute
    `capability`, instead of running them (on any device, CPU tensors included); yields the list.

    The outputs are left uninitialised: only the launches (arguments, constants, strides, alignment) count.
    """
    launches: list[Launch] = []
    token, flag = _RECORD.set((launches, tuple(capability))), RECORDING.set(True)
    try:
        yield launches
    finally:
        RECORDING.reset(flag)
        _RECORD.reset(token)


@contextlib.contextmanager
def configure_for(capability: tuple[int, int]) -> Iterator[None]:
    """Within the block, tile the kernels as for a GPU of compute `capability` (and run them): lets the
    interpreter check the tiles of a GPU it is not."""
    token = _TARGET.set(tuple(capability))
    try:
        yield
    finally:
        _TARGET.reset(token)


def _launch(kernel, grid: tuple[int, int, int], args: tuple, options: dict) -> None:
    record = _RECORD.get()
    if record is not None:
        record[0].append(Launch(kernel, grid, args, options))
        return
    kernel[grid](*args, **options)


def _capability(x: torch.Tensor) -> tuple[int, int]:
    record, target = _RECORD.get(), _TARGET.get()
    if record is not None:
        return record[1]
    if target is not None:
        return target
    if x.is_cuda:
        return torch.cuda.get_device_capability(x.device)
    return (8, 0)  # the interpreter: Ampere's tiles


def config_for(q: torch.Tensor, block_size: int) -> LaunchConfig:
    """The launch configuration the wrapper uses for q (its dtype, head dim and device, and PyTorch's fp32
    matmul precision setting)."""
    return launch_config(block_size, q.shape[-1], q.dtype, _capability(q), fp32_matmul_precision())


# Fused multiply-adds in the kernels' arithmetic, asked for explicitly: Triton's default changes in 3.10.
_OPTIONS = {"enable_fp_fusion": True}


def _consts(cfg: LaunchConfig, has_pad: bool) -> dict:
    return dict(BLOCK_SIZE=cfg.block_size, ROWS=cfg.rows, STEP=cfg.step, GROUP=cfg.group, BLOCK_D=cfg.block_d,
                HEAD_DIM=cfg.head_dim, HAS_PAD=has_pad, DOT_PREC=cfg.dot_prec, BITS=_BITS,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_OPTIONS)


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
    grid = (triton.cdiv(N, cfg.rows), H, B)
    with _device_context(q):
        _launch(_attn_fwd, grid, (
            q, k, v, out, lse, kpm_arg, tables.fwd_cnt, tables.fwd_idx,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *kpm_strides,
            int(tables.fwd_cnt.shape[0] > 1), H, N, nb, tables.fwd_cnt.shape[1], _LOG2E / math.sqrt(D)),
            _consts(cfg, has_pad))
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
    grid = (triton.cdiv(N, cfg.rows), H, B)
    with _device_context(q):
        _launch(_attn_bwd_preprocess, (N // cfg.pre_rows, H, B), (
            out, do, delta, *_strides3(out), *_strides3(do), H, N),
            dict(ROWS=cfg.pre_rows, BLOCK_D=cfg.block_d, HEAD_DIM=D, num_warps=cfg.pre_warps, num_stages=1,
                 **_OPTIONS))
        _launch(_attn_bwd_dkdv, grid, (
            q, k, v, do, dk, dv, lse, delta, kpm_arg, tables.bwd_cnt, tables.bwd_idx,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *kpm_strides,
            per_head, H, N, nb, tables.bwd_cnt.shape[1], sm_scale, sm_scale * _LOG2E), consts)
        _launch(_attn_bwd_dq, grid, (
            q, k, v, do, dq, lse, delta, kpm_arg, tables.fwd_cnt, tables.fwd_idx,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq), *kpm_strides,
            per_head, H, N, nb, tables.fwd_cnt.shape[1], sm_scale, sm_scale * _LOG2E), consts)
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    """Fused forward, FlashAttention-2 style backward (probabilities recomputed from the log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, block_size, kpm):
        cfg = config_for(q, block_size)
        tables = lookup_tables(layout, cfg.group)
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
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton backend takes q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on one device")
    B, H, N, D = q.shape
    problem = triton_shape_problem(q.dtype, block_size, D, B, H)
    if problem:
        raise ValueError(f"triton backend cannot run this: {problem}; use backend='torch'")
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
    """softmax(q k^T / sqrt(d) + bias) v over the active blocks of `layout`, fused (docs/block-sparse.md).

    q, k, v: (B, H, N, D), one dtype (fp16/bf16/fp32; fp32 accumulation; fp32 dots in TF32 when PyTorch's
    fp32 matmul setting allows it, docs/gpu.md), 16 <= D <= 128; layout: bool (H or 1, N/bs, N/bs);
    block_size: 16, 32, 64 or 128; key_padding_mask: (B, N), 1 keep / 0 pad. Rows with no allowed key give
    zeros. Differentiable in q, k, v.
    """
    _check_inputs(q, k, v, layout, block_size, key_padding_mask)
    layout = layout.to(device=q.device, dtype=torch.bool)
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()  # (B, N)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return _BlockSparseAttention.apply(q, k, v, layout, block_size, kpm)


__all__ = ["triton_block_sparse_attention", "lookup_tables", "build_lookup_tables", "LookupTables", "Launch",
           "record_launches", "configure_for", "config_for"]
