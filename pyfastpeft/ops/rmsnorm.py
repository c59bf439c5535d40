"""RMSNorm: custom ops, backend table, autograd and the public function.

Ops (x: [..., n]; rstd: x.shape[:-1] in the compute dtype, fp32 or fp64 for fp64 x):
  pyfastpeft::rms_norm_forward(x, weight, eps, offset, casting_mode) -> (y, rstd)
  pyfastpeft::rms_norm_backward(dy, x, weight, rstd, offset, casting_mode, weight_grad) -> (dx, dw)
dw is empty when weight_grad is False (frozen norms in LoRA training skip that reduction).
The math and casting modes are in pyfastpeft/reference/rmsnorm.py and csrc/cpu/rmsnorm.cpp.
"""

from __future__ import annotations

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops import _dtensor
from pyfastpeft.ops._checks import (
    FLOAT_DTYPES,
    check_dtype,
    check_features,
    check_last_dim,
    check_numel,
    check_real,
    check_same_device,
    check_tensor,
)
from pyfastpeft.ops._library import define_op, triton_module
from pyfastpeft.reference import rmsnorm as ref
from pyfastpeft.reference._common import accumulate_dtype
from pyfastpeft.reference.rmsnorm import CASTING_CODES, CASTING_MODES, output_dtype

# (x dtype, y dtype) pairs the native kernels take; weight may be any float dtype.
_NATIVE_PAIRS = {(d, d) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)} | {
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
}


def _empty_outputs(x, weight, casting_mode, empty=torch.empty):
    y = empty(x.shape, dtype=output_dtype(x.dtype, weight.dtype, casting_mode), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=accumulate_dtype(x.dtype), device=x.device)
    return y, rstd


def forward_into(x, weight, y, rstd, eps: float, offset: float, casting_mode: str) -> None:
    """Native forward into preallocated y and rstd (contiguous; dtypes as the op's outputs)."""
    rows, n = x.numel() // x.shape[-1], x.shape[-1]
    args = (
        x,
        weight,
        y,
        rstd,
        rows,
        n,
        x.dtype,
        weight.dtype,
        y.dtype,
        eps,
        offset,
        CASTING_CODES[casting_mode],
    )
    _native.launch("rmsnorm_forward", x, *args)


def backward_into(dy, x, weight, rstd, dx, offset: float, casting_mode: str, weight_grad: bool):
    """Native backward into preallocated dx; returns dw (fp32/fp64 partial sums reduced) or None."""
    rows, n = x.numel() // x.shape[-1], x.shape[-1]
    if x.is_cuda:
        partials = max(1, min(rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count))
    else:
        partials = 1  # the CPU kernel sums dw itself, in an order independent of the thread count
    dw_partial = torch.empty((partials, n), dtype=rstd.dtype, device=x.device) if weight_grad else None
    args = (
        dy,
        x,
        weight,
        rstd,
        dx,
        dw_partial,
        rows,
        n,
        x.dtype,
        weight.dtype,
        dy.dtype,
        offset,
        CASTING_CODES[casting_mode],
    )
    _native.launch("rmsnorm_backward", x, *args, partials)
    return None if dw_partial is None else dw_partial.sum(0).to(weight.dtype)


def _native_forward(x, weight, eps, offset, casting_mode):
    y, rstd = _empty_outputs(x, weight, casting_mode, _native.empty)
    if (x.dtype, y.dtype) not in _NATIVE_PAIRS:
        return ref.rms_norm_forward(x, weight, eps, offset, casting_mode)
    if x.numel():
        forward_into(x.contiguous(), weight.contiguous(), y, rstd, eps, offset, casting_mode)
    return y, rstd


def _native_backward(dy, x, weight, rstd, offset, casting_mode, weight_grad):
    if (x.dtype, dy.dtype) not in _NATIVE_PAIRS or rstd.dtype != accumulate_dtype(x.dtype):
        return ref.rms_norm_backward(dy, x, weight, rstd, offset, casting_mode, weight_grad)
    dx = _native.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = None
    if x.numel():
        dw = backward_into(
            dy.contiguous(),
            x.contiguous(),
            weight.contiguous(),
            rstd.contiguous(),
            dx,
            offset,
            casting_mode,
            weight_grad,
        )
    if dw is None:
        dw = torch.zeros_like(weight) if weight_grad else weight.new_empty(0)
    return dx, dw


def _triton_forward(x, weight, eps, offset, casting_mode):
    y, rstd = _empty_outputs(x, weight, casting_mode)
    if x.numel():
        n = x.shape[-1]
        triton_module("rmsnorm").rmsnorm_forward(
            x.contiguous().view(-1, n),
            weight.contiguous(),
            y.view(-1, n),
            rstd.view(-1),
            eps,
            offset,
            CASTING_CODES[casting_mode],
        )
    return y, rstd


