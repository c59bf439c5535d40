"""Bottleneck adapters: custom ops, backend table, autograd and the public bottleneck_adapter.

    y = x + s * (act(x W_d^T + b_d) W_u^T + b_u)        W_d [r, d], W_u [d, r]; act relu / gelu / silu
(the math of forward and backward in pyfastpeft/reference/bottleneck.py). Ops:
  pyfastpeft::bottleneck_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, activation) -> (y, h)
  pyfastpeft::bottleneck_backward(dy, x, down_weight, up_weight, h, scaling, activation, needs_input_grad)
      -> (dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias)
activation: 0 relu, 1 gelu (erf), 2 silu. h = x W_d^T + b_d [M, r] in x's dtype; dx is empty when not needed.

The native implementation is two GEMM calls a pass, each writing its result once: forward, h = addmm(b_d, x, W_d^T)
and y = addmm(x, [a | 1], [W_u^T ; b_u], alpha=s), the up-projection, its bias and the residual in one call (b_u rides
as one more row of W_u^T against a column of ones); backward, [a | 1]^T dY gives dW_u and db_u together and
dX = addmm(dY, dh, W_d) folds the residual's gradient in. The eager module (two nn.Linear, the activation, a scale
and the residual add) makes three more passes over [M, d] each way. Autograd saves x and h, never a.
"""

from __future__ import annotations

import math

import torch

from pyfastpeft.backend import carry_backend
from pyfastpeft.ops._autocast import autocast_dtype, cast_like_linear
from pyfastpeft.ops._checks import FLOAT_DTYPES, check_dtype, check_int, check_real, check_same_device, check_tensor
from pyfastpeft.ops._library import define_op
from pyfastpeft.reference import bottleneck as ref

ACTIVATION_CODES = {name: code for code, name in enumerate(ref.ACTIVATIONS)}


def _kind(activation: int) -> str:
    return ref.ACTIVATIONS[activation]


def _reference_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, activation):
    y, h = ref.bottleneck_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, _kind(activation))
    return y.contiguous(), h.contiguous()


def _reference_backward(dy, x, down_weight, up_weight, h, scaling, activation, needs_input_grad):
    return tuple(
        t.contiguous()
        for t in ref.bottleneck_backward(dy, x, down_weight, up_weight, h, scaling, _kind(activation), needs_input_grad)
    )


def _with_ones(a: torch.Tensor) -> torch.Tensor:
    """[a | 1]: a [M, r] with a column of ones appended."""
    out = a.new_empty((a.shape[0], a.shape[1] + 1))
    out[:, :-1] = a
    out[:, -1] = 1
    return out


def _native_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, activation):
    d = x.shape[-1]
    x2d = x.reshape(-1, d).contiguous()
    h = torch.addmm(down_bias, x2d, down_weight.t())
    up = torch.cat([up_weight.t(), up_bias.unsqueeze(0)])  # [r + 1, d]: b_u as the last row
    y = torch.addmm(x2d, _with_ones(ref.activation(h, _kind(activation))), up, alpha=scaling)
    return y.view(x.shape), h


def _native_backward(dy, x, down_weight, up_weight, h, scaling, activation, needs_input_grad):
    d = x.shape[-1]
    g = dy.reshape(-1, d).contiguous()
    x2d = x.reshape(-1, d)
    kind = _kind(activation)
    grad_up = (_with_ones(ref.activation(h, kind)).t() @ g).mul_(scaling)  # [r + 1, d]: dW_u^T over db_u
    dh = torch.mm(g, up_weight).mul_(scaling).mul_(ref.activation_grad(h, kind))
    grad_down_weight = dh.t() @ x2d
    grad_down_bias = dh.sum(0)
    dx = torch.addmm(g, dh, down_weight).view(x.shape) if needs_input_grad else x.new_empty(0)
    return dx, grad_down_weight, grad_down_bias, grad_up[:-1].t().contiguous(), grad_up[-1].clone()


def check_bottleneck_args(op: str, x, down_weight, down_bias, up_weight, up_bias, scaling, activation) -> int:
    """x [..., d] float; W_d [r, d], b_d [r], W_u [d, r], b_u [d] in x's dtype; scaling finite; activation a code.
    Returns the rank r."""
    check_dtype(op, "x", x, FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension")
    d = x.shape[-1]
    for name, t, dim in (("down_weight", down_weight, 2), ("up_weight", up_weight, 2)):
        check_dtype(op, name, t, (x.dtype,))
        if t.dim() != dim:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    r = down_weight.shape[0]
    if down_weight.shape[1] != d:
        raise ValueError(f"{op}: down_weight is {tuple(down_weight.shape)}, expected [r, {d}] (x's last dim)")
    if tuple(up_weight.shape) != (d, r):
        raise ValueError(f"{op}: up_weight is {tuple(up_weight.shape)}, expected [{d}, {r}]")
    for name, t, size in (("down_bias", down_bias, r), ("up_bias", up_bias, d)):
        if t is None:
            continue
        check_dtype(op, name, t, (x.dtype,))
        if tuple(t.shape) != (size,):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected [{size}]")
    if scaling is not None:
        check_real(op, "scaling", scaling)
    check_int(op, "activation", activation, low=0, high=len(ref.ACTIVATIONS) - 1)
    return r


def _check_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, activation):
    check_bottleneck_args("bottleneck_forward", x, down_weight, down_bias, up_weight, up_bias, scaling, activation)


