"""SwiGLU forward and backward in Triton, elementwise over flat buffers, fp32 compute.

forward:   s = sigmoid(g),  out = g * s * u
backward:  dup = dy * g * s,  dgate = dy * u * s * (1 + g * (1 - s))
(s is recomputed from g in the backward, never saved). One rounding at each store.
gate, up, out, dy, dgate, dup: contiguous, numel elements, one dtype; 1-D grid of BLOCK-element
programs with int64 offsets.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _forward_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dup_ptr + offs, (dy * g * s).to(dup_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)


def _launch_config(numel: int) -> tuple[tuple[int], int, int]:
    block = min(BLOCK, triton.next_power_of_2(numel))
    return (triton.cdiv(numel, block),), block, max(1, min(4, block // 256))


def swiglu_forward(gate, up, out) -> None:
    """Fills out = silu(gate) * up."""
    numel = gate.numel()
    if numel == 0:
        return
    grid, block, num_warps = _launch_config(numel)
    _forward_kernel[grid](gate, up, out, numel, BLOCK=block, num_warps=num_warps)


def swiglu_backward(dy, gate, up, dgate, dup) -> None:
    """Fills dgate and dup from dy, gate, up."""
    numel = gate.numel()
    if numel == 0:
        return
    grid, block, num_warps = _launch_config(numel)
    _backward_kernel[grid](dy, gate, up, dgate, dup, numel, BLOCK=block, num_warps=num_warps)
