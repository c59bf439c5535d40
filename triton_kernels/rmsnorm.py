"""RMSNorm forward and backward in Triton, rows of n elements, fp32 compute.

forward, one row:  r = rsqrt(mean(x^2) + eps),  w' = offset + w
  llama (0): y = w' * round_x(x * r)                            HF LlamaRMSNorm
  gemma (1): y = x * r * w'                                     HF GemmaRMSNorm, all fp32
  none  (2): y = round_x(round_x(x * round_x(r)) * round_x(w'))  every step in x's dtype
where round_x(v) is v cast to x's dtype and back (codes shared with pyfastpeft.reference.rmsnorm).
backward, one row (casts treated as identity):  m = dy * w'
  dx = r * m - (r^3 / n) * dot(m, x) * x
  dw = sum over rows of dy * xn,  xn = round_x(x * r) (llama, none) or x * r (gemma)
dw is reduced without atomics: a fixed grid of programs strides over the rows, each writes its fp32
partial sum to its own row of a [programs, n] buffer, and torch sums the buffer (deterministic).

Rows up to MAX_FUSED_N elements (MAX_FUSED_N_BACKWARD in the backward, which holds x, dy and the dw sum
live) are held in registers (several rows per program when n is small); longer rows loop over
LOOP_BLOCK_N-column blocks and read x again from L2 in the second pass. (A fused 16384-wide backward row at
32 warps spilled 100-128 B a thread on sm_80/sm_90; the looped one spills nothing.)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_GEMMA = tl.constexpr(1)
_NONE = tl.constexpr(2)
MAX_FUSED_N = 16384
MAX_FUSED_N_BACKWARD = 8192
LOOP_BLOCK_N = 4096
_TILE_ELEMENTS = 4096  # target elements per program when several short rows share one


@triton.jit
def _round_x(v, x_ptr):
    return v.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _scale(x, r, w, offset, x_ptr, CASTING_MODE: tl.constexpr):
    """y in fp32 from fp32 x, r, w (broadcastable), with the casting mode's roundings to x's dtype."""
    if CASTING_MODE == _GEMMA:
        y = x * r * (offset + w)
    elif CASTING_MODE == _NONE:
        y = _round_x(_round_x(x * _round_x(r, x_ptr), x_ptr) * _round_x(offset + w, x_ptr), x_ptr)
    else:
        y = (offset + w) * _round_x(x * r, x_ptr)
    return y


@triton.jit
def _normalized_for_dw(x, r, x_ptr, CASTING_MODE: tl.constexpr):
    if CASTING_MODE == _GEMMA:
        xn = x * r
    else:
        xn = _round_x(x * r, x_ptr)
    return xn


# x, y: [rows, n] contiguous; w: [n]; rstd: [rows] fp32. Program p owns rows [p*BLOCK_ROWS, +BLOCK_ROWS).
@triton.jit
def _forward_fused_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    rows,
    n,
    eps,
    offset,
    CASTING_MODE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_N)
    row_mask, col_mask = row < rows, col < n
    mask = row_mask[:, None] & col_mask[None, :]
    offs = row[:, None] * n + col[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / n + eps)
    tl.store(rstd_ptr + row, r, mask=row_mask)
    y = _scale(x, r[:, None], w[None, :], offset, x_ptr, CASTING_MODE)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# Same contract, one row per program, two passes over BLOCK_N-column blocks.
@triton.jit
def _forward_looped_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, n, eps, offset, CASTING_MODE: tl.constexpr, BLOCK_N: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = x_ptr + row * n, y_ptr + row * n
    sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_row + col, mask=col < n, other=0.0).to(tl.float32)
        sum_sq += x * x
    r = tl.rsqrt(tl.sum(sum_sq, axis=0) / n + eps)
    tl.store(rstd_ptr + row, r)
    for start in range(0, n, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        col_mask = col < n
        x = tl.load(x_row + col, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
        y = _scale(x, r, w, offset, x_ptr, CASTING_MODE)
        tl.store(y_row + col, y.to(y_ptr.dtype.element_ty), mask=col_mask)


# dy, x, dx: [rows, n] contiguous; rstd: [rows] fp32; dw_partial: [programs, n] fp32 (written when
# COMPUTE_DW). Program p handles the BLOCK_ROWS-row tiles p, p + programs, p + 2 * programs, ...
@triton.jit
def _backward_fused_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    rows,
    n,
    offset,
    CASTING_MODE: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    col = tl.arange(0, BLOCK_N)
    col_mask = col < n
    w = offset + tl.load(w_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_ROWS, BLOCK_N], dtype=tl.float32)
    for tile in range(pid.to(tl.int64), tl.cdiv(rows, BLOCK_ROWS), tl.num_programs(0)):
        row = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = row < rows
        mask = row_mask[:, None] & col_mask[None, :]
        offs = row[:, None] * n + col[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rstd_ptr + row, mask=row_mask, other=0.0)[:, None]
        m = dy * w[None, :]
        coef = r * r * r * tl.sum(m * x, axis=1)[:, None] / n
        tl.store(dx_ptr + offs, (r * m - coef * x).to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * _normalized_for_dw(x, r, x_ptr, CASTING_MODE)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n + col, tl.sum(dw, axis=0), mask=col_mask)


# Same contract for long rows: program p handles rows p, p + programs, ..., one at a time, in
# BLOCK_N-column blocks; dw_partial must be zeroed (each program accumulates into its own row).
@triton.jit
def _backward_looped_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    rows,
    n,
    offset,
    CASTING_MODE: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    dw_row = dw_partial_ptr + pid.to(tl.int64) * n
    for row in range(pid.to(tl.int64), rows, tl.num_programs(0)):
        x_row, dy_row, dx_row = x_ptr + row * n, dy_ptr + row * n, dx_ptr + row * n
        r = tl.load(rstd_ptr + row)
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            col = start + tl.arange(0, BLOCK_N)
            mask = col < n
            x = tl.load(x_row + col, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + col, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
            dot += dy * (offset + w) * x
        coef = r * r * r * tl.sum(dot, axis=0) / n
        for start in range(0, n, BLOCK_N):
            col = start + tl.arange(0, BLOCK_N)
            mask = col < n
            x = tl.load(x_row + col, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + col, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row + col, (r * dy * (offset + w) - coef * x).to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                partial = tl.load(dw_row + col, mask=mask, other=0.0)
                tl.store(dw_row + col, partial + dy * _normalized_for_dw(x, r, x_ptr, CASTING_MODE), mask=mask)


def _num_warps(tile_elements: int) -> int:
    """About 8 values of each live tile per thread (sm_90 ptxas: the 16384-wide backward spills
    ~200 B a thread at 32 warps, ~800 B at 16; every other tile fits in registers)."""
    return min(32, max(1, tile_elements // 256))


def _fused_blocks(rows: int, n: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(n)
    return min(triton.next_power_of_2(rows), max(1, _TILE_ELEMENTS // block_n)), block_n


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _max_programs(device: torch.device) -> int:
    """Programs of a persistent backward grid: one per SM on CUDA; a few under the CPU interpreter."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def rmsnorm_forward(x, weight, y, rstd, eps: float, offset: float, casting_mode: int) -> None:
    """Fills y [rows, n] (x's dtype, or fp32 in llama mode's promotion) and rstd [rows] fp32 from
    x [rows, n] contiguous and weight [n] (any float dtype)."""
    if x.numel() == 0:
        return
    n = x.shape[-1]
    rows = x.numel() // n
    if n <= MAX_FUSED_N:
        block_rows, block_n = _fused_blocks(rows, n)
        _forward_fused_kernel[(triton.cdiv(rows, block_rows),)](
            x,
            weight,
            y,
            rstd,
            rows,
            n,
            eps,
            offset,
            CASTING_MODE=casting_mode,
            BLOCK_ROWS=block_rows,
            BLOCK_N=block_n,
            num_warps=_num_warps(block_rows * block_n),
        )
    else:
        _forward_looped_kernel[(rows,)](
            x,
            weight,
            y,
            rstd,
            n,
            eps,
            offset,
            CASTING_MODE=casting_mode,
            BLOCK_N=LOOP_BLOCK_N,
            num_warps=_num_warps(LOOP_BLOCK_N),
        )


