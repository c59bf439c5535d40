"""LLM.int8 in Triton: vector-wise quantization with outlier columns, the int8 GEMM with its dequant epilogue
fused, and dX = dY @ dequant(W) with the int8 weight tiles dequantized inside the loop.

Math (pyfastpeft/reference/int8.py is the oracle; fp32 throughout):
    row-wise     row_stats[r] = max |x[r, c]| over !(|x[r, c]| >= t);  q = rne(x * ((1 / row_stats) * 127)),
                 0 in outlier columns (any |x[., c]| >= t)
    column-wise  col_stats[c] = the same max down column c;  q = rne((x * 127) / col_stats[c]), 0 at outliers
    non-finite scaled values code as 0; a NaN in a row (column) makes its stat NaN
    epilogue     out = float(C) * (row_stats[r] * col_stats[n]) * fp32(1 / 127^2) (+ addend) (+ bias)
    grad_input   dX = dY @ W_hat,  W_hat[n, k] = (float(W[n, k]) * SCB[n]) * fp32(1 / 127)
Rounding to nearest even is (s + 1.5 * 2^23) - 1.5 * 2^23 (exact for |s| <= 127); the coding kernels divide
correctly rounded (div_rn: `/` lowers to an approximate division on GPUs) and, like the GEMM's epilogue, are
launched with enable_fp_fusion=False, so no multiply-add is fused and ties round as the reference rounds.
dX's fp32 tiles multiply in full precision unless torch.backends.cuda.matmul.allow_tf32 allows TF32.
The int8 product accumulates in int32 through tl.dot; the CPU interpreter, which multiplies in numpy, gets
fp32 tiles instead (UPCAST): a 32-deep partial sum of products <= 127^2 is exact in fp32 and is added to
the int32 accumulator. All tensors contiguous; the launchers fill caller-allocated outputs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ROW_BLOCK = 1024
COL_BLOCK_ROWS, COL_BLOCK_COLS = 32, 64
MM_BLOCK_M, MM_BLOCK_N, MM_BLOCK_K = 32, 64, 32
ROUND_MAGIC = 12582912.0  # 1.5 * 2^23
MM_DEQUANT_SCALE = float(torch.tensor(1.0 / 16129.0, dtype=torch.float32))
DEQUANT_SCALE = 7.874015718698502e-3


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots as torch's fp32 matmul runs them: tf32 only where torch allows it."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def _to_code(s):
    """int8 round-half-even of fp32 s, 0 for non-finite s, clamped to [-127, 127]."""
    finite = (s - s) == 0.0
    s = tl.where(finite, s, 0.0)
    r = (s + 12582912.0) - 12582912.0
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    return r.to(tl.int8)


# One program per row: row_stats[r] and the row's outlier columns flagged (flags zeroed by the caller; every
# writer stores the same 1, so plain stores suffice).
@triton.jit
def _row_stats_kernel(x_ptr, stats_ptr, flags_ptr, k, threshold, HAS_THRESHOLD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    best = tl.zeros([BLOCK], dtype=tl.float32)
    nan_seen = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, k, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < k
        a = tl.abs(tl.load(x_ptr + row * k + cols, mask=mask, other=0.0).to(tl.float32))
        if HAS_THRESHOLD:
            outlier = (a >= threshold) & mask
            tl.store(flags_ptr + cols, tl.full([BLOCK], 1, tl.int32), mask=outlier)
            a = tl.where(outlier, 0.0, a)
        nan_seen = nan_seen | (a != a).to(tl.int32)
        best = tl.maximum(best, tl.where(a != a, 0.0, a))
    stat = tl.max(best, axis=0)
    stat = tl.where(tl.max(nan_seen, axis=0) > 0, float("nan"), stat)
    tl.store(stats_ptr + row, stat)


@triton.jit
def _row_codes_kernel(x_ptr, stats_ptr, flags_ptr, q_ptr, k, HAS_THRESHOLD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    stat = tl.load(stats_ptr + row)
    scale = tl.where(stat == 0.0, 0.0, tl.math.div_rn(1.0, stat) * 127.0)
    for start in range(0, k, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < k
        x = tl.load(x_ptr + row * k + cols, mask=mask, other=0.0).to(tl.float32)
        code = _to_code(x * scale)
        if HAS_THRESHOLD:
            flagged = tl.load(flags_ptr + cols, mask=mask, other=0)
            code = tl.where(flagged != 0, 0, code).to(tl.int8)
        tl.store(q_ptr + row * k + cols, code, mask=mask)


# Program p owns columns [p*BLOCK_C, +BLOCK_C) and walks every row.
@triton.jit
def _col_stats_kernel(
    x_ptr,
    stats_ptr,
    flags_ptr,
    m,
    k,
    threshold,
    HAS_THRESHOLD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < k
    best = tl.zeros([BLOCK_C], dtype=tl.float32)
    nan_seen = tl.zeros([BLOCK_C], dtype=tl.int32)
    outliers = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(0, m, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < m) & col_mask[None, :]
        a = tl.abs(tl.load(x_ptr + rows[:, None].to(tl.int64) * k + cols[None, :], mask=mask, other=0.0).to(tl.float32))
        if HAS_THRESHOLD:
            outlier = (a >= threshold) & mask
            outliers = outliers | tl.max(outlier.to(tl.int32), axis=0)
            a = tl.where(outlier, 0.0, a)
        nan_seen = nan_seen | tl.max((a != a).to(tl.int32), axis=0)
        best = tl.maximum(best, tl.max(tl.where(a != a, 0.0, a), axis=0))
    tl.store(stats_ptr + cols, tl.where(nan_seen > 0, float("nan"), best), mask=col_mask)
    tl.store(flags_ptr + cols, outliers, mask=col_mask)


@triton.jit
def _col_codes_kernel(
    x_ptr, stats_ptr, q_ptr, m, k, threshold, HAS_THRESHOLD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < m) & (cols[None, :] < k)
    offsets = rows[:, None] * k + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    stat = tl.load(stats_ptr + cols, mask=cols < k, other=1.0)
    code = _to_code(tl.math.div_rn(x * 127.0, stat[None, :]))
    if HAS_THRESHOLD:
        code = tl.where(tl.abs(x) >= threshold, 0, code).to(tl.int8)
    tl.store(q_ptr + offsets, code, mask=mask)


# out[M, N] = epilogue(a[M, K] @ b[N, K]^T); RAW stores the int32 product itself.
@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    row_stats_ptr,
    col_stats_ptr,
    bias_ptr,
    addend_ptr,
    out_ptr,
    m,
    n,
    k,
    scale,
    RAW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for start in range(0, k, BLOCK_K):
        depth = start + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + rows[:, None] * k + depth[None, :], mask=(rows[:, None] < m) & (depth[None, :] < k), other=0
        )
        b = tl.load(
            b_ptr + cols[None, :] * k + depth[:, None], mask=(cols[None, :] < n) & (depth[:, None] < k), other=0
        )
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32)).to(tl.int32)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    offsets = rows[:, None] * n + cols[None, :]
    if RAW:
        tl.store(out_ptr + offsets, acc, mask=mask)
    else:
        row_stats = tl.load(row_stats_ptr + rows, mask=rows < m, other=0.0)
        col_stats = tl.load(col_stats_ptr + cols, mask=cols < n, other=0.0)
        value = acc.to(tl.float32) * (row_stats[:, None] * col_stats[None, :]) * scale
        if HAS_ADDEND:
            value += tl.load(addend_ptr + offsets, mask=mask, other=0.0)
        if HAS_BIAS:
            value += tl.load(bias_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=mask)


# dx[M, K] = dy[M, N] @ W_hat[N, K]; W tiles [BLOCK_N, BLOCK_K] dequantized in the loop.
@triton.jit
def _grad_input_kernel(
    dy_ptr,
    w_ptr,
    stats_ptr,
    dx_ptr,
    m,
    n,
    k,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        outs = start + tl.arange(0, BLOCK_N).to(tl.int64)  # outs * k passes 2^31 for a large weight
        dy = tl.load(
            dy_ptr + rows[:, None] * n + outs[None, :], mask=(rows[:, None] < m) & (outs[None, :] < n), other=0.0
        )
        w = tl.load(
            w_ptr + outs[:, None] * k + cols[None, :], mask=(outs[:, None] < n) & (cols[None, :] < k), other=0
        ).to(tl.float32)
        scale = tl.load(stats_ptr + outs, mask=outs < n, other=0.0)
        w = (w * scale[:, None]) * 7.874015718698502e-3
        if UPCAST:
            acc += tl.dot(dy.to(tl.float32), w)
        else:
            acc += tl.dot(dy, w.to(dy.dtype), input_precision=DOT_PRECISION)
    tl.store(
        dx_ptr + rows[:, None] * k + cols[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=(rows[:, None] < m) & (cols[None, :] < k),
    )


def quantize(x2d, q, stats, flags, axis: int, threshold: float) -> None:
    """q [M, K] int8, stats ([M] axis 0 / [K] axis 1) fp32, flags int32 [K] zeroed: filled from x2d [M, K]."""
    m, k = x2d.shape
    has_threshold = threshold > 0
    if axis == 0:
        _row_stats_kernel[(m,)](x2d, stats, flags, k, threshold, HAS_THRESHOLD=has_threshold, BLOCK=ROW_BLOCK)
        _row_codes_kernel[(m,)](
            x2d, stats, flags, q, k, HAS_THRESHOLD=has_threshold, BLOCK=ROW_BLOCK, enable_fp_fusion=False
        )
    else:
        _col_stats_kernel[(triton.cdiv(k, COL_BLOCK_COLS),)](
            x2d,
            stats,
            flags,
            m,
            k,
            threshold,
            HAS_THRESHOLD=has_threshold,
            BLOCK_R=COL_BLOCK_ROWS,
            BLOCK_C=COL_BLOCK_COLS,
        )
        grid = (triton.cdiv(m, COL_BLOCK_ROWS), triton.cdiv(k, COL_BLOCK_COLS))
        _col_codes_kernel[grid](
            x2d,
            stats,
            q,
            m,
            k,
            threshold,
            HAS_THRESHOLD=has_threshold,
            BLOCK_R=COL_BLOCK_ROWS,
            BLOCK_C=COL_BLOCK_COLS,
            enable_fp_fusion=False,
        )


def matmul(a, b, out, row_stats=None, col_stats=None, bias=None, addend=None) -> None:
    """out [M, N] = a [M, K] int8 @ b [N, K]^T int8: int32 when out is int32 (stats ignored), else the epilogue
    with row_stats [M], col_stats [N] fp32, optional bias [N] and fp32 addend [M, N]."""
    m, k = a.shape
    n = b.shape[0]
    raw = out.dtype == torch.int32
    has_bias = bias is not None
    has_addend = addend is not None and addend.numel() > 0
    grid = (triton.cdiv(m, MM_BLOCK_M), triton.cdiv(n, MM_BLOCK_N))
    _matmul_kernel[grid](
        a,
        b,
        row_stats if not raw else out,
        col_stats if not raw else out,
        bias if has_bias else out,
        addend if has_addend else out,
        out,
        m,
        n,
        k,
        MM_DEQUANT_SCALE,
        RAW=raw,
        HAS_BIAS=has_bias,
        HAS_ADDEND=has_addend,
        UPCAST=_interpreted(),
        BLOCK_M=MM_BLOCK_M,
        BLOCK_N=MM_BLOCK_N,
        BLOCK_K=MM_BLOCK_K,
        enable_fp_fusion=False,
    )


def grad_input(dy2d, weight, weight_stats, dx) -> None:
    """dx [M, K] = dy2d [M, N] @ (weight [N, K] int8 * weight_stats [N] / 127), fp32 accumulation."""
    m, n = dy2d.shape
    k = weight.shape[1]
    grid = (triton.cdiv(m, MM_BLOCK_M), triton.cdiv(k, MM_BLOCK_N))
    _grad_input_kernel[grid](
        dy2d,
        weight,
        weight_stats,
        dx,
        m,
        n,
        k,
        UPCAST=_interpreted(),
        DOT_PRECISION=_dot_precision(dy2d.dtype),
        BLOCK_M=MM_BLOCK_M,
        BLOCK_N=MM_BLOCK_K,
        BLOCK_K=MM_BLOCK_N,
    )
