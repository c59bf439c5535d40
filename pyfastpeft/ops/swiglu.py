"""SwiGLU: custom ops, backend table, autograd and the public function.

Ops (gate, up: same shape and dtype; outputs contiguous, of that shape):
  pyfastpeft::swiglu_forward(gate, up) -> y = silu(gate) * up
  pyfastpeft::swiglu_backward(dy, gate, up) -> (dgate, dup)
The backward recomputes silu from gate instead of saving the activation (one [tokens, intermediate]
tensor less per MLP). Math in pyfastpeft/reference/swiglu.py and csrc/cpu/swiglu.cpp.
"""

from __future__ import annotations

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops import _dtensor
from pyfastpeft.ops._checks import FLOAT_DTYPES, check_dtype, check_same_device, check_same_dtype, check_tensor
from pyfastpeft.ops._library import define_op, triton_module
from pyfastpeft.reference import swiglu as ref


def _contiguous_empty(t, empty=torch.empty):
    return empty(t.shape, dtype=t.dtype, device=t.device)


def forward_into(gate, up, out) -> None:
    """Native forward into preallocated out; all three contiguous, one dtype."""
    _native.launch("swiglu_forward", gate, gate, up, out, gate.numel(), gate.dtype)


def backward_into(dy, gate, up, dgate, dup) -> None:
    """Native backward into preallocated dgate, dup; all contiguous, one dtype."""
    _native.launch("swiglu_backward", gate, dy, gate, up, dgate, dup, gate.numel(), gate.dtype)


def _native_forward(gate, up):
    out = _contiguous_empty(gate, _native.empty)
    if gate.numel():
        forward_into(gate.contiguous(), up.contiguous(), out)
    return out


def _native_backward(dy, gate, up):
    dgate, dup = _contiguous_empty(gate, _native.empty), _contiguous_empty(up, _native.empty)
    if gate.numel():
        backward_into(dy.to(gate.dtype).contiguous(), gate.contiguous(), up.contiguous(), dgate, dup)
    return dgate, dup


def _triton_forward(gate, up):
    out = _contiguous_empty(gate)
    if gate.numel():
        triton_module("swiglu").swiglu_forward(gate.contiguous(), up.contiguous(), out)
    return out


def _triton_backward(dy, gate, up):
    dgate, dup = _contiguous_empty(gate), _contiguous_empty(up)
    if gate.numel():
        triton_module("swiglu").swiglu_backward(
            dy.to(gate.dtype).contiguous(), gate.contiguous(), up.contiguous(), dgate, dup
        )
    return dgate, dup


def _fake_forward(gate, up):
    torch._check(gate.shape == up.shape, lambda: "swiglu: gate and up must have one shape")
    return _contiguous_empty(gate)


def _fake_backward(dy, gate, up):
    return _contiguous_empty(gate), _contiguous_empty(up)


def _reference_forward(gate, up):
    return ref.swiglu_forward(gate, up).contiguous()


def _reference_backward(dy, gate, up):
    dgate, dup = ref.swiglu_backward(dy, gate, up)
    return dgate.contiguous(), dup.contiguous()


def _check_pair(op, **tensors):
    """Tensors of one shape and one float dtype."""
    (first_name, first), *rest = tensors.items()
    check_dtype(op, first_name, first, FLOAT_DTYPES)
    for name, t in rest:
        check_dtype(op, name, t, (first.dtype,))
        if t.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, {first_name} has {tuple(first.shape)}")


def _check_forward(gate, up):
    _check_pair("swiglu_forward", gate=gate, up=up)


def _check_backward(dy, gate, up):
    _check_pair("swiglu_backward", gate=gate, up=up, dy=dy)


swiglu_forward = define_op(
    "swiglu_forward",
    "(Tensor gate, Tensor up) -> Tensor",
    family="swiglu",
    fake=_fake_forward,
    reference=_reference_forward,
    native=_native_forward,
    triton=_triton_forward,
    check=_check_forward,
)
swiglu_backward = define_op(
    "swiglu_backward",
    "(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)",
    family="swiglu",
    fake=_fake_backward,
    reference=_reference_backward,
    native=_native_backward,
    triton=_triton_backward,
    check=_check_backward,
)


@carry_backend
class SwiGLUFunction(torch.autograd.Function):
    """y = silu(gate) * up; saves gate and up only, recomputes silu in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, fused forward and backward (HF LlamaMLP's act_fn(gate_proj(x)) * up_proj(x))."""
    fn = "swiglu"
    if _dtensor.is_dtensor(gate) or _dtensor.is_dtensor(up):  # tensor parallel: elementwise on each rank's shard
        return _dtensor.swiglu(swiglu, gate, up)
    check_tensor(fn, "gate", gate)
    check_tensor(fn, "up", up)
    check_same_device(fn, gate=gate, up=up)
    check_same_dtype(fn, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"{fn}: gate has shape {tuple(gate.shape)}, up has shape {tuple(up.shape)}")
    return SwiGLUFunction.apply(gate, up)
