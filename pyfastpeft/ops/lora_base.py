"""The frozen base of a LoRA layer, one description per kind, in one ordered list (BASE_KINDS).

A base is the product y = x W^T + b and its dX = dY W, whatever W's storage; LoRA's ops (single- and multi-
adapter), the autograd Functions and the Triton kernels see it only through a base object (DenseBase, NF4Base,
Int8Base: `kind`, reference_forward / reference_grad_input, forward / grad_input). A kind says how a base travels
through an op (its tensors, then its scalars, each with a schema), how the op checks them, and which public
`weight` argument of lora_linear describes it. dispatch_base asks the kinds in order and the first that accepts
the weight wins, the default (a dense tensor) last, as PEFT's dispatch_* chain does.

Adding a base kind: a base class with the four products, a BaseKind row in BASE_KINDS before the default, and a
row in pyfastpeft/nn/lora.py's module table; the ops, autograd and modules follow (see CONTRIBUTING.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from pyfastpeft.ops import int8 as int8_ops
from pyfastpeft.ops import nf4 as nf4_ops
from pyfastpeft.ops._checks import check_dtype, check_int, check_real, check_same_device, check_same_dtype, check_tensor
from pyfastpeft.reference import int8 as int8_ref
from pyfastpeft.reference import lora as ref
from pyfastpeft.reference import nf4 as nf4_ref

# ---- base products ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DenseBase:
    weight: torch.Tensor  # [out, in], x's dtype

    kind = "dense"

    def reference_forward(self, x2d, bias):
        return ref.dense_forward(x2d, self.weight, bias)

    def reference_grad_input(self, dy2d):
        return ref.dense_grad_input(dy2d, self.weight)

    def forward(self, x2d, bias):
        """A fresh contiguous [M, out] tensor: addmm(b, x, W^T)."""
        if bias is not None:
            return torch.addmm(bias, x2d, self.weight.t())
        return x2d @ self.weight.t()

    def grad_input(self, dy2d):
        return dy2d @ self.weight


@dataclasses.dataclass(frozen=True)
class NF4Base:
    packed: torch.Tensor  # uint8 [(out * in + 1) // 2, 1]
    absmax: torch.Tensor  # fp32 [nblocks], de-nested
    code: torch.Tensor  # fp32 [16]
    blocksize: int
    out_features: int
    in_features: int

    kind = "nf4"

    def _args(self):
        return self.packed, self.absmax, self.code

    def native_tensors(self):
        """(packed, absmax, code) as the native CPU kernels take them: contiguous, absmax and code in fp32."""
        return self.packed.contiguous(), self.absmax.float().contiguous(), self.code.float().contiguous()

    def reference_forward(self, x2d, bias):
        return nf4_ref.nf4_linear(x2d, *self._args(), bias, self.blocksize, self.out_features, self.in_features)

    def reference_grad_input(self, dy2d):
        return nf4_ref.nf4_linear_grad_input(dy2d, *self._args(), self.blocksize, self.out_features, self.in_features)

    def forward(self, x2d, bias):
        return nf4_ops.nf4_linear_op(
            x2d, *self._args(), bias, self.blocksize, self.out_features, self.in_features
        ).contiguous()

    def grad_input(self, dy2d):
        return nf4_ops.nf4_linear_grad_input(
            dy2d, *self._args(), self.blocksize, self.out_features, self.in_features
        ).contiguous()


@dataclasses.dataclass(frozen=True)
class Int8Base:
    weight: torch.Tensor  # int8 codes [out, in], row-wise
    weight_stats: torch.Tensor  # fp32 [out] (bitsandbytes' SCB)
    threshold: float  # LLM.int8 outlier threshold on x (0: no decomposition)

    kind = "int8"

    def reference_forward(self, x2d, bias):
        return int8_ref.int8_linear(x2d, self.weight, self.weight_stats, bias, self.threshold)

    def reference_grad_input(self, dy2d):
        return int8_ref.int8_linear_grad_input(dy2d, self.weight, self.weight_stats)

    def forward(self, x2d, bias):
        return int8_ops.int8_linear_op(x2d, self.weight, self.weight_stats, bias, self.threshold).contiguous()

    def grad_input(self, dy2d):
        return int8_ops.int8_linear_grad_input(dy2d, self.weight, self.weight_stats).contiguous()


# ---- kinds -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BaseKind:
    """How one kind of base travels through LoRA's ops: in every op's arguments its tensors come right after x
    (dy, x for a backward) and its scalars after the op's own tensors, each part with its schema text."""

    name: str  # the base object's `kind`; op names are lora{_name}_forward etc., nothing for the default
    tensors_schema: str  # e.g. "Tensor packed, Tensor absmax, Tensor code"
    scalars_schema: str  # e.g. ", int blocksize, SymInt out_features, SymInt in_features" ("" for none)
    make: Callable  # (tensors, scalars) -> the base object
    # (op, x, tensors, scalars) -> (out_features, in_features): the contract its kernels trust, raising
    # TypeError / ValueError naming the argument
    check: Callable
    accepts: Callable  # weight -> bool: does lora_linear's `weight` argument have this kind's form
    # (fn, weight, x) -> (scalars, tensors, out_features, in_features), checked
    describe: Callable
    weight_form: str  # the form of `weight`, for error messages
    trainable: bool = False  # a base whose weight can train beside the adapter (autograd gives dW = dY^T x)

    @property
    def n_tensors(self) -> int:
        return self.tensors_schema.count("Tensor")

    @property
    def n_scalars(self) -> int:
        return self.scalars_schema.count(",")

    def op_name(self, family: str) -> str:
        return family if self.name == "dense" else f"{family}_{self.name}"


