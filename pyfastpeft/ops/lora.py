"""LoRA over a frozen base: custom ops, backend table, autograd and the public lora_linear.

    y = x W^T + b + s * dropout(x) A^T B^T        A [r, in], B [out, r] (PEFT's shapes), s = scaling
The math of forward and backward, and the Philox dropout mask every backend shares, are written out in
pyfastpeft/reference/lora.py. The base product is a swappable piece (a _Base: its forward x W^T + b and
its grad_input dY W); each base kind has its own pair of ops, whose tensors and ints describe the base:
  pyfastpeft::lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng) -> (y, xa)
  pyfastpeft::lora_backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad)
      -> (dx, dA, dB)
  pyfastpeft::lora_nf4_forward / lora_nf4_backward: the same with the NF4 base (packed, absmax, code) in
      place of weight and (blocksize, out_features, in_features) after lora_B / xa.
bias: empty = none. rng: int64 [2] = (seed, offset), empty = no dropout. xa = x_d A^T [M, r] in x's dtype;
dx is empty when needs_input_grad is False.

Backends: reference (PyTorch, PEFT's order of operations); native CPU (torch GEMMs into the outputs, the
C++ kernel for the dropout: x_d into a temporary freed after use, and dX += s * (dY B A) * keep / (1 - p)
fused); Triton (one kernel reads each x tile once for x W^T and x_d A^T, dequantizing NF4 tiles in its K
loop; backward in torch GEMMs plus a Triton masked-accumulate kernel).

Autograd saves x (not x_d: backward regenerates the mask from rng), A, B, xa [M, r], rng and the base.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from pyfastpeft import _native
from pyfastpeft.ops import int8 as int8_ops
from pyfastpeft.ops import nf4 as nf4_ops
from pyfastpeft.ops._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from pyfastpeft.ops._library import define_op, triton_module
from pyfastpeft.reference import int8 as int8_ref
from pyfastpeft.reference import lora as ref
from pyfastpeft.reference import nf4 as nf4_ref

SEED_HIGH = 2**62  # seed and offset are drawn uniformly from [0, SEED_HIGH)


# ---- base products ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _DenseBase:
    weight: torch.Tensor  # [out, in], x's dtype

    kind = "dense"

    def reference_forward(self, x2d, bias):
        return ref.dense_forward(x2d, self.weight, bias)

    def reference_grad_input(self, dy2d):
        return ref.dense_grad_input(dy2d, self.weight)

    def forward(self, x2d, bias):
        """A fresh contiguous [M, out] tensor: addmm(b, x, W^T)."""
        if bias.numel():
            return torch.addmm(bias, x2d, self.weight.t())
        return x2d @ self.weight.t()

    def grad_input(self, dy2d):
        return dy2d @ self.weight


@dataclasses.dataclass(frozen=True)
class _NF4Base:
    packed: torch.Tensor  # uint8 [(out * in + 1) // 2, 1]
    absmax: torch.Tensor  # fp32 [nblocks], de-nested
    code: torch.Tensor  # fp32 [16]
    blocksize: int
    out_features: int
    in_features: int

    kind = "nf4"

    def _args(self):
        return self.packed, self.absmax, self.code

    def reference_forward(self, x2d, bias):
        return nf4_ref.nf4_linear(x2d, *self._args(), bias, self.blocksize, self.out_features, self.in_features)

    def reference_grad_input(self, dy2d):
        return nf4_ref.nf4_linear_grad_input(dy2d, *self._args(), self.blocksize, self.out_features,
                                             self.in_features)

    def forward(self, x2d, bias):
        return nf4_ops.nf4_linear_op(x2d, *self._args(), bias, self.blocksize, self.out_features,
                                     self.in_features).contiguous()

    def grad_input(self, dy2d):
        return nf4_ops.nf4_linear_grad_input(dy2d, *self._args(), self.blocksize, self.out_features,
                                             self.in_features).contiguous()


@dataclasses.dataclass(frozen=True)
class _Int8Base:
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


# ---- implementations, generic over the base ------------------------------------------------------------

def _reference_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng):
    y, xa = ref.lora_forward(x, base.reference_forward, bias, lora_A, lora_B, scaling, dropout_p, rng)
    return y.contiguous(), xa.contiguous()


def _reference_backward(base, dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad):
    dx, grad_A, grad_B = ref.lora_backward(dy, x, base.reference_grad_input, lora_A, lora_B, xa, scaling,
                                           dropout_p, rng, needs_input_grad)
    return dx.contiguous(), grad_A.contiguous(), grad_B.contiguous()


def dropout_into(src, dst, rng, dropout_p: float, alpha: float = 1.0, accumulate: bool = False) -> None:
    """Native: dst (+)= alpha * src * keep * fp32(1 / (1 - p)), src and dst contiguous CPU tensors of one dtype."""
    seed, offset = rng.tolist()
    _native.cpu.lora_dropout(_native.ptr(src), _native.ptr(dst), src.numel(), _native.dtype_code(src), seed, offset,
                             float(ref.keep_threshold(dropout_p)), _keep_scale(dropout_p), alpha, accumulate,
                             _native.num_threads())


def _keep_scale(dropout_p: float) -> float:
    """fp32(1 / (1 - p)) as a Python float."""
    return float(torch.tensor(1.0 / (1.0 - dropout_p), dtype=torch.float32))


def _native_usable(*tensors) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def _native_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng):
    if not _native_usable(x, lora_A, lora_B):
        return _reference_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng)
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    x2d = x.reshape(-1, in_features).contiguous()
    y = base.forward(x2d, bias)
    if rng.numel() and x2d.numel():
        x_dropped = torch.empty_like(x2d)  # freed on return: backward regenerates it from rng
        dropout_into(x2d, x_dropped, rng, dropout_p)
        xa = x_dropped @ lora_A.t()
    else:
        xa = x2d @ lora_A.t()
    y.addmm_(xa, lora_B.t(), alpha=scaling)
    return y.view(*x.shape[:-1], out_features), xa


def _native_backward(base, dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad):
    if not _native_usable(dy, x, lora_A, lora_B):
        return _reference_backward(base, dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad)
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    dy2d = dy.reshape(-1, out_features).contiguous()
    x2d = x.reshape(-1, in_features).contiguous()
    dropout = bool(rng.numel()) and x2d.numel() > 0
    grad_xa = dy2d @ lora_B
    if dropout:
        x_dropped = torch.empty_like(x2d)
        dropout_into(x2d, x_dropped, rng, dropout_p)
        grad_A = (grad_xa.t() @ x_dropped).mul_(scaling)
        del x_dropped
    else:
        grad_A = (grad_xa.t() @ x2d).mul_(scaling)
    grad_B = (dy2d.t() @ xa).mul_(scaling)
    if not needs_input_grad:
        return x.new_empty(0), grad_A, grad_B
    dx = base.grad_input(dy2d)
    if dropout:
        dropout_into(grad_xa @ lora_A, dx, rng, dropout_p, alpha=scaling, accumulate=True)
    else:
        dx.addmm_(grad_xa, lora_A, alpha=scaling)
    return dx.view(x.shape), grad_A, grad_B


def _triton_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng):
    if base.kind == "int8":  # no fused Triton kernel over an int8 base: the base's own ops, then the LoRA branch
        return _unfused_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng)
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    x2d = x.reshape(-1, in_features).contiguous()
    y = torch.empty((x2d.shape[0], out_features), dtype=x.dtype, device=x.device)
    xa = torch.empty((x2d.shape[0], lora_A.shape[0]), dtype=x.dtype, device=x.device)
    triton_module("lora").lora_forward(x2d, base, bias.contiguous(), lora_A.contiguous(), lora_B.contiguous(), y,
                                       xa, scaling, dropout_p, _keep_scale(dropout_p), rng)
    return y.view(*x.shape[:-1], out_features), xa


def _triton_backward(base, dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad):
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    kernels = triton_module("lora")
    dy2d = dy.reshape(-1, out_features).contiguous()
    x2d = x.reshape(-1, in_features).contiguous()
    dropout = bool(rng.numel()) and x2d.numel() > 0
    keep_scale = _keep_scale(dropout_p)
    grad_xa = dy2d @ lora_B
    x_dropped = x2d
    if dropout:
        x_dropped = torch.empty_like(x2d)
        kernels.dropout_into(x2d, x_dropped, rng, dropout_p, keep_scale, 1.0, False)
    grad_A = (grad_xa.t() @ x_dropped).mul_(scaling)
    del x_dropped
    grad_B = (dy2d.t() @ xa).mul_(scaling)
    if not needs_input_grad:
        return x.new_empty(0), grad_A, grad_B
    dx = base.grad_input(dy2d)
    if dropout:
        kernels.dropout_into(grad_xa @ lora_A, dx, rng, dropout_p, keep_scale, scaling, True)
    else:
        dx.addmm_(grad_xa, lora_A, alpha=scaling)
    return dx.view(x.shape), grad_A, grad_B


def _unfused_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng):
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    x2d = x.reshape(-1, in_features).contiguous()
    y = base.forward(x2d, bias)
    x_dropped = x2d
    if rng.numel() and x2d.numel():
        x_dropped = ref.dropout(x2d, dropout_p, rng)
    xa = x_dropped @ lora_A.t()
    y.add_((xa @ lora_B.t()).to(y.dtype), alpha=scaling)
    return y.view(*x.shape[:-1], out_features), xa


# ---- the ops ---------------------------------------------------------------------------------------------

def _fake_forward(x, lora_A, lora_B):
    rows = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], lora_B.shape[0])), x.new_empty((rows, lora_A.shape[0]))


def _fake_backward(x, lora_A, lora_B, needs_input_grad):
    dx = x.new_empty(x.shape) if needs_input_grad else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _dense_op_impls(impl_forward, impl_backward):
    def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng):
        return impl_forward(_DenseBase(weight), x, bias, lora_A, lora_B, scaling, dropout_p, rng)

    def backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad):
        return impl_backward(_DenseBase(weight), dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng,
                             needs_input_grad)
    return forward, backward


def _nf4_op_impls(impl_forward, impl_backward):
    def forward(x, packed, absmax, code, bias, lora_A, lora_B, blocksize, out_features, in_features, scaling,
                dropout_p, rng):
        base = _NF4Base(packed, absmax, code, blocksize, out_features, in_features)
        return impl_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng)

    def backward(dy, x, packed, absmax, code, lora_A, lora_B, xa, blocksize, out_features, in_features, scaling,
                 dropout_p, rng, needs_input_grad):
        base = _NF4Base(packed, absmax, code, blocksize, out_features, in_features)
        return impl_backward(base, dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad)
    return forward, backward


_IMPLS = {"reference": (_reference_forward, _reference_backward), "native": (_native_forward, _native_backward),
          "triton": (_triton_forward, _triton_backward)}


def _define_base_ops(name: str, base_schema: str, base_meta_schema: str, op_impls, fake_forward, fake_backward):
    impls = {backend: op_impls(*pair) for backend, pair in _IMPLS.items()}
    forward = define_op(
        f"{name}_forward", f"(Tensor x, {base_schema}, Tensor bias, Tensor lora_A, Tensor lora_B{base_meta_schema}, "
        "float scaling, float dropout_p, Tensor rng) -> (Tensor, Tensor)", family="lora", fake=fake_forward,
        reference=impls["reference"][0], native=impls["native"][0], triton=impls["triton"][0])
    backward = define_op(
        f"{name}_backward", f"(Tensor dy, Tensor x, {base_schema}, Tensor lora_A, Tensor lora_B, Tensor xa"
        f"{base_meta_schema}, float scaling, float dropout_p, Tensor rng, bool needs_input_grad) "
        "-> (Tensor, Tensor, Tensor)", family="lora", fake=fake_backward,
        reference=impls["reference"][1], native=impls["native"][1], triton=impls["triton"][1])
    return forward, backward


lora_forward, lora_backward = _define_base_ops(
    "lora", "Tensor weight", "", _dense_op_impls,
    lambda x, weight, bias, lora_A, lora_B, *_: _fake_forward(x, lora_A, lora_B),
    lambda dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad:
        _fake_backward(x, lora_A, lora_B, needs_input_grad))
lora_nf4_forward, lora_nf4_backward = _define_base_ops(
    "lora_nf4", "Tensor packed, Tensor absmax, Tensor code", ", int blocksize, SymInt out_features, "
    "SymInt in_features", _nf4_op_impls,
    lambda x, packed, absmax, code, bias, lora_A, lora_B, *_: _fake_forward(x, lora_A, lora_B),
    lambda dy, x, packed, absmax, code, lora_A, lora_B, xa, *rest: _fake_backward(x, lora_A, lora_B, rest[-1]))



def _int8_op_impls(impl_forward, impl_backward):
    def forward(x, weight, weight_stats, bias, lora_A, lora_B, threshold, scaling, dropout_p, rng):
        return impl_forward(_Int8Base(weight, weight_stats, threshold), x, bias, lora_A, lora_B, scaling, dropout_p,
                            rng)

    def backward(dy, x, weight, weight_stats, lora_A, lora_B, xa, threshold, scaling, dropout_p, rng,
                 needs_input_grad):
        return impl_backward(_Int8Base(weight, weight_stats, threshold), dy, x, lora_A, lora_B, xa, scaling,
                             dropout_p, rng, needs_input_grad)
    return forward, backward


lora_int8_forward, lora_int8_backward = _define_base_ops(
    "lora_int8", "Tensor weight, Tensor weight_stats", ", float threshold", _int8_op_impls,
    lambda x, weight, weight_stats, bias, lora_A, lora_B, *_: _fake_forward(x, lora_A, lora_B),
    lambda dy, x, weight, weight_stats, lora_A, lora_B, xa, *rest: _fake_backward(x, lora_A, lora_B, rest[-1]))

# base kind -> (forward op, backward op): the op arguments are (x, *base tensors, bias, A, B, *base scalars, ...)
BASE_OPS = {"dense": (lora_forward, lora_backward), "nf4": (lora_nf4_forward, lora_nf4_backward),
            "int8": (lora_int8_forward, lora_int8_backward)}


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T over a frozen base; gradients for x, bias, A and B (the
    formulas in pyfastpeft/reference/lora.py; db = sum over rows of dY). Saves x, A, B, xa [M, r], rng and
    the base's tensors: never x_d or the mask, which backward regenerates from rng."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, scaling: float, dropout_p: float, rng, base_kind: str,
                base_ints: tuple, *base_tensors):
        forward_op, _ = BASE_OPS[base_kind]
        y, xa = forward_op(x, *base_tensors, bias, lora_A, lora_B, *base_ints, scaling, dropout_p, rng)
        ctx.save_for_backward(x, lora_A, lora_B, xa, rng, *base_tensors)
        ctx.settings = (base_kind, base_ints, scaling, dropout_p)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, xa, rng, *base_tensors = ctx.saved_tensors
        base_kind, base_ints, scaling, dropout_p = ctx.settings
        _, backward_op = BASE_OPS[base_kind]
        needs = ctx.needs_input_grad
        dx, grad_A, grad_B = backward_op(dy, x, *base_tensors, lora_A, lora_B, xa, *base_ints, scaling, dropout_p,
                                         rng, needs[0])
        grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0) if needs[1] else None
        return ((dx if needs[0] else None), grad_bias, (grad_A if needs[2] else None),
                (grad_B if needs[3] else None), None, None, None, None, None, *([None] * len(base_tensors)))


# ---- the public function ---------------------------------------------------------------------------------

def _check_number(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _int8_base(fn: str, weight, x):
    codes, stats, *rest = weight
    threshold = _check_number(fn, "weight's threshold", rest[0]) if rest else 6.0
    if threshold < 0:
        raise ValueError(f"{fn}: weight's threshold must be >= 0, got {threshold}")
    int8_ops.check_int8_weight(fn, codes, stats)
    check_same_device(fn, x=x, weight_int8=codes, weight_stats=stats)
    return "int8", (threshold,), (codes, stats), codes.shape[0], codes.shape[1]


def _base_from_weight(fn: str, weight, x):
    """(base_kind, base_scalars, base_tensors, out_features, in_features) of a dense weight, an NF4
    (packed, state) pair or an int8 (codes, SCB[, threshold]) tuple."""
    from pyfastpeft.quant.nf4 import QuantState

    if isinstance(weight, torch.Tensor):
        check_tensor(fn, "weight", weight, dim=2)
        check_same_dtype(fn, x=x, weight=weight)
        check_same_device(fn, x=x, weight=weight)
        return "dense", (), (weight,), weight.shape[0], weight.shape[1]
    if isinstance(weight, tuple) and len(weight) in (2, 3) and isinstance(weight[0], torch.Tensor) \
            and weight[0].dtype == torch.int8:
        return _int8_base(fn, weight, x)
    if not (isinstance(weight, tuple) and len(weight) == 2):
        raise TypeError(f"{fn}: weight must be a tensor, the (packed, state) pair of quantize_nf4 or an int8 "
                        f"(weight_int8, weight_stats[, threshold]) tuple, got {type(weight).__name__}")
    packed, state = weight
    if not isinstance(state, QuantState):
        raise TypeError(f"{fn}: weight's state must be a pyfastpeft.quant.QuantState, got {type(state).__name__}")
    if state.quant_type not in ("nf4", "fp4") or state.shape is None or len(state.shape) != 2:
        raise ValueError(f"{fn}: weight's state must describe a 2-D nf4/fp4 weight, got quant_type "
                         f"{state.quant_type!r} and shape {state.shape}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"{fn}: weight's packed tensor must be uint8, got {got}")
    out_features, in_features = state.shape
    if packed.numel() != (out_features * in_features + 1) // 2:
        raise ValueError(f"{fn}: weight's packed tensor has {packed.numel()} bytes, a {out_features}x{in_features} "
                         f"weight needs {(out_features * in_features + 1) // 2}")
    check_same_device(fn, x=x, packed=packed, absmax=state.absmax)
    base_tensors = (packed, state.dequantized_absmax(), state.code.float())
    return "nf4", (state.blocksize, out_features, in_features), base_tensors, out_features, in_features


def lora_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """x W^T + b + scaling * dropout(x) A^T B^T, PEFT's LoRA linear; differentiable w.r.t. x, bias, A, B.

    weight: dense [out, in] in x's dtype, the (packed, state) pair pyfastpeft.quant.quantize_nf4 returns, or an
    LLM.int8 base (weight_int8 [out, in], weight_stats fp32 [out][, threshold = 6.0]) as int8_linear takes it.
    lora_A: [r, in], lora_B: [out, r], in x's dtype. scaling: alpha / r (or alpha / sqrt(r), rsLoRA).
    Dropout (probability dropout_p in [0, 1)) applies only when training and dropout_p > 0: then a (seed,
    offset) pair is drawn from torch's default generator for x's device, so torch.manual_seed reproduces
    the mask and activation checkpointing recomputes it; otherwise nothing is drawn.
    """
    fn = "lora_linear"
    check_tensor(fn, "x", x, min_dim=1)
    check_tensor(fn, "lora_A", lora_A, dim=2)
    check_tensor(fn, "lora_B", lora_B, dim=2)
    base_kind, base_ints, base_tensors, out_features, in_features = _base_from_weight(fn, weight, x)
    scaling = _check_number(fn, "scaling", scaling)
    dropout_p = _check_number(fn, "dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(training, bool):
        raise TypeError(f"{fn}: training must be a bool, got {type(training).__name__}")
    if x.shape[-1] != in_features:
        raise ValueError(f"{fn}: x's last dim is {x.shape[-1]}, the weight's in_features is {in_features}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"{fn}: lora_A is {tuple(lora_A.shape)}, expected [r, {in_features}] (in_features)")
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"{fn}: lora_B is {tuple(lora_B.shape)}, its rank (dim 1) must match lora_A's rank "
                         f"{lora_A.shape[0]}")
    if lora_B.shape[0] != out_features:
        raise ValueError(f"{fn}: lora_B is {tuple(lora_B.shape)}, expected [{out_features}, r] (out_features)")
    check_same_dtype(fn, x=x, lora_A=lora_A, lora_B=lora_B)
    check_same_device(fn, x=x, lora_A=lora_A, lora_B=lora_B)
    if bias is None:
        bias = x.new_empty(0)
    else:
        check_tensor(fn, "bias", bias, dim=1, dtypes=FLOAT_DTYPES)
        if bias.shape[0] != out_features:
            raise ValueError(f"{fn}: bias has {bias.shape[0]} elements, out_features is {out_features}")
        check_same_dtype(fn, x=x, bias=bias)
        check_same_device(fn, x=x, bias=bias)
    if training and dropout_p > 0.0:
        rng = torch.randint(0, SEED_HIGH, (2,), dtype=torch.int64, device=x.device)
    else:
        rng = torch.empty(0, dtype=torch.int64, device=x.device)
    return LoRALinearFunction.apply(x, bias, lora_A, lora_B, scaling, dropout_p, rng, base_kind, base_ints,
                                    *base_tensors)
