"""LoRA in Triton: one fused forward kernel over a dense or NF4 base, and the masked elementwise kernel of
the backward (whose GEMMs run in torch, pyfastpeft/ops/lora.py).

forward, x [M, K], W [N, K] frozen, A [R, K], B [N, R], s = scaling (pyfastpeft/reference/lora.py has the math):
    acc   = x W^T                    fp32 [BLOCK_M, BLOCK_N], over the K loop
    acc_a = x_d A^T                  fp32 [BLOCK_M, BLOCK_R], the same K loop: each x tile is read once
    y     = acc + b + s * round_x(acc_a) B^T       in the epilogue
where x_d = x * keep * keep_scale (rounded to x's dtype), keep = tl.rand(seed, uint32(offset + m * K + k)) >
threshold: the shared Philox mask, applied on the A branch only. The xa output (round_x(acc_a)) is written
by the programs of the first N block; every N block computes acc_a again (R / BLOCK_N more work than x W^T
alone, in place of a second pass over x or a dependency between programs). With an NF4 base the K loop
dequantizes the W tile from its packed bytes: element f = n * K + k is nibble f % 2 of byte f // 2 (high
nibble first), code[nibble] * absmax[f // blocksize]. Rank tiles are padded with zeros to BLOCK_R =
max(16, next power of two of R).

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

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
ELEMENTWISE_BLOCK = 1024


@triton.jit
def _forward_kernel(x_ptr, w_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr, rng_ptr,
                    M, N, K, R, blocksize, scaling, threshold, keep_scale,
                    BASE_NF4: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_mask, col_mask, rank_mask = rows < M, cols < N, ranks < R
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x_index = rows[:, None] * K + ks[None, :]
        x = tl.load(x_ptr + x_index, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
        w_mask = col_mask[:, None] & k_mask[None, :]
        w_index = cols[:, None] * K + ks[None, :]
        if BASE_NF4:
            byte = tl.load(packed_ptr + w_index // 2, mask=w_mask, other=0).to(tl.int32)
            nibble = tl.where(w_index % 2 == 0, byte >> 4, byte & 0xF)
            w = tl.load(code_ptr + nibble) * tl.load(absmax_ptr + w_index // blocksize, mask=w_mask, other=0.0)
            w = w.to(x.dtype)
        else:
            w = tl.load(w_ptr + w_index, mask=w_mask, other=0.0)
            if DOT_IN_FP32:
                w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        a_t = tl.load(a_ptr + ranks[None, :] * K + ks[:, None], mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            a_t = a_t.to(tl.float32)
        if DROPOUT:
            u = tl.rand(seed, (offset + x_index).to(tl.uint32))
            x_dropped = tl.where(u > threshold, x.to(tl.float32) * keep_scale, 0.0).to(x_ptr.dtype.element_ty)
            acc_a = tl.dot(x_dropped.to(x.dtype), a_t, acc_a, input_precision=DOT_PRECISION)
        else:
            acc_a = tl.dot(x, a_t, acc_a, input_precision=DOT_PRECISION)
    xa = acc_a.to(xa_ptr.dtype.element_ty)
    if pid_n == 0:
        tl.store(xa_ptr + rows[:, None] * R + ranks[None, :], xa, mask=row_mask[:, None] & rank_mask[None, :])
    b_t = tl.load(b_ptr + cols[None, :] * R + ranks[:, None], mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
    if DOT_IN_FP32:
        xa = xa.to(tl.float32)
        b_t = b_t.to(tl.float32)
    y = acc + scaling * tl.dot(xa, b_t, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


# src, dst: contiguous [numel] of one dtype; rng: int64 [2] (seed, offset).
#   dst = (ACCUMULATE ? dst : 0) + alpha * (keep ? src * keep_scale : 0)    in fp32, rounded once
@triton.jit
def _dropout_kernel(src_ptr, dst_ptr, rng_ptr, numel, threshold, keep_scale, alpha,
                    ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < numel
    src = tl.load(src_ptr + index, mask=mask, other=0.0).to(tl.float32)
    u = tl.rand(tl.load(rng_ptr), (tl.load(rng_ptr + 1) + index).to(tl.uint32))
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


def lora_forward(x2d, base, bias, lora_A, lora_B, y, xa, scaling: float, dropout_p: float, keep_scale: float,
                 rng) -> None:
    """Fills y [M, N] and xa [M, R] (x's dtype) from contiguous x2d [M, K], lora_A [R, K], lora_B [N, R], bias
    [N] or empty, and base: pyfastpeft.ops.lora's _DenseBase (weight [N, K] contiguous, x's dtype) or _NF4Base
    (packed uint8, absmax fp32 de-nested, code fp32 [16]). rng: int64 [2] or empty (no dropout)."""
    rows, in_features = x2d.shape
    out_features, rank = lora_B.shape
    if rows == 0 or out_features == 0:
        return
    nf4 = base.kind == "nf4"
    weight = x2d if nf4 else base.weight.contiguous()
    packed, absmax, code = ((base.packed, base.absmax.float().contiguous(), base.code.float().contiguous()) if nf4
                            else (x2d, x2d, x2d))
    dropout = rng.numel() > 0
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(out_features, BLOCK_N))
    _forward_kernel[grid](
        x2d, weight, packed, absmax, code, bias if bias.numel() else x2d, lora_A, lora_B, y, xa,
        rng if dropout else x2d, rows, out_features, in_features, rank, base.blocksize if nf4 else 1, scaling,
        _threshold(dropout_p), keep_scale, BASE_NF4=nf4, HAS_BIAS=bias.numel() > 0, DROPOUT=dropout,
        DOT_IN_FP32=_dot_in_fp32(), DOT_PRECISION=_dot_precision(x2d.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        BLOCK_R=max(16, triton.next_power_of_2(rank)))


def dropout_into(src, dst, rng, dropout_p: float, keep_scale: float, alpha: float, accumulate: bool) -> None:
    """dst (+)= alpha * src * keep * keep_scale; src, dst contiguous, same shape and dtype; rng int64 [2]."""
    numel = src.numel()
    if numel == 0:
        return
    _dropout_kernel[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](
        src, dst, rng, numel, _threshold(dropout_p), keep_scale, alpha, ACCUMULATE=accumulate,
        BLOCK=ELEMENTWISE_BLOCK)
