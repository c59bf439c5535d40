"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) in PyTorch: the oracle of the tests and the fallback.

Shapes: x [M, d] (leading dims flattened), W_d [r, d], b_d [r], W_u [d, r], b_u [d], s = scaling.
    h = x W_d^T + b_d            [M, r]   kept for backward
    a = act(h)                   act: relu, gelu (erf) or silu ("swish" in the papers' code)
    y = x + s (a W_u^T + b_u)    the residual around the adapter: W_u = 0, b_u = 0 make it the identity
Backward, g = dY:
    dW_u = s g^T a      db_u = s sum_rows(g)      da = s g W_u      dh = da * act'(h)
    dW_d = dh^T x       db_d = sum_rows(dh)       dX = g + dh W_d
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu")


def activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu":
        return F.relu(h)
    if kind == "gelu":
        return F.gelu(h)
    return F.silu(h)


def activation_grad(h: torch.Tensor, kind: str) -> torch.Tensor:
    """act'(h), computed in h's dtype (fp32 math for 16-bit h, rounded once)."""
    c = torch.float64 if h.dtype == torch.float64 else torch.float32
    hc = h.to(c)
    if kind == "relu":
        grad = (hc > 0).to(c)
    elif kind == "gelu":  # d/dh [h Phi(h)] = Phi(h) + h phi(h)
        grad = 0.5 * (1.0 + torch.erf(hc * 0.7071067811865476)) + hc * torch.exp(-0.5 * hc * hc) * 0.3989422804014327
    else:  # d/dh [h sigmoid(h)] = sigmoid(h) (1 + h (1 - sigmoid(h)))
        sig = torch.sigmoid(hc)
        grad = sig * (1.0 + hc * (1.0 - sig))
    return grad.to(h.dtype)


def bottleneck_forward(x, down_weight, down_bias, up_weight, up_bias, scaling: float, kind: str):
    """(y [..., d], h [M, r])."""
    x2d = x.reshape(-1, x.shape[-1])
    h = F.linear(x2d, down_weight, down_bias)
    y = x2d + F.linear(activation(h, kind), up_weight, up_bias) * scaling
    return y.view(x.shape), h


def bottleneck_backward(dy, x, down_weight, up_weight, h, scaling: float, kind: str, needs_input_grad: bool):
    """(dx, dW_d, db_d, dW_u, db_u); dx empty unless needs_input_grad."""
    g = dy.reshape(-1, dy.shape[-1])
    x2d = x.reshape(-1, x.shape[-1])
    a = activation(h, kind)
    grad_up_weight = (g.t() @ a) * scaling
    grad_up_bias = g.sum(0) * scaling
    dh = ((g @ up_weight) * scaling) * activation_grad(h, kind)
    grad_down_weight = dh.t() @ x2d
    grad_down_bias = dh.sum(0)
    dx = (g + dh @ down_weight).view(x.shape) if needs_input_grad else x.new_empty(0)
    return dx, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias
