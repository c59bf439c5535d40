"""DoRA's two elementwise passes in Triton (pyfastpeft/ops/dora.py; pyfastpeft/reference/dora.py is the oracle).

dora_scale: y[i, j] = scale[j] * z[i, j] (+ addend[j] or addend[i, j]), fp32 math, one rounding at the store.
dora_grad:  g[i, j] = scale[j] * dy[i, j] rounded to dy's dtype, and column_sum[j] = sum over i of dy[i, j] z[i, j]
            in fp32. Each program owns BLOCK_N columns and walks every row in BLOCK_M steps, so a column's sum runs in
            one fixed order on one program: no atomics, the same bits on every run.
z, dy, y, g, addend: contiguous row-major [rows, cols]; scale and column_sum fp32 [cols]. Offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_M, BLOCK_N = 32, 128
ADDEND_NONE, ADDEND_ROW, ADDEND_FULL = 0, 1, 2


@triton.jit
def _scale_kernel(
    z_ptr, scale_ptr, addend_ptr, y_ptr, rows, cols, ADDEND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    rows_ = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_ = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols_ < cols
    mask = (rows_[:, None] < rows) & col_mask[None, :]
    offs = rows_[:, None] * cols + cols_[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + cols_, mask=col_mask, other=0.0)
    y = scale[None, :] * z
    if ADDEND == 1:
        y += tl.load(addend_ptr + cols_, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if ADDEND == 2:
        y += tl.load(addend_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(dy_ptr, z_ptr, scale_ptr, g_ptr, sum_ptr, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols_ = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols_ < cols
    scale = tl.load(scale_ptr + cols_, mask=col_mask, other=0.0)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, rows, BLOCK_M):
        rows_ = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows_[:, None] < rows) & col_mask[None, :]
        offs = rows_[:, None] * cols + cols_[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(dy * z, axis=0)
        tl.store(g_ptr + offs, (scale[None, :] * dy).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(sum_ptr + cols_, total, mask=col_mask)


def dora_scale(z, scale, addend, y) -> None:
    """Fills y from z [rows, cols], scale fp32 [cols] and addend (None, [cols] or [rows, cols])."""
    rows, cols = z.shape
    if rows == 0 or cols == 0:
        return
    kind = ADDEND_NONE if addend is None else (ADDEND_ROW if addend.dim() == 1 else ADDEND_FULL)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols, BLOCK_N))
    _scale_kernel[grid](
        z, scale, z if addend is None else addend, y, rows, cols, ADDEND=kind, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N
    )


def dora_grad(dy, z, scale, g, column_sum) -> None:
    """Fills g [rows, cols] and column_sum fp32 [cols] from dy, z [rows, cols] and scale fp32 [cols]."""
    rows, cols = z.shape
    if cols == 0:
        return
    _grad_kernel[(triton.cdiv(cols, BLOCK_N),)](
        dy, z, scale, g, column_sum, rows, cols, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N
    )
