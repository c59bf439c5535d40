"""LoRA in Triton: the forward in two kernels over a dense or NF4 base, and the masked elementwise kernel of
the backward (whose GEMMs run in torch, pyfastpeft/ops/lora.py).

forward, x [M, K], W [N, K] frozen, A [R, K], B [N, R], s = scaling (pyfastpeft/reference/lora.py has the math):
    _xa_kernel       xa = round_x(x_d A^T)          [M, R] in x's dtype, fp32 accumulation, one program per
                                                    [BLOCK_M, BLOCK_R] tile
    _forward_kernel  y  = x W^T + b + s * xa B^T    one program per [BLOCK_M, BLOCK_N] tile: the K loop for
                                                    x W^T, then a loop over the rank in BLOCK_R steps
where x_d = x * keep * keep_scale (rounded to x's dtype), keep = _uniform(seed, offset + m * K + k) > threshold:
the shared Philox mask, applied on the A branch only. Every rank takes the same path: the rank is
a loop, never a tile dimension, so shared memory and registers stop growing at rank 64 (rank 1024 fp32 needs
what rank 64 needs), and each x element's mask is drawn once per rank tile (ceil(R / BLOCK_R) times), not once
per output-column block. xa is written once and read back by every N block (M * R elements, small next to W).
With an NF4 base the K loop dequantizes the W tile from its packed bytes (pyfastpeft/triton_kernels/nf4.py's
_weight_at: element f = n * K + k is nibble f % 2 of byte f // 2, high nibble first, times absmax[f // BLOCKSIZE],
a shift: BLOCKSIZE is a compile-time power of two). Rank tiles past R are masked to zero.

DOT_IN_FP32 (set under the CPU interpreter, which gets bf16 arithmetic and bf16 tl.dot wrong) converts every
loaded tile to fp32; on GPUs the tiles meet tl.dot in x's dtype with fp32 accumulation. fp32 tiles multiply in
full precision (DOT_PRECISION "ieee") unless torch.backends.cuda.matmul.allow_tf32 lets torch's own fp32
matmul use TF32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .nf4 import _weight_at

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
# Rank tiles: min(cap, max(16, next power of two of R)). fp32 tiles multiply on FMA units with their operands
# in registers: _forward_kernel takes 16 ranks a step at 8 warps there, 64 at 4 warps in 16-bit (.ci/compile_gpu
# holds every launch within the targets' shared memory and its spill budget on sm_80 and sm_90).
XA_MAX_BLOCK_R = 64
MAX_BLOCK_R, FP32_MAX_BLOCK_R = 64, 16
ELEMENTWISE_BLOCK = 1024


# The dropout uniform at int64 stream position(s) `position` (offset + element index): word position % 4 of the
# Philox block position >> 2, as pyfastpeft/reference/lora.py defines it. Each element runs its block's rounds
# and keeps one word (the CPU kernel shares a block between four elements; on a GPU the rounds are cheap).
@triton.jit
def _uniform(seed, position):
    w0, w1, w2, w3 = tl.randint4x(seed, position >> 2)
    word = position & 3
    w = tl.where(word < 2, tl.where(word == 0, w0, w1), tl.where(word == 2, w2, w3))
    return tl.random.uint_to_uniform_float(w)


# x: [M, K], a: [R, K], xa: [M, R], one dtype, contiguous; rng: int64 [2] (read when DROPOUT).
@triton.jit
def _xa_kernel(
    x_ptr,
    a_ptr,
    xa_ptr,
    rng_ptr,
    M,
    K,
    R,
    threshold,
    keep_scale,
    DROPOUT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask, rank_mask = rows < M, ranks < R
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x_index = rows[:, None] * K + ks[None, :]
        x = tl.load(x_ptr + x_index, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if DROPOUT:
            u = _uniform(seed, offset + x_index)
            x = tl.where(u > threshold, x.to(tl.float32) * keep_scale, 0.0).to(x_ptr.dtype.element_ty)
        a_t = tl.load(a_ptr + ranks[None, :] * K + ks[:, None], mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
            a_t = a_t.to(tl.float32)
        acc = tl.dot(x, a_t, acc, input_precision=DOT_PRECISION)
    tl.store(
        xa_ptr + rows[:, None] * R + ranks[None, :],
        acc.to(xa_ptr.dtype.element_ty),
        mask=row_mask[:, None] & rank_mask[None, :],
    )


# x, xa (from _xa_kernel), b, y: x's dtype; w: [N, K] x's dtype, or the NF4 base (packed uint8, absmax fp32
# de-nested, code fp32 [16]) when BASE_NF4; bias: [N] of any float dtype (read when HAS_BIAS).
@triton.jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    bias_ptr,
    b_ptr,
    xa_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    scaling,
    BASE_NF4: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
        w_mask = col_mask[:, None] & k_mask[None, :]
        w_index = cols[:, None] * K + ks[None, :]
        if BASE_NF4:
            w = _weight_at(packed_ptr, absmax_ptr, code_ptr, w_index, w_mask, BLOCKSIZE).to(x.dtype)
        else:
            w = tl.load(w_ptr + w_index, mask=w_mask, other=0.0)
            if DOT_IN_FP32:
                w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    lora = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_mask = ranks < R
        xa = tl.load(
            xa_ptr + rows[:, None] * R + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :], other=0.0
        )
        b_t = tl.load(
            b_ptr + cols[None, :] * R + ranks[:, None], mask=rank_mask[:, None] & col_mask[None, :], other=0.0
        )
        if DOT_IN_FP32:
            xa = xa.to(tl.float32)
            b_t = b_t.to(tl.float32)
        lora = tl.dot(xa, b_t, lora, input_precision=DOT_PRECISION)
    y = acc + scaling * lora
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * N + cols[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


# src, dst: contiguous [numel] of one dtype; rng: int64 [2] (seed, offset).
#   dst = (ACCUMULATE ? dst : 0) + alpha * (keep ? src * keep_scale : 0)    in fp32, rounded once
@triton.jit
def _dropout_kernel(
    src_ptr, dst_ptr, rng_ptr, numel, threshold, keep_scale, alpha, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr
):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < numel
    src = tl.load(src_ptr + index, mask=mask, other=0.0).to(tl.float32)
    u = _uniform(tl.load(rng_ptr), tl.load(rng_ptr + 1) + index)
    dropped = alpha * tl.where(u > threshold, src * keep_scale, 0.0)
    if ACCUMULATE:
        dropped += tl.load(dst_ptr + index, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + index, dropped.to(dst_ptr.dtype.element_ty), mask=mask)


def _dot_in_fp32() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots as torch's fp32 matmul runs them: tf32 only where torch allows it."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _threshold(dropout_p: float) -> float:
    return float(torch.tensor(dropout_p, dtype=torch.float32))


def _rank_step(rank: int, largest: int) -> int:
    return min(largest, max(16, triton.next_power_of_2(rank)))


def lora_forward(
    x2d, base, bias, lora_A, lora_B, y, xa, scaling: float, dropout_p: float, keep_scale: float, rng
) -> None:
    """Fills y [M, N] and xa [M, R] (x's dtype) from contiguous x2d [M, K], lora_A [R, K], lora_B [N, R], bias
    [N] or empty, and base: pyfastpeft.ops.lora_base's DenseBase (weight [N, K] contiguous, x's dtype) or NF4Base
    (packed uint8, absmax fp32 de-nested, code fp32 [16]). rng: int64 [2] or None (no dropout)."""
    rows, in_features = x2d.shape
    out_features, rank = lora_B.shape
    if rows == 0:
        return
    dot_in_fp32, precision = _dot_in_fp32(), _dot_precision(x2d.dtype)
    if rank > 0:
        dropout = rng is not None
        block_r = _rank_step(rank, XA_MAX_BLOCK_R)
        _xa_kernel[(triton.cdiv(rows, BLOCK_M), triton.cdiv(rank, block_r))](
            x2d,
            lora_A,
            xa,
            rng.contiguous() if dropout else x2d,  # the kernel reads (seed, offset) at rng_ptr, rng_ptr + 1
            rows,
            in_features,
            rank,
            _threshold(dropout_p),
            keep_scale,
            DROPOUT=dropout,
            DOT_IN_FP32=dot_in_fp32,
            DOT_PRECISION=precision,
            BLOCK_M=BLOCK_M,
            BLOCK_R=block_r,
            BLOCK_K=BLOCK_K,
        )
    if out_features == 0:
        return
    nf4 = base.kind == "nf4"
    weight = x2d if nf4 else base.weight.contiguous()
    packed, absmax, code = (
        (base.packed, base.absmax.float().contiguous(), base.code.float().contiguous()) if nf4 else (x2d, x2d, x2d)
    )
    fp32 = x2d.dtype == torch.float32
    _forward_kernel[(triton.cdiv(rows, BLOCK_M), triton.cdiv(out_features, BLOCK_N))](
        x2d,
        weight,
        packed,
        absmax,
        code,
        x2d if bias is None else bias,
        lora_B,
        xa,
        y,
        rows,
        out_features,
        in_features,
        rank,
        scaling,
        BASE_NF4=nf4,
        BLOCKSIZE=base.blocksize if nf4 else 1,
        HAS_BIAS=bias is not None,
        DOT_IN_FP32=dot_in_fp32,
        DOT_PRECISION=precision,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        BLOCK_R=_rank_step(rank, FP32_MAX_BLOCK_R if fp32 else MAX_BLOCK_R),
        num_warps=8 if fp32 else 4,
    )


def dropout_into(src, dst, rng, dropout_p: float, keep_scale: float, alpha: float, accumulate: bool) -> None:
    """dst (+)= alpha * src * keep * keep_scale; src, dst contiguous, same shape and dtype; rng int64 [2]."""
    numel = src.numel()
    if numel == 0:
        return
    _dropout_kernel[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](
        src,
        dst,
        rng.contiguous(),  # the kernel reads (seed, offset) at rng_ptr, rng_ptr + 1
        numel,
        _threshold(dropout_p),
        keep_scale,
        alpha,
        ACCUMULATE=accumulate,
        BLOCK=ELEMENTWISE_BLOCK,
    )