def rmsnorm_backward(dy, x, weight, rstd, dx, dw, offset: float, casting_mode: int) -> None:
    """Fills dx [rows, n] (x's dtype) from dy [rows, n] (the forward's y dtype), x, weight [n] and rstd
    [rows] fp32; dw: None, or an fp32 [n] tensor that is overwritten with the weight's gradient."""
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    if rows == 0 or n == 0:
        if dw is not None:
            dw.zero_()
        return
    compute_dw = dw is not None  # without it, dx stands in for the partial buffer and is never touched
    if n <= MAX_FUSED_N_BACKWARD:
        block_rows, block_n = _fused_blocks(rows, n)
        tiles = triton.cdiv(rows, block_rows)
        programs = min(tiles, _max_programs(x.device))
        partial = torch.empty((programs, n), dtype=torch.float32, device=x.device) if compute_dw else dx
        _backward_fused_kernel[(programs,)](
            dy,
            x,
            weight,
            rstd,
            dx,
            partial,
            rows,
            n,
            offset,
            CASTING_MODE=casting_mode,
            COMPUTE_DW=compute_dw,
            BLOCK_ROWS=block_rows,
            BLOCK_N=block_n,
            num_warps=_num_warps(block_rows * block_n),
        )
    else:
        programs = min(rows, _max_programs(x.device))
        partial = torch.zeros((programs, n), dtype=torch.float32, device=x.device) if compute_dw else dx
        _backward_looped_kernel[(programs,)](
            dy,
            x,
            weight,
            rstd,
            dx,
            partial,
            rows,
            n,
            offset,
            CASTING_MODE=casting_mode,
            COMPUTE_DW=compute_dw,
            BLOCK_N=LOOP_BLOCK_N,
            num_warps=_num_warps(LOOP_BLOCK_N),
        )
    if compute_dw:
        torch.sum(partial, dim=0, out=dw)