def _check_backward(dy, x, down_weight, up_weight, h, scaling, activation, needs_input_grad):
    op = "bottleneck_backward"
    r = check_bottleneck_args(op, x, down_weight, None, up_weight, None, scaling, activation)
    check_dtype(op, "dy", dy, (x.dtype,))
    if dy.shape != x.shape:
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, x has {tuple(x.shape)}")
    check_dtype(op, "h", h, (x.dtype,))
    rows = math.prod(x.shape[:-1])
    if tuple(h.shape) != (rows, r):
        raise ValueError(f"{op}: h has shape {tuple(h.shape)}, expected [{rows}, {r}]")


def _fake_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, activation):
    return x.new_empty(x.shape), x.new_empty((math.prod(x.shape[:-1]), down_weight.shape[0]))


def _fake_backward(dy, x, down_weight, up_weight, h, scaling, activation, needs_input_grad):
    dx = x.new_empty(x.shape) if needs_input_grad else x.new_empty(0)
    r, d = down_weight.shape
    return dx, x.new_empty((r, d)), x.new_empty(r), x.new_empty((d, r)), x.new_empty(d)


bottleneck_forward = define_op(
    "bottleneck_forward",
    "(Tensor x, Tensor down_weight, Tensor down_bias, Tensor up_weight, Tensor up_bias, float scaling, "
    "int activation) -> (Tensor, Tensor)",
    family="bottleneck",
    fake=_fake_forward,
    reference=_reference_forward,
    native=_native_forward,
    triton=_reference_forward,  # two GEMMs and an [M, r] activation: torch's GEMMs on the GPU, no Triton kernel
    check=_check_forward,
)
bottleneck_backward = define_op(
    "bottleneck_backward",
    "(Tensor dy, Tensor x, Tensor down_weight, Tensor up_weight, Tensor h, float scaling, int activation, "
    "bool needs_input_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    family="bottleneck",
    fake=_fake_backward,
    reference=_reference_backward,
    native=_native_backward,
    triton=_reference_backward,
    check=_check_backward,
)


@carry_backend
class BottleneckFunction(torch.autograd.Function):
    """y = x + s (act(x W_d^T + b_d) W_u^T + b_u); saves x and h [M, r]."""

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, scaling: float, activation: int):
        y, h = bottleneck_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, activation)
        ctx.save_for_backward(x, down_weight, up_weight, h)
        ctx.settings = (scaling, activation)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, down_weight, up_weight, h = ctx.saved_tensors
        scaling, activation = ctx.settings
        needs = ctx.needs_input_grad
        grads = bottleneck_backward(dy.contiguous(), x, down_weight, up_weight, h, scaling, activation, needs[0])
        dx, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias = grads
        return (
            dx if needs[0] else None,
            grad_down_weight if needs[1] else None,
            grad_down_bias if needs[2] else None,
            grad_up_weight if needs[3] else None,
            grad_up_bias if needs[4] else None,
            None,
            None,
        )


def bottleneck_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    scaling: float = 1.0,
    activation: str = "relu",
) -> torch.Tensor:
    """x + scaling * (act(x W_d^T + b_d) W_u^T + b_u), a bottleneck adapter with its residual (Houlsby et al. 2019);
    differentiable w.r.t. x and the four parameters. down_weight [r, d], down_bias [r], up_weight [d, r], up_bias
    [d]; activation "relu", "gelu" or "silu". Under autocast every float input is cast as F.linear's are."""
    fn = "bottleneck_adapter"
    check_tensor(fn, "x", x, min_dim=1)
    for name, t in (
        ("down_weight", down_weight),
        ("down_bias", down_bias),
        ("up_weight", up_weight),
        ("up_bias", up_bias),
    ):
        check_tensor(fn, name, t)
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"{fn}: activation must be one of {list(ACTIVATION_CODES)}, got {activation!r}")
    scaling = check_real(fn, "scaling", scaling)
    x, down_weight, down_bias, up_weight, up_bias = cast_like_linear(
        autocast_dtype(x), x, down_weight, down_bias, up_weight, up_bias
    )
    check_same_device(fn, x=x, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight, up_bias=up_bias)
    code = ACTIVATION_CODES[activation]
    check_bottleneck_args(fn, x, down_weight, down_bias, up_weight, up_bias, scaling, code)
    return BottleneckFunction.apply(x, down_weight, down_bias, up_weight, up_bias, scaling, code)
