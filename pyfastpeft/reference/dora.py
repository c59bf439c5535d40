"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) in PyTorch, PEFT's DoraLinearLayer math: the oracle
of the tests and the fallback on any device.

Shapes (PEFT's): x [M, in], W [out, in] frozen, A [r, in], B [out, r], s = scaling, m [out] the trained magnitude.
    n  = ||W + s B A||_row                         [out], detached (the paper's section 4.3, as PEFT does)
    g  = m / n                                     [out]
    y  = x W^T + b + (g - 1) * (x_d W^T) + g * s (x_d A^T) B^T           x_d = dropout(x) (x itself without)
Without dropout that is g * (x W^T + s xa B^T) + b, PEFT's path through the base layer's result. With
    z = x_d W^T + s xa B^T     [M, out]     (kept for backward)     xa = x_d A^T [M, r]
the output is y = x W^T + b - x_d W^T + g * z, and the backward (n constant, g_dY = g * dY) is
    dm = sum over rows of (dY * z) / n
    dA = s (g_dY B)^T x_d       dB = s g_dY^T xa
    dX = dY W + D[(g_dY - dY) W + s (g_dY B) A]                            D[v] = v * keep / (1 - p)
(without dropout D is the identity and dX = g_dY W + s (g_dY B) A: LoRA's backward of g_dY).

Precision: n, g and the combinations with them run in fp32 (fp64 for fp64 inputs) and round once to x's dtype; the
products run in x's dtype as PEFT's eager modules do. PEFT computes n in x's dtype; fp32 is never worse.
"""

from __future__ import annotations

import torch

from pyfastpeft.reference.lora import dropout


def compute_dtype(*tensors) -> torch.dtype:
    """fp64 when any tensor is fp64, else fp32: the dtype of n, g and the combinations."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| over each row of the dense [out, in] W, in fp32 (fp64 if any input is): PEFT's
    get_weight_norm with the whole matrix built."""
    c = compute_dtype(weight, lora_A, lora_B)
    return torch.linalg.vector_norm(weight.to(c) + scaling * (lora_B.to(c) @ lora_A.to(c)), dim=1)


def dora_forward(x, base_forward, bias, lora_A, lora_B, magnitude, norm, scaling: float, dropout_p: float, rng):
    """(y [..., out], xa [M, r], z [M, out]); base_forward(x2d, bias) = x W^T + b, norm = weight_norm(...)."""
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    x2d = x.reshape(-1, in_features)
    c = compute_dtype(x, norm)
    x_d = dropout(x2d, dropout_p, rng)
    xa = x_d @ lora_A.t()
    lora = (xa @ lora_B.t()) * scaling
    base_d = base_forward(x_d, None)
    z = base_d + lora
    g = magnitude.to(c) / norm.to(c)
    if rng is None:
        y = g * (base_d.to(c) + lora.to(c))
        if bias is not None:
            y = y + bias.to(c)
    else:
        y = base_forward(x2d, bias).to(c) + (g - 1) * base_d.to(c) + g * lora.to(c)
    return y.to(x.dtype).view(*x.shape[:-1], out_features), xa, z


def dora_backward(
    dy,
    x,
    base_grad_input,
    lora_A,
    lora_B,
    xa,
    z,
    magnitude,
    norm,
    scaling: float,
    dropout_p: float,
    rng,
    needs_input_grad,
):
    """(dx, dA, dB, dm): dx empty unless needs_input_grad; dm in the compute dtype (fp32, fp64 for fp64)."""
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    dy2d = dy.reshape(-1, out_features)
    x2d = x.reshape(-1, in_features)
    c = compute_dtype(x, norm)
    g = magnitude.to(c) / norm.to(c)
    dm = (dy2d.to(c) * z.to(c)).sum(0) / norm.to(c)
    g_dy = (g * dy2d.to(c)).to(dy.dtype)
    grad_xa = g_dy @ lora_B
    x_d = dropout(x2d, dropout_p, rng)
    grad_A = (grad_xa.t() @ x_d) * scaling
    grad_B = (g_dy.t() @ xa) * scaling
    if not needs_input_grad:
        return x.new_empty(0), grad_A, grad_B, dm
    through_lora = base_grad_input(g_dy) + (grad_xa @ lora_A) * scaling
    if rng is None:
        dx = through_lora
    else:
        through_base = base_grad_input(dy2d)
        dx = through_base + dropout(through_lora - through_base, dropout_p, rng)
    return dx.view(x.shape), grad_A, grad_B, dm
