"""Rotary position embedding (RoPE) in Triton: q and k in one launch, fp32 compute.

One head row x[0:D] with cos/sin rows c, s of width R (R even, <= D): channels [0, R) rotate,
[R, D) are copied. Each rotated pair (a, b) is (i, i + R/2) in HF's rotate_half layout and
(2j, 2j + 1) in GPT-J's interleaved layout:
  forward : y[a] = x[a]*c[a] - x[b]*s[a]     y[b] = x[b]*c[b] + x[a]*s[b]
  backward: y[a] = x[a]*c[a] + x[b]*s[b]     y[b] = x[b]*c[b] - x[a]*s[a]
(the backward is the transpose of the forward's 2x2 rotations). Each product and the sum round once, as in
transformers' q * cos + rotate_half(q) * sin and in autograd's two gradient terms: fp32 gives its bits, forward
and backward, so the launch turns off fp fusion (a GPU build would fuse a product into the sum).
Grid: one program per (batch, position); it reads that cos/sin row once, then rotates all q heads and
all k heads in [BLOCK_H, R/2] tiles (pair halves loaded as two tiles, so each element is read once).
q [B, Hq, S, D], k [B, Hk, S, D], q_out, k_out: any strides with the last one 1, outputs not aliasing
inputs; cos, sin [Bc, S, R], Bc in (1, B) (1 broadcasts), same strides, last stride 1; one dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

_TILE_ELEMENTS = 2048  # target elements of one [BLOCK_H, BLOCK_HALF] tile


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    x_head_stride,
    out_head_stride,
    n_heads,
    first,
    second,
    pair_mask,
    c_first,
    c_second,
    p_first,
    p_second,
    rot_dim,
    head_dim,
    BLOCK_H: tl.constexpr,
    HAS_PASS: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    """out[h, a] = x[h, a]*c[a] + x[h, b]*p[a] (and a<->b) for heads [0, n_heads); copies [R, D)."""
    for h_start in range(0, n_heads, BLOCK_H):
        head = (h_start + tl.arange(0, BLOCK_H)).to(tl.int64)
        head_mask = (head < n_heads)[:, None]
        x_rows = x_ptr + head[:, None] * x_head_stride
        out_rows = out_ptr + head[:, None] * out_head_stride
        mask = head_mask & pair_mask[None, :]
        x_first = tl.load(x_rows + first[None, :], mask=mask, other=0.0).to(tl.float32)
        x_second = tl.load(x_rows + second[None, :], mask=mask, other=0.0).to(tl.float32)
        y_first = x_first * c_first[None, :] + x_second * p_first[None, :]
        y_second = x_second * c_second[None, :] + x_first * p_second[None, :]
        tl.store(out_rows + first[None, :], y_first.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_rows + second[None, :], y_second.to(out_ptr.dtype.element_ty), mask=mask)
        if HAS_PASS:
            col = rot_dim + tl.arange(0, BLOCK_PASS)
            pass_mask = head_mask & (col < head_dim)[None, :]
            tl.store(out_rows + col[None, :], tl.load(x_rows + col[None, :], mask=pass_mask), mask=pass_mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_s,
    k_stride_b,
    k_stride_h,
    k_stride_s,
    qo_stride_b,
    qo_stride_h,
    qo_stride_s,
    ko_stride_b,
    ko_stride_h,
    ko_stride_s,
    cos_stride_b,
    cos_stride_s,
    seq,
    q_heads,
    k_heads,
    head_dim,
    half_rot,
    INTERLEAVED: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_PASS: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // seq).to(tl.int64)
    s = (pid % seq).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    pair_mask = j < half_rot
    if INTERLEAVED:
        first, second = 2 * j, 2 * j + 1
    else:
        first, second = j, j + half_rot
    cos_row = cos_ptr + b * cos_stride_b + s * cos_stride_s
    sin_row = sin_ptr + b * cos_stride_b + s * cos_stride_s
    c_first = tl.load(cos_row + first, mask=pair_mask, other=0.0).to(tl.float32)
    c_second = tl.load(cos_row + second, mask=pair_mask, other=0.0).to(tl.float32)
    s_first = tl.load(sin_row + first, mask=pair_mask, other=0.0).to(tl.float32)
    s_second = tl.load(sin_row + second, mask=pair_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        p_first, p_second = s_second, -s_first
    else:
        p_first, p_second = -s_first, s_second
    rot_dim = 2 * half_rot
    _rotate_heads(
        q_ptr + b * q_stride_b + s * q_stride_s,
        q_out_ptr + b * qo_stride_b + s * qo_stride_s,
        q_stride_h,
        qo_stride_h,
        q_heads,
        first,
        second,
        pair_mask,
        c_first,
        c_second,
        p_first,
        p_second,
        rot_dim,
        head_dim,
        BLOCK_H,
        HAS_PASS,
        BLOCK_PASS,
    )
    _rotate_heads(
        k_ptr + b * k_stride_b + s * k_stride_s,
        k_out_ptr + b * ko_stride_b + s * ko_stride_s,
        k_stride_h,
        ko_stride_h,
        k_heads,
        first,
        second,
        pair_mask,
        c_first,
        c_second,
        p_first,
        p_second,
        rot_dim,
        head_dim,
        BLOCK_H,
        HAS_PASS,
        BLOCK_PASS,
    )


def rope(q, k, q_out, k_out, cos, sin, interleaved: bool, backward: bool) -> None:
    """Fills q_out = rope(q), k_out = rope(k) (backward=True: the transpose, for gradients)."""
    batch, q_heads, seq, head_dim = q.shape
    k_heads = k.shape[1]
    if batch * seq == 0 or q.numel() + k.numel() == 0:
        return
    half_rot = cos.shape[-1] // 2
    block_half = triton.next_power_of_2(max(half_rot, 1))
    block_h = min(triton.next_power_of_2(max(q_heads, k_heads)), max(1, _TILE_ELEMENTS // block_half))
    pass_width = head_dim - 2 * half_rot
    cos_stride_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope_kernel[(batch * seq,)](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        cos_stride_b,
        cos.stride(1),
        seq,
        q_heads,
        k_heads,
        head_dim,
        half_rot,
        INTERLEAVED=interleaved,
        BACKWARD=backward,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        HAS_PASS=pass_width > 0,
        BLOCK_PASS=triton.next_power_of_2(max(pass_width, 1)),
        num_warps=max(1, min(4, block_h * block_half // 256)),
        enable_fp_fusion=False,
    )
