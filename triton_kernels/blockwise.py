"""The 8-bit Adam and Lion steps in Triton: one program per 256-element state block, the math of
pyfastpeft/reference/blockwise.py (dequantize, update, requantize to the nearest code, bnb's sign rule).

p, g: [numel] of one dtype; state1, state2 uint8 [numel]; absmax1, absmax2 fp32 [ceil(numel / 256)]; code fp32 [256]
and its 255 fp32 midpoints (computed by the launcher, on the device). All contiguous; int64 offsets. The nearest
code is a branch-free binary search over the midpoints (8 gathers); square roots and divisions are correctly rounded
(sqrt_rn, div_rn) as the CPU kernels' are, and the launchers turn off fp fusion: a GPU build would otherwise fuse
m * beta1 + (1 - beta1) * g and its kin into multiply-adds, which round once where the reference rounds twice.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .nf4 import _max_keeping_nan

BLOCK = 256  # the states' blocksize: one absmax per program


@triton.jit
def _nearest(scaled, mid_ptr):
    """Number of midpoints strictly below each scaled value (NaN: above all of them, 255)."""
    idx = tl.zeros(scaled.shape, tl.int32)
    for shift in tl.static_range(7, -1, -1):
        step = 1 << shift
        mid = tl.load(mid_ptr + idx + (step - 1))
        idx = tl.where(scaled <= mid, idx, idx + step)
    return idx


@triton.jit
def _requantize(state, mask, full, code_ptr, mid_ptr, out_ptr, absmax_ptr, offs, block, SIGNED: tl.constexpr):
    """quantize_blockwise(state, code, 256) of one block into out and absmax; the sign rule when SIGNED.
    A NaN state makes the absmax NaN and takes code 255 (254 with its sign bit set), as torch's amax, clamp and
    bucketize give in the reference: the max, floor and clamp keep NaN by comparisons (a GPU's min/max drop it)."""
    amax = tl.reduce(tl.where(mask, tl.abs(state), 0.0), 0, _max_keeping_nan)
    floor = tl.where(amax < 1e-38, 1e-38, amax)
    scaled = tl.where(full, state * tl.math.div_rn(1.0, floor), tl.math.div_rn(state, floor))
    scaled = tl.where(scaled < -1.0, -1.0, tl.where(scaled > 1.0, 1.0, scaled))
    idx = _nearest(scaled, mid_ptr)
    if SIGNED:
        code_negative = tl.load(code_ptr + idx).to(tl.int32, bitcast=True) < 0
        state_negative = state.to(tl.int32, bitcast=True) < 0
        idx = tl.where(code_negative != state_negative, idx + tl.where(state > 0.0, 1, -1), idx)
        idx = tl.minimum(tl.maximum(idx, 0), 255)
    tl.store(out_ptr + offs, idx.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + block, tl.where(full, amax, floor))


@triton.jit
def _load_block(p_ptr, g_ptr, numel, BLOCK_SIZE: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    offs = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    full = numel - block * BLOCK_SIZE >= BLOCK_SIZE
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ok = (g == g) & (tl.abs(g) != float("inf"))
    return block, offs, mask, full, tl.where(ok, g, 0.0), p, ok


@triton.jit
def _adam_kernel(
    p_ptr, g_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, code1_ptr, code2_ptr, mid1_ptr, mid2_ptr, numel,
    step_size, correction2_eps, beta1, beta2, one_minus_beta1, one_minus_beta2, decay,
    APPLY_DECAY: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    block, offs, mask, full, g, p, ok = _load_block(p_ptr, g_ptr, numel, BLOCK_SIZE)
    c1 = tl.load(s1_ptr + offs, mask=mask, other=0).to(tl.int32)
    c2 = tl.load(s2_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(code1_ptr + c1) * tl.load(a1_ptr + block)
    v = tl.load(code2_ptr + c2) * tl.load(a2_ptr + block)
    v = v * beta2 + one_minus_beta2 * g * g
    m = m * beta1 + one_minus_beta1 * g
    updated = p + step_size * tl.math.div_rn(m, tl.sqrt_rn(v) + correction2_eps)
    if APPLY_DECAY:
        updated = updated * decay
    tl.store(p_ptr + offs, tl.where(ok, updated, p).to(p_ptr.dtype.element_ty), mask=mask)
    keep = ok & mask
    _requantize(tl.where(keep, m, 0.0), mask, full, code1_ptr, mid1_ptr, s1_ptr, a1_ptr, offs, block, True)
    _requantize(tl.where(keep, v, 0.0), mask, full, code2_ptr, mid2_ptr, s2_ptr, a2_ptr, offs, block, False)


@triton.jit
def _lion_kernel(
    p_ptr, g_ptr, s1_ptr, a1_ptr, code1_ptr, mid1_ptr, numel, lr, beta1, beta2, one_minus_beta1, one_minus_beta2,
    decay, APPLY_DECAY: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    block, offs, mask, full, g, p, ok = _load_block(p_ptr, g_ptr, numel, BLOCK_SIZE)
    c1 = tl.load(s1_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(code1_ptr + c1) * tl.load(a1_ptr + block)
    blend = m * beta1 + one_minus_beta1 * g
    sign = tl.where(blend > 0.0, 1.0, tl.where(blend < 0.0, -1.0, 0.0))  # torch.sign: +0 for +-0 and NaN
    updated = p * decay if APPLY_DECAY else p
    updated = updated - lr * sign
    tl.store(p_ptr + offs, tl.where(ok, updated, p).to(p_ptr.dtype.element_ty), mask=mask)
    m = m * beta2 + one_minus_beta2 * g
    _requantize(tl.where(ok & mask, m, 0.0), mask, full, code1_ptr, mid1_ptr, s1_ptr, a1_ptr, offs, block, True)


def _midpoints(code):
    code = code.float()
    return ((code[:-1] + code[1:]) / 2).contiguous()


def _f32(value: float) -> float:
    """value rounded to fp32, as the reference's fp32 arithmetic sees it."""
    import struct

    return struct.unpack("f", struct.pack("f", value))[0]


def adam8bit_step(
    p, g, state1, state2, absmax1, absmax2, code1, code2, step_size, correction2_eps, beta1, beta2, decay
):
    numel = p.numel()
    if numel == 0:
        return
    grid = (triton.cdiv(numel, BLOCK),)
    _adam_kernel[grid](
        p, g, state1, state2, absmax1, absmax2, code1, code2, _midpoints(code1), _midpoints(code2), numel,
        _f32(step_size), _f32(correction2_eps), _f32(beta1), _f32(beta2), _f32(1.0 - beta1), _f32(1.0 - beta2),
        _f32(decay), APPLY_DECAY=decay != 1.0, BLOCK_SIZE=BLOCK, num_warps=2, enable_fp_fusion=False,
    )  # fmt: skip


def lion8bit_step(p, g, state1, absmax1, code1, lr, beta1, beta2, decay):
    numel = p.numel()
    if numel == 0:
        return
    grid = (triton.cdiv(numel, BLOCK),)
    _lion_kernel[grid](
        p, g, state1, absmax1, code1, _midpoints(code1), numel, _f32(lr), _f32(beta1), _f32(beta2),
        _f32(1.0 - beta1), _f32(1.0 - beta2), _f32(decay), APPLY_DECAY=decay != 1.0, BLOCK_SIZE=BLOCK, num_warps=2,
        enable_fp_fusion=False,
    )  # fmt: skip
