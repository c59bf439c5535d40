"""RoPE reference, HF's formula: y = x * cos + rotate(x) * sin on the leading cos.shape[-1] channels.

Layouts: q [B, Hq, S, D], k [B, Hk, S, D] (any strides); cos, sin [Bc, S, R] with Bc in (1, B),
R even and <= D; channels [R, D) pass through. rotate is HF's rotate_half ([-x2, x1]) or, when
interleaved, GPT-J's rotate_every_two (pairs (2j, 2j+1) -> (-x[2j+1], x[2j])).
The backward is the transpose of that linear map: dx = dy * cos - rotate(dy * sin).
"""

from __future__ import annotations

import torch


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _apply(x, cos, sin, interleaved: bool, backward: bool):
    rot = cos.shape[-1]
    rotate = rotate_every_two if interleaved else rotate_half
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    y = x_rot * c - rotate(x_rot * s) if backward else x_rot * c + rotate(x_rot) * s
    return torch.cat((y, x_pass), dim=-1) if x_pass.shape[-1] else y


def rope(q, k, cos, sin, interleaved: bool, backward: bool):
    """(q_out, k_out) as new tensors; backward=True applies the transpose (for gradients)."""
    return _apply(q, cos, sin, interleaved, backward), _apply(k, cos, sin, interleaved, backward)