def _triton_backward(dy, x, weight, rstd, offset, casting_mode, weight_grad):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if weight_grad else None
    if x.numel():
        n = x.shape[-1]
        triton_module("rmsnorm").rmsnorm_backward(
            dy.contiguous().view(-1, n),
            x.contiguous().view(-1, n),
            weight.contiguous(),
            rstd.contiguous().view(-1),
            dx.view(-1, n),
            dw,
            offset,
            CASTING_CODES[casting_mode],
        )
    return dx, (dw.to(weight.dtype) if weight_grad else weight.new_empty(0))


def _fake_forward(x, weight, eps, offset, casting_mode):
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1], lambda: "rms_norm: weight must be [n]")
    return _empty_outputs(x, weight, casting_mode)


def _fake_backward(dy, x, weight, rstd, offset, casting_mode, weight_grad):
    torch._check(dy.shape == x.shape, lambda: "rms_norm_backward: dy must have x's shape")
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, (torch.empty_like(weight) if weight_grad else weight.new_empty(0))


def _reference_forward(x, weight, eps, offset, casting_mode):
    return ref.rms_norm_forward(x, weight, eps, offset, casting_mode)


def _reference_backward(dy, x, weight, rstd, offset, casting_mode, weight_grad):
    dx, dw = ref.rms_norm_backward(dy, x, weight, rstd, offset, casting_mode, weight_grad)
    return dx.contiguous(), dw


def _check_common(op, x, weight, casting_mode):
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_dtype(op, "weight", weight, FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension")
    if weight.dim() != 1:
        raise ValueError(f"{op}: weight must be 1-D, got shape {tuple(weight.shape)}")
    check_features(op, "x", x, "hidden size")
    check_last_dim(op, "x", x, weight.shape[0], "weight's size")
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"{op}: casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")


def _check_forward(x, weight, eps, offset, casting_mode):
    _check_common("rms_norm_forward", x, weight, casting_mode)
    check_real("rms_norm_forward", "eps", eps, low=0.0)
    check_real("rms_norm_forward", "offset", offset)


def _check_backward(dy, x, weight, rstd, offset, casting_mode, weight_grad):
    op = "rms_norm_backward"
    _check_common(op, x, weight, casting_mode)
    check_dtype(op, "dy", dy, FLOAT_DTYPES)
    if dy.shape != x.shape:
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, x has {tuple(x.shape)}")
    check_dtype(op, "rstd", rstd, (torch.float32, torch.float64))
    check_numel(op, "rstd", rstd, x.numel() // x.shape[-1] if x.shape[-1] else 0, "one per row of x")
    check_real(op, "offset", offset)


rms_norm_forward = define_op(
    "rms_norm_forward",
    "(Tensor x, Tensor weight, float eps, float offset, str casting_mode) -> (Tensor, Tensor)",
    family="rmsnorm",
    fake=_fake_forward,
    reference=_reference_forward,
    native=_native_forward,
    triton=_triton_forward,
    check=_check_forward,
)
rms_norm_backward = define_op(
    "rms_norm_backward",
    "(Tensor dy, Tensor x, Tensor weight, Tensor rstd, float offset, str casting_mode, bool weight_grad)"
    " -> (Tensor, Tensor)",
    family="rmsnorm",
    fake=_fake_backward,
    reference=_reference_backward,
    native=_native_backward,
    triton=_triton_backward,
    check=_check_backward,
)


@carry_backend
class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x, weight); backward computes dW only when the weight requires grad."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float, casting_mode: str):
        y, rstd = rms_norm_forward(x, weight, eps, offset, casting_mode)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset, ctx.casting_mode = offset, casting_mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        weight_grad = ctx.needs_input_grad[1]
        dx, dw = rms_norm_backward(dy, x, weight, rstd, ctx.offset, ctx.casting_mode, weight_grad)
        return dx, (dw if weight_grad else None), None, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, casting_mode: str = "llama"
) -> torch.Tensor:
    """RMSNorm over the last dim of x, scaled by (offset + weight), in HF's casting order.

    casting_mode: "llama" (HF LlamaRMSNorm: normalize in fp32, cast to x's dtype, then multiply by
    the weight; the result takes promote(x, weight)'s dtype), "gemma" (everything in fp32, one cast
    to x's dtype; use offset=1.0 for Gemma's (1 + w)), "none" (every step in x's dtype).
    """
    fn = "rms_norm"
    if _dtensor.is_dtensor(x) or _dtensor.is_dtensor(weight):  # tensor/sequence parallel: each rank's rows
        return _dtensor.rms_norm(rms_norm, x, weight, eps, offset, casting_mode)
    check_tensor(fn, "x", x, min_dim=1)
    check_tensor(fn, "weight", weight, dim=1)
    check_same_device(fn, x=x, weight=weight)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{fn}: weight has {weight.shape[0]} elements, x's last dim is {x.shape[-1]}")
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"{fn}: casting_mode must be one of {tuple(CASTING_MODES)}, got {casting_mode!r}")
    if not eps >= 0:
        raise ValueError(f"{fn}: eps must be >= 0, got {eps}")
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), casting_mode)