def _check_dense(op, x, tensors, scalars):
    (weight,) = tensors
    check_dtype(op, "weight", weight, (x.dtype,))
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    return weight.shape[0], weight.shape[1]


def _check_nf4(op, x, tensors, scalars):
    packed, absmax, code = tensors
    blocksize, out_features, in_features = scalars
    check_int(op, "out_features", out_features, low=0)
    check_int(op, "in_features", in_features, low=0)
    nf4_ops.check_nf4_weight(op, packed, absmax, code, blocksize, out_features * in_features)
    return out_features, in_features


def _check_int8(op, x, tensors, scalars):
    weight, weight_stats = tensors
    int8_ops.check_int8_weight(op, weight, weight_stats)
    check_real(op, "threshold", scalars[0], low=0.0)
    return weight.shape[0], weight.shape[1]


def _describe_dense(fn: str, weight, x):
    check_tensor(fn, "weight", weight, dim=2)
    check_same_dtype(fn, x=x, weight=weight)
    check_same_device(fn, x=x, weight=weight)
    return (), (weight,), weight.shape[0], weight.shape[1]


def _describe_int8(fn: str, weight, x):
    codes, stats, *rest = weight
    threshold = check_real(fn, "weight's threshold", rest[0], low=0.0) if rest else 6.0
    int8_ops.check_int8_weight(fn, codes, stats)
    check_same_device(fn, x=x, weight_int8=codes, weight_stats=stats)
    return (threshold,), (codes, stats), codes.shape[0], codes.shape[1]


def _describe_nf4(fn: str, weight, x):
    from pyfastpeft.quant.nf4 import QuantState

    packed, state = weight
    if not isinstance(state, QuantState):
        raise TypeError(f"{fn}: weight's state must be a pyfastpeft.quant.QuantState, got {type(state).__name__}")
    if state.quant_type not in ("nf4", "fp4") or state.shape is None or len(state.shape) != 2:
        raise ValueError(
            f"{fn}: weight's state must describe a 2-D nf4/fp4 weight, got quant_type "
            f"{state.quant_type!r} and shape {state.shape}"
        )
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"{fn}: weight's packed tensor must be uint8, got {got}")
    out_features, in_features = state.shape
    if packed.numel() != (out_features * in_features + 1) // 2:
        raise ValueError(
            f"{fn}: weight's packed tensor has {packed.numel()} bytes, a {out_features}x{in_features} "
            f"weight needs {(out_features * in_features + 1) // 2}"
        )
    check_same_device(fn, x=x, packed=packed, absmax=state.absmax)
    tensors = (packed, state.dequantized_absmax(f"{fn}: weight's state"), state.code.float())
    return (state.blocksize, out_features, in_features), tensors, out_features, in_features


# First match wins; the default (any tensor: a dense weight) last.
BASE_KINDS: tuple[BaseKind, ...] = (
    BaseKind(
        name="int8",
        tensors_schema="Tensor weight, Tensor weight_stats",
        scalars_schema=", float threshold",
        make=lambda tensors, scalars: Int8Base(*tensors, *scalars),
        check=_check_int8,
        accepts=lambda weight: (
            isinstance(weight, tuple)
            and len(weight) in (2, 3)
            and isinstance(weight[0], torch.Tensor)
            and weight[0].dtype == torch.int8
        ),
        describe=_describe_int8,
        weight_form="an int8 (weight_int8, weight_stats[, threshold]) tuple",
    ),
    BaseKind(
        name="nf4",
        tensors_schema="Tensor packed, Tensor absmax, Tensor code",
        scalars_schema=", int blocksize, SymInt out_features, SymInt in_features",
        make=lambda tensors, scalars: NF4Base(*tensors, *scalars),
        check=_check_nf4,
        accepts=lambda weight: isinstance(weight, tuple) and len(weight) == 2,
        describe=_describe_nf4,
        weight_form="the (packed, state) pair of quantize_nf4",
    ),
    BaseKind(
        name="dense",
        tensors_schema="Tensor weight",
        scalars_schema="",
        make=lambda tensors, scalars: DenseBase(*tensors),
        check=_check_dense,
        accepts=lambda weight: isinstance(weight, torch.Tensor),
        describe=_describe_dense,
        weight_form="a tensor",
        trainable=True,
    ),
)
KINDS = {kind.name: kind for kind in BASE_KINDS}


def dispatch_base(fn: str, weight, x):
    """(kind, scalars, tensors, out_features, in_features) of lora_linear's `weight` argument: the first kind in
    BASE_KINDS that accepts it describes it (checked against x); TypeError naming every form when none does."""
    for kind in BASE_KINDS:
        if kind.accepts(weight):
            return (kind, *kind.describe(fn, weight, x))
    forms = ", ".join(kind.weight_form for kind in reversed(BASE_KINDS))
    raise TypeError(f"{fn}: weight must be {forms}; got {type(weight).__name__}")
