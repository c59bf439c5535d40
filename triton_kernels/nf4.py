"""NF4 / FP4 (QLoRA 4-bit) in Triton: quantize, dequantize, fused dequant-GEMV, and products whose
weight tiles are dequantized inside the loop (a dequantized W never exists in memory).

Format (pyfastpeft/reference/nf4.py is the oracle): W [N, K] flattened row-major, element e = n*K + k sits
in byte e // 2, high nibble for even e; blocks of `blocksize` (even) run over the flattened weight, so a
block may span rows and every kernel finds an element's scale as absmax[e // blocksize]:
    w_hat[e] = code[nibble(e)] * absmax[e // blocksize]          fp32 (absmax de-nested, code [16])
Kernels:
    dequantize   out[e] = w_hat[e], one packed byte -> two elements, rounded once to out's dtype
    gemv         out[r, n] = sum_k x[r, k] * w_hat[n*K + k] (+ bias[n]) for m <= 8 rows, fp32 sums
    matmul       out = x @ W^T (+ bias): tl.dot of x [BLOCK_M, BLOCK_K] with W^T [BLOCK_K, BLOCK_N]
    grad_input   dx = dy @ W: tl.dot of dy [BLOCK_M, BLOCK_N] with W [BLOCK_N, BLOCK_K]
    quantize     packed, absmax of w, byte for byte the reference (see _quantize_kernel)
tl.dot takes bf16/fp16 operands in their dtype (the W tile rounded to x's dtype, as the reference's
dequantize-then-matmul does for bf16) and fp32 operands as fp32 (tf32 only where torch allows it for
matmuls); under the CPU interpreter, which gets bf16 dots wrong, UPCAST feeds it fp32 operands instead.
All tensors contiguous; absmax fp32; code fp32 [16]; the launchers fill caller-allocated outputs. BLOCKSIZE is
a compile-time constant (one compilation per block size in use), so e // BLOCKSIZE is a shift, not a division.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DEQUANTIZE_BLOCK_BYTES = 1024
GEMV_BLOCK_N = 32
# Product tiles: 64 output columns, 32 along the reduced dim, 8 warps: no register spills on sm_80 (the decoded
# tile's int64 flat indices are what fills registers; 64 x 64 at 4 warps spills).
TILE_COLS = 64
TILE_REDUCE = 32
TILE_WARPS = 8


@triton.jit
def _weight_at(packed_ptr, absmax_ptr, code_ptr, element, mask, BLOCKSIZE: tl.constexpr):
    """fp32 w_hat[element] for a tensor of int64 flat indices; 0 where mask is off."""
    byte = tl.load(packed_ptr + (element >> 1), mask=mask, other=0).to(tl.int32)
    nibble = (byte >> (4 - 4 * (element & 1)).to(tl.int32)) & 15
    code = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    return code * tl.load(absmax_ptr + element // BLOCKSIZE, mask=mask, other=0.0)


# out: [numel] of any float dtype. Program p decodes bytes [p*BLOCK_BYTES, +BLOCK_BYTES): elements 2j and
# 2j + 1 of byte j share one block (blocksize is even).
@triton.jit
def _dequantize_kernel(
    packed_ptr, absmax_ptr, code_ptr, out_ptr, numel, BLOCKSIZE: tl.constexpr, BLOCK_BYTES: tl.constexpr
):
    byte_index = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    even = 2 * byte_index
    mask = even < numel
    byte = tl.load(packed_ptr + byte_index, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + even // BLOCKSIZE, mask=mask, other=0.0)
    high = tl.load(code_ptr + (byte >> 4), mask=mask, other=0.0) * scale
    low = tl.load(code_ptr + (byte & 15), mask=mask, other=0.0) * scale
    tl.store(out_ptr + even, high.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + even + 1, low.to(out_ptr.dtype.element_ty), mask=even + 1 < numel)


# x: [m, K], out: [m, N] (x's dtype), bias: [N] of any float dtype (read when HAS_BIAS); m <= BLOCK_M.
# Program p owns features [p*BLOCK_N, +BLOCK_N) and walks K in column pairs (k, k + 1), k even: with K even
# the pair is one byte (high nibble k, low nibble k + 1, one absmax), read once; with K odd a row starts
# mid-byte on odd rows and each element is fetched by its own flat index.
@triton.jit
def _gemv_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    bias_ptr,
    out_ptr,
    m,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
):
    features = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    feature_mask, row_mask = features < N, rows < m
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, 2 * BLOCK_PAIRS):
        k_even = k0 + 2 * tl.arange(0, BLOCK_PAIRS)
        even_mask, odd_mask = k_even < K, k_even + 1 < K
        first = features[:, None] * K + k_even[None, :]  # [BLOCK_N, BLOCK_PAIRS] flat index of (n, k_even)
        w_even_mask = feature_mask[:, None] & even_mask[None, :]
        if EVEN_K:
            byte = tl.load(packed_ptr + (first >> 1), mask=w_even_mask, other=0).to(tl.int32)
            scale = tl.load(absmax_ptr + first // BLOCKSIZE, mask=w_even_mask, other=0.0)
            w_even = tl.load(code_ptr + (byte >> 4)) * scale
            w_odd = tl.load(code_ptr + (byte & 15)) * scale
        else:
            w_even = _weight_at(packed_ptr, absmax_ptr, code_ptr, first, w_even_mask, BLOCKSIZE)
            w_odd = _weight_at(
                packed_ptr, absmax_ptr, code_ptr, first + 1, feature_mask[:, None] & odd_mask[None, :], BLOCKSIZE
            )
        x_row = x_ptr + rows[:, None] * K + k_even[None, :]
        x_even = tl.load(x_row, mask=row_mask[:, None] & even_mask[None, :], other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + 1, mask=row_mask[:, None] & odd_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x_even[:, None, :] * w_even[None, :, :] + x_odd[:, None, :] * w_odd[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * N + features[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & feature_mask[None, :],
    )


# x: [M, K], out: [M, N] (x's dtype), bias as in _gemv_kernel. Program (i, j) owns out tile (i, j); W^T's
# [BLOCK_K, BLOCK_N] tile is decoded from the packed bytes in every step of the K loop.
@triton.jit
def _matmul_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    features = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, feature_mask = rows < M, features < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        w_t = _weight_at(
            packed_ptr,
            absmax_ptr,
            code_ptr,
            features[None, :] * K + cols[:, None],
            col_mask[:, None] & feature_mask[None, :],
            BLOCKSIZE,
        )
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), w_t, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w_t.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * N + features[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & feature_mask[None, :],
    )


# dy: [M, N], dx: [M, K] (dy's dtype). Program (i, j) owns dx tile (i, j) and walks N, decoding W's
# [BLOCK_N, BLOCK_K] tile in every step.
@triton.jit
def _grad_input_kernel(
    dy_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    dx_ptr,
    M,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask, col_mask = rows < M, cols < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        features = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # features * K passes 2^31 for a large weight
        feature_mask = features < N
        dy = tl.load(
            dy_ptr + rows[:, None] * N + features[None, :], mask=row_mask[:, None] & feature_mask[None, :], other=0.0
        )
        w = _weight_at(
            packed_ptr,
            absmax_ptr,
            code_ptr,
            features[:, None] * K + cols[None, :],
            feature_mask[:, None] & col_mask[None, :],
            BLOCKSIZE,
        )
        if UPCAST:
            acc = tl.dot(dy.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w.to(dy_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    tl.store(
        dx_ptr + rows[:, None] * K + cols[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# w: [numel] (fp32/fp16/bf16), packed: [(numel + 1) // 2] uint8, absmax: [ceil(numel / BLOCK)] fp32,
# midpoints: fp32 [15] of the sorted code, order: int32 [16] sorted position -> code index. One program per
# block, BLOCK = blocksize, elements taken in pairs (2j, 2j + 1) so each program writes whole bytes:
#   full block:    s = w * (1 / max(absmax, 1e-38));   partial last block: s = w / max(absmax, 1e-38) and it
#                  stores the clamped absmax (IEEE divisions);   then s = clamp(s, -1, 1), NaN kept
#   code index:    order[#{p : !(midpoints[p] >= s)}]  (a tie takes the lower code; NaN is above all)
#   odd numel:     the missing last element quantizes as 0.0.
# absmax is NaN when the block holds a NaN (torch's amax), so the whole block decodes to NaN as in bnb.
@triton.jit
def _quantize_kernel(w_ptr, packed_ptr, absmax_ptr, midpoints_ptr, order_ptr, numel, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    even = block * BLOCK + 2 * tl.arange(0, BLOCK // 2)
    even_mask, odd_mask = even < numel, even + 1 < numel
    w_even = tl.load(w_ptr + even, mask=even_mask, other=0.0).to(tl.float32)
    w_odd = tl.load(w_ptr + even + 1, mask=odd_mask, other=0.0).to(tl.float32)
    amax = tl.reduce(_max_keeping_nan(tl.abs(w_even), tl.abs(w_odd)), 0, _max_keeping_nan)
    divisor = tl.where(amax < 1e-38, 1e-38, amax)
    if block * BLOCK + BLOCK <= numel:
        inverse = tl.math.div_rn(1.0, divisor)
        s_even, s_odd = w_even * inverse, w_odd * inverse
        tl.store(absmax_ptr + block, amax)
    else:
        s_even, s_odd = tl.math.div_rn(w_even, divisor), tl.math.div_rn(w_odd, divisor)
        tl.store(absmax_ptr + block, divisor)
    s_even = tl.where(s_even < -1.0, -1.0, tl.where(s_even > 1.0, 1.0, s_even))
    s_odd = tl.where(s_odd < -1.0, -1.0, tl.where(s_odd > 1.0, 1.0, s_odd))
    s_odd = tl.where(odd_mask, s_odd, 0.0)
    position_even = tl.zeros([BLOCK // 2], dtype=tl.int32)
    position_odd = tl.zeros([BLOCK // 2], dtype=tl.int32)
    for p in tl.static_range(15):
        midpoint = tl.load(midpoints_ptr + p)
        position_even += tl.where(midpoint >= s_even, 0, 1)
        position_odd += tl.where(midpoint >= s_odd, 0, 1)
    high = tl.load(order_ptr + position_even)
    low = tl.load(order_ptr + position_odd)
    tl.store(packed_ptr + (even >> 1), ((high << 4) | low).to(tl.uint8), mask=even_mask)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots as torch's fp32 matmul runs them: tf32 only where torch allows it."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _block_m(m: int) -> int:
    return min(64, max(16, triton.next_power_of_2(m)))


def dequantize(packed, absmax, code, out, blocksize: int) -> None:
    """Fills out [numel] (any float dtype) with w_hat[0 .. numel)."""
    numel = out.numel()
    if numel == 0:
        return
    grid = (triton.cdiv((numel + 1) // 2, DEQUANTIZE_BLOCK_BYTES),)
    _dequantize_kernel[grid](
        packed, absmax, code, out, numel, BLOCKSIZE=blocksize, BLOCK_BYTES=DEQUANTIZE_BLOCK_BYTES, num_warps=4
    )


def gemv(x, packed, absmax, code, bias, out, blocksize: int) -> None:
    """Fills out [m, N] = x [m, K] @ W^T (+ bias; None = none), 1 <= m <= 8."""
    m, k = x.shape
    n = out.shape[1]
    block_m = triton.next_power_of_2(m)
    has_bias = bias is not None
    _gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N),)](
        x,
        packed,
        absmax,
        code,
        bias if has_bias else out,
        out,
        m,
        n,
        k,
        BLOCKSIZE=blocksize,
        HAS_BIAS=has_bias,
        EVEN_K=k % 2 == 0,
        BLOCK_M=block_m,
        BLOCK_N=GEMV_BLOCK_N,
        BLOCK_PAIRS=64 if block_m <= 2 else 32,
        num_warps=4,
    )


def matmul(x, packed, absmax, code, bias, out, blocksize: int) -> None:
    """Fills out [M, N] = x [M, K] @ W^T (+ bias; None = none), any M >= 1."""
    m, k = x.shape
    n = out.shape[1]
    block_m = _block_m(m)
    has_bias = bias is not None
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, TILE_COLS))
    _matmul_kernel[grid](
        x,
        packed,
        absmax,
        code,
        bias if has_bias else out,
        out,
        m,
        n,
        k,
        BLOCKSIZE=blocksize,
        HAS_BIAS=has_bias,
        UPCAST=_interpreted(),
        DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=TILE_COLS,
        BLOCK_K=TILE_REDUCE,
        num_warps=TILE_WARPS,
    )


def grad_input(dy, packed, absmax, code, dx, blocksize: int) -> None:
    """Fills dx [M, K] = dy [M, N] @ W, any M >= 1."""
    m, n = dy.shape
    k = dx.shape[1]
    block_m = _block_m(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, TILE_COLS))
    _grad_input_kernel[grid](
        dy,
        packed,
        absmax,
        code,
        dx,
        m,
        n,
        k,
        BLOCKSIZE=blocksize,
        UPCAST=_interpreted(),
        DOT_PRECISION=_dot_precision(dy.dtype),
        BLOCK_M=block_m,
        BLOCK_N=TILE_REDUCE,
        BLOCK_K=TILE_COLS,
        num_warps=TILE_WARPS,
    )


def quantize(w, midpoints, order, packed, absmax, blocksize: int) -> None:
    """Fills packed [(numel + 1) // 2] and absmax [ceil(numel / blocksize)] from flat w; midpoints, order:
    pyfastpeft.reference.nf4.search_tables(code)."""
    numel = w.numel()
    if numel == 0:
        return
    _quantize_kernel[(triton.cdiv(numel, blocksize),)](
        w, packed, absmax, midpoints, order, numel, BLOCK=blocksize, num_warps=max(1, min(8, blocksize // 256))
    )
