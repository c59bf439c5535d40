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
import itertools
import math
import numbers

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops import int8 as int8_ops
from pyfastpeft.ops import nf4 as nf4_ops
from pyfastpeft.ops._autocast import autocast_dtype, cast_like_linear
from pyfastpeft.ops._checks import (
    FLOAT_DTYPES,
    check_dtype,
    check_int,
    check_last_dim,
    check_layer_size,
    check_numel,
    check_optional,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
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
    dx, grad_A, grad_B = ref.lora_backward(
        dy, x, base.reference_grad_input, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad
    )
    return dx.contiguous(), grad_A.contiguous(), grad_B.contiguous()


def dropout_into(src, dst, rng, dropout_p: float, alpha: float = 1.0, accumulate: bool = False) -> None:
    """Native: dst (+)= alpha * src * keep * fp32(1 / (1 - p)), src and dst contiguous CPU tensors of one dtype."""
    seed, offset = rng.tolist()
    _native.launch(
        "lora_dropout",
        src,
        src,
        dst,
        src.numel(),
        src.dtype,
        seed,
        offset,
        float(ref.keep_threshold(dropout_p)),
        _keep_scale(dropout_p),
        alpha,
        accumulate,
    )


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
    triton_module("lora").lora_forward(
        x2d,
        base,
        bias.contiguous(),
        lora_A.contiguous(),
        lora_B.contiguous(),
        y,
        xa,
        scaling,
        dropout_p,
        _keep_scale(dropout_p),
        rng,
    )
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
        return impl_backward(_DenseBase(weight), dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad)

    return forward, backward


def _nf4_op_impls(impl_forward, impl_backward):
    def forward(
        x, packed, absmax, code, bias, lora_A, lora_B, blocksize, out_features, in_features, scaling, dropout_p, rng
    ):
        base = _NF4Base(packed, absmax, code, blocksize, out_features, in_features)
        return impl_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng)

    def backward(
        dy,
        x,
        packed,
        absmax,
        code,
        lora_A,
        lora_B,
        xa,
        blocksize,
        out_features,
        in_features,
        scaling,
        dropout_p,
        rng,
        needs_input_grad,
    ):
        base = _NF4Base(packed, absmax, code, blocksize, out_features, in_features)
        return impl_backward(base, dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad)

    return forward, backward


# ---- the contract every LoRA kernel trusts, checked on every op call ----------------------------------------------


def _check_dense_base(op, x, tensors, scalars):
    (weight,) = tensors
    check_dtype(op, "weight", weight, (x.dtype,))
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    return weight.shape[0], weight.shape[1]


def _check_nf4_base(op, x, tensors, scalars):
    packed, absmax, code = tensors
    blocksize, out_features, in_features = scalars
    check_int(op, "out_features", out_features, low=0)
    check_int(op, "in_features", in_features, low=0)
    nf4_ops.check_nf4_weight(op, packed, absmax, code, blocksize, out_features * in_features)
    return out_features, in_features


def _check_int8_base(op, x, tensors, scalars):
    weight, weight_stats = tensors
    int8_ops.check_int8_weight(op, weight, weight_stats)
    check_real(op, "threshold", scalars[0], low=0.0)
    return weight.shape[0], weight.shape[1]


def check_lora_args(
    op: str, x, lora_A, lora_B, out_features: int, in_features: int, dropout_p, rng, bias=None, scaling=None
) -> int:
    """x [..., in] float, lora_A [r, in] and lora_B [out, r] in x's dtype, bias empty or [out], dropout_p in
    [0, 1), rng int64 empty or [2] (seed, offset), scaling finite; returns x's row count M."""
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_layer_size(op, out_features, in_features)
    check_last_dim(op, "x", x, in_features, "in_features")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        check_dtype(op, name, t, (x.dtype,))
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"{op}: lora_A is {tuple(lora_A.shape)}, expected [r, {in_features}] (in_features)")
    if lora_B.shape[0] != out_features:
        raise ValueError(f"{op}: lora_B is {tuple(lora_B.shape)}, expected [{out_features}, R] (out_features)")
    if bias is not None:
        check_optional(op, "bias", bias, out_features, "out_features")
    if scaling is not None:
        check_real(op, "scaling", scaling)
    check_real(op, "dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    check_dtype(op, "rng", rng, (torch.int64,))
    if rng.numel() not in (0, 2):
        raise ValueError(
            f"{op}: rng must be empty (no dropout) or the int64 pair (seed, offset), got {rng.numel()} elements"
        )
    return math.prod(x.shape[:-1])


def _check_backward_extras(op, dy, x, lora_A, xa, rows: int, out_features: int, width: int) -> None:
    """dy [..., out] with x's rows and dtype, xa [M, width] in x's dtype."""
    check_dtype(op, "dy", dy, (x.dtype,))
    check_last_dim(op, "dy", dy, out_features, "out_features")
    if math.prod(dy.shape[:-1]) != rows:
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, x has {rows} rows")
    check_dtype(op, "xa", xa, (x.dtype,))
    if tuple(xa.shape) != (rows, width):
        raise ValueError(f"{op}: xa has shape {tuple(xa.shape)}, expected [{rows}, {width}]")


def _single_checks(name: str, n_tensors: int, check_base):
    """Checks of the (forward, backward) ops of single-adapter LoRA over a base of n_tensors tensors."""

    def forward(x, *args):
        base_tensors, (bias, lora_A, lora_B, *rest) = args[:n_tensors], args[n_tensors:]
        scaling, dropout_p, rng = rest[-3:]
        out_features, in_features = check_base(f"{name}_forward", x, base_tensors, tuple(rest[:-3]))
        check_lora_args(f"{name}_forward", x, lora_A, lora_B, out_features, in_features, dropout_p, rng, bias, scaling)
        if lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(
                f"{name}_forward: lora_B is {tuple(lora_B.shape)}, its rank must be lora_A's {lora_A.shape[0]}"
            )

    def backward(dy, x, *args):
        op = f"{name}_backward"
        base_tensors, (lora_A, lora_B, xa, *rest) = args[:n_tensors], args[n_tensors:]
        scaling, dropout_p, rng, _ = rest[-4:]
        out_features, in_features = check_base(op, x, base_tensors, tuple(rest[:-4]))
        rows = check_lora_args(op, x, lora_A, lora_B, out_features, in_features, dropout_p, rng, None, scaling)
        if lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(f"{op}: lora_B is {tuple(lora_B.shape)}, its rank must be lora_A's {lora_A.shape[0]}")
        _check_backward_extras(op, dy, x, lora_A, xa, rows, out_features, lora_A.shape[0])

    return forward, backward


_IMPLS = {
    "reference": (_reference_forward, _reference_backward),
    "native": (_native_forward, _native_backward),
    "triton": (_triton_forward, _triton_backward),
}


def _define_base_ops(name: str, base_schema: str, base_meta_schema: str, op_impls, fake_forward, fake_backward, checks):
    impls = {backend: op_impls(*pair) for backend, pair in _IMPLS.items()}
    forward = define_op(
        f"{name}_forward",
        f"(Tensor x, {base_schema}, Tensor bias, Tensor lora_A, Tensor lora_B{base_meta_schema}, "
        "float scaling, float dropout_p, Tensor rng) -> (Tensor, Tensor)",
        family="lora",
        fake=fake_forward,
        reference=impls["reference"][0],
        native=impls["native"][0],
        triton=impls["triton"][0],
        check=checks[0],
    )
    backward = define_op(
        f"{name}_backward",
        f"(Tensor dy, Tensor x, {base_schema}, Tensor lora_A, Tensor lora_B, Tensor xa"
        f"{base_meta_schema}, float scaling, float dropout_p, Tensor rng, bool needs_input_grad) "
        "-> (Tensor, Tensor, Tensor)",
        family="lora",
        fake=fake_backward,
        reference=impls["reference"][1],
        native=impls["native"][1],
        triton=impls["triton"][1],
        check=checks[1],
    )
    return forward, backward


lora_forward, lora_backward = _define_base_ops(
    "lora",
    "Tensor weight",
    "",
    _dense_op_impls,
    lambda x, weight, bias, lora_A, lora_B, *_: _fake_forward(x, lora_A, lora_B),
    lambda dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad: _fake_backward(
        x, lora_A, lora_B, needs_input_grad
    ),
    _single_checks("lora", 1, _check_dense_base),
)
lora_nf4_forward, lora_nf4_backward = _define_base_ops(
    "lora_nf4",
    "Tensor packed, Tensor absmax, Tensor code",
    ", int blocksize, SymInt out_features, SymInt in_features",
    _nf4_op_impls,
    lambda x, packed, absmax, code, bias, lora_A, lora_B, *_: _fake_forward(x, lora_A, lora_B),
    lambda dy, x, packed, absmax, code, lora_A, lora_B, xa, *rest: _fake_backward(x, lora_A, lora_B, rest[-1]),
    _single_checks("lora_nf4", 3, _check_nf4_base),
)


def _int8_op_impls(impl_forward, impl_backward):
    def forward(x, weight, weight_stats, bias, lora_A, lora_B, threshold, scaling, dropout_p, rng):
        return impl_forward(
            _Int8Base(weight, weight_stats, threshold), x, bias, lora_A, lora_B, scaling, dropout_p, rng
        )

    def backward(dy, x, weight, weight_stats, lora_A, lora_B, xa, threshold, scaling, dropout_p, rng, needs_input_grad):
        return impl_backward(
            _Int8Base(weight, weight_stats, threshold),
            dy,
            x,
            lora_A,
            lora_B,
            xa,
            scaling,
            dropout_p,
            rng,
            needs_input_grad,
        )

    return forward, backward


lora_int8_forward, lora_int8_backward = _define_base_ops(
    "lora_int8",
    "Tensor weight, Tensor weight_stats",
    ", float threshold",
    _int8_op_impls,
    lambda x, weight, weight_stats, bias, lora_A, lora_B, *_: _fake_forward(x, lora_A, lora_B),
    lambda dy, x, weight, weight_stats, lora_A, lora_B, xa, *rest: _fake_backward(x, lora_A, lora_B, rest[-1]),
    _single_checks("lora_int8", 2, _check_int8_base),
)

# base kind -> (forward op, backward op): the op arguments are (x, *base tensors, bias, A, B, *base scalars, ...)
BASE_OPS = {
    "dense": (lora_forward, lora_backward),
    "nf4": (lora_nf4_forward, lora_nf4_backward),
    "int8": (lora_int8_forward, lora_int8_backward),
}


@carry_backend
class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T over a frozen base; gradients for x, bias, A and B (the
    formulas in pyfastpeft/reference/lora.py; db = sum over rows of dY). Saves x, A, B, xa [M, r], rng and
    the base's tensors: never x_d or the mask, which backward regenerates from rng."""

    @staticmethod
    def forward(
        ctx,
        x,
        bias,
        lora_A,
        lora_B,
        scaling: float,
        dropout_p: float,
        rng,
        base_kind: str,
        base_ints: tuple,
        *base_tensors,
    ):
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
        dx, grad_A, grad_B = backward_op(
            dy, x, *base_tensors, lora_A, lora_B, xa, *base_ints, scaling, dropout_p, rng, needs[0]
        )
        grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0) if needs[1] else None
        grad_base = [None] * len(base_tensors)
        if base_kind == "dense" and needs[9]:
            # a trainable dense base (full fine-tuning beside the adapter): dW = dY^T x, [out, in]
            grad_base[0] = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return (
            (dx if needs[0] else None),
            grad_bias,
            (grad_A if needs[2] else None),
            (grad_B if needs[3] else None),
            None,
            None,
            None,
            None,
            None,
            *grad_base,
        )


# ---- the public function ---------------------------------------------------------------------------------


def _check_number(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _int8_base(fn: str, weight, x):
    codes, stats, *rest = weight
    threshold = check_real(fn, "weight's threshold", rest[0], low=0.0) if rest else 6.0
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
    if (
        isinstance(weight, tuple)
        and len(weight) in (2, 3)
        and isinstance(weight[0], torch.Tensor)
        and weight[0].dtype == torch.int8
    ):
        return _int8_base(fn, weight, x)
    if not (isinstance(weight, tuple) and len(weight) == 2):
        raise TypeError(
            f"{fn}: weight must be a tensor, the (packed, state) pair of quantize_nf4 or an int8 "
            f"(weight_int8, weight_stats[, threshold]) tuple, got {type(weight).__name__}"
        )
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
    base_tensors = (packed, state.dequantized_absmax(f"{fn}: weight's state"), state.code.float())
    return "nf4", (state.blocksize, out_features, in_features), base_tensors, out_features, in_features


def _check_dropout(fn: str, dropout_p, training) -> float:
    dropout_p = _check_number(fn, "dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(training, bool):
        raise TypeError(f"{fn}: training must be a bool, got {type(training).__name__}")
    return dropout_p


def _checked_bias(fn: str, bias, x, out_features: int) -> torch.Tensor:
    """bias as the ops take it: checked, or an empty tensor for None."""
    if bias is None:
        return x.new_empty(0)
    check_tensor(fn, "bias", bias, dim=1, dtypes=FLOAT_DTYPES)
    if bias.shape[0] != out_features:
        raise ValueError(f"{fn}: bias has {bias.shape[0]} elements, out_features is {out_features}")
    check_same_dtype(fn, x=x, bias=bias)
    check_same_device(fn, x=x, bias=bias)
    return bias


def _draw_rng(x, dropout_p: float, training: bool) -> torch.Tensor:
    """(seed, offset) from the default generator of x's device when dropout applies, else empty (no draw)."""
    if training and dropout_p > 0.0:
        return torch.randint(0, SEED_HIGH, (2,), dtype=torch.int64, device=x.device)
    return torch.empty(0, dtype=torch.int64, device=x.device)


def lora_linear(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
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
    dtype = autocast_dtype(x)  # F.linear's autocast rule for every product (ops/_autocast.py)
    x, lora_A, lora_B, bias = cast_like_linear(dtype, x, lora_A, lora_B, bias)
    if isinstance(weight, torch.Tensor):
        (weight,) = cast_like_linear(dtype, weight)
    check_tensor(fn, "lora_A", lora_A, dim=2)
    check_tensor(fn, "lora_B", lora_B, dim=2)
    base_kind, base_ints, base_tensors, out_features, in_features = _base_from_weight(fn, weight, x)
    scaling = check_real(fn, "scaling", scaling)
    dropout_p = _check_dropout(fn, dropout_p, training)
    if x.shape[-1] != in_features:
        raise ValueError(f"{fn}: x's last dim is {x.shape[-1]}, the weight's in_features is {in_features}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"{fn}: lora_A is {tuple(lora_A.shape)}, expected [r, {in_features}] (in_features)")
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"{fn}: lora_B is {tuple(lora_B.shape)}, its rank (dim 1) must match lora_A's rank {lora_A.shape[0]}"
        )
    if lora_B.shape[0] != out_features:
        raise ValueError(f"{fn}: lora_B is {tuple(lora_B.shape)}, expected [{out_features}, r] (out_features)")
    check_same_dtype(fn, x=x, lora_A=lora_A, lora_B=lora_B)
    check_same_device(fn, x=x, lora_A=lora_A, lora_B=lora_B)
    bias = _checked_bias(fn, bias, x, out_features)
    return LoRALinearFunction.apply(
        x,
        bias,
        lora_A,
        lora_B,
        scaling,
        dropout_p,
        _draw_rng(x, dropout_p, training),
        base_kind,
        base_ints,
        *base_tensors,
    )


# ---- multi-adapter batches ---------------------------------------------------------------------------------
# One batch, many adapters (S-LoRA / Punica's SGMV layout), trained: each row of x picks an adapter (or -1, base
# only). The math, the packed layout (A_cat [R, in], B_cat [out, R], rank_offsets int64 [n + 1], scalings fp32
# [n]) and the row grouping (row_order, segment_offsets) are written out in pyfastpeft/reference/lora.py.
#   pyfastpeft::lora_multi_forward(x, weight, bias, lora_A, lora_B, rank_offsets, scalings, row_adapter,
#       max_rank, dropout_p, rng) -> (y, xa, row_order, segment_offsets)
#   pyfastpeft::lora_multi_backward(dy, x, weight, lora_A, lora_B, rank_offsets, scalings, xa, row_order,
#       segment_offsets, dropout_p, rng, needs_input_grad) -> (dx, dA_cat, dB_cat)
#   _nf4 / _int8 variants: the base tensors in place of weight and the base scalars before max_rank / dropout_p.
# xa: [M, max_rank] in row_order, zeros past each adapter's rank. The grouping is computed once, in forward.
# Backends: reference (a loop over adapters, dropout over the whole x); native CPU (a stable argsort, then per
# adapter one GEMM pair on its gathered rows; dropout fused into the gather of x and the scatter-add of dX by
# the C++ lora_dropout_rows, at each row's original position). There is no segmented Triton kernel: the triton
# backend runs the native path on CPU tensors and the reference elsewhere.


def _native_adapter_groups(row_adapter, num_adapters: int):
    """(row_order, segment_offsets) as adapter_groups in the reference: a stable argsort and a bincount."""
    row_order = torch.argsort(row_adapter, stable=True)
    return row_order, torch.bincount(row_adapter + 1, minlength=num_adapters + 1).cumsum(0)


def _adapter_segments(rank_offsets, scalings, segment_offsets):
    """(rank low, rank high, row start, row end, scaling) of every adapter with rows, as Python numbers."""
    ranks, scales, segments = rank_offsets.tolist(), scalings.tolist(), segment_offsets.tolist()
    return [
        (ranks[i], ranks[i + 1], segments[i], segments[i + 1], scales[i])
        for i in range(len(scales))
        if segments[i + 1] > segments[i]
    ]


def _dropout_rows(
    src, dst, rows, rng, dropout_p: float, scatter: bool, alpha: float = 1.0, accumulate: bool = False
) -> None:
    """Native lora_dropout_rows: gather (dst[j] = dropout(src[rows[j]])) or scatter (dst[rows[j]] (+)= alpha *
    dropout(src[j])), the mask of the indexed side's positions. Contiguous CPU tensors of one dtype."""
    seed, offset = rng.tolist()
    _native.launch(
        "lora_dropout_rows",
        src,
        src,
        dst,
        rows,
        rows.numel(),
        src.shape[1],
        scatter,
        src.dtype,
        seed,
        offset,
        float(ref.keep_threshold(dropout_p)),
        _keep_scale(dropout_p),
        alpha,
        accumulate,
    )


def _gather_dropped(x2d, rows, rng, dropout_p: float):
    """dropout(x)[rows] [len(rows), in] without forming dropout(x)."""
    if not rng.numel():
        return x2d.index_select(0, rows)
    gathered = x2d.new_empty((rows.numel(), x2d.shape[1]))
    _dropout_rows(x2d, gathered, rows, rng, dropout_p, scatter=False)
    return gathered


def _reference_multi_forward(
    base, x, bias, lora_A, lora_B, rank_offsets, scalings, row_adapter, max_rank, dropout_p, rng
):
    y, xa, row_order, segment_offsets = ref.lora_multi_forward(
        x, base.reference_forward, bias, lora_A, lora_B, rank_offsets, scalings, row_adapter, max_rank, dropout_p, rng
    )
    return y.contiguous(), xa, row_order, segment_offsets


def _reference_multi_backward(
    base,
    dy,
    x,
    lora_A,
    lora_B,
    rank_offsets,
    scalings,
    xa,
    row_order,
    segment_offsets,
    dropout_p,
    rng,
    needs_input_grad,
):
    dx, grad_A, grad_B = ref.lora_multi_backward(
        dy,
        x,
        base.reference_grad_input,
        lora_A,
        lora_B,
        rank_offsets,
        scalings,
        xa,
        row_order,
        segment_offsets,
        dropout_p,
        rng,
        needs_input_grad,
    )
    return dx.contiguous(), grad_A, grad_B


def _native_multi_forward(base, x, bias, lora_A, lora_B, rank_offsets, scalings, row_adapter, max_rank, dropout_p, rng):
    if not _native_usable(x, lora_A, lora_B, row_adapter):
        return _reference_multi_forward(
            base, x, bias, lora_A, lora_B, rank_offsets, scalings, row_adapter, max_rank, dropout_p, rng
        )
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    x2d = x.reshape(-1, in_features).contiguous()
    lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
    row_order, segment_offsets = _native_adapter_groups(row_adapter, scalings.numel())
    y = base.forward(x2d, bias)
    xa = x2d.new_zeros((x2d.shape[0], max_rank))
    for low, high, start, end, scaling in _adapter_segments(rank_offsets, scalings, segment_offsets):
        rows = row_order[start:end]
        xa_rows = _gather_dropped(x2d, rows, rng, dropout_p) @ lora_A[low:high].t()
        xa[start:end, : high - low] = xa_rows
        y.index_copy_(0, rows, torch.addmm(y.index_select(0, rows), xa_rows, lora_B[:, low:high].t(), alpha=scaling))
    return y.view(*x.shape[:-1], out_features), xa, row_order, segment_offsets


def _native_multi_backward(
    base,
    dy,
    x,
    lora_A,
    lora_B,
    rank_offsets,
    scalings,
    xa,
    row_order,
    segment_offsets,
    dropout_p,
    rng,
    needs_input_grad,
):
    if not _native_usable(dy, x, lora_A, lora_B, row_order):
        return _reference_multi_backward(
            base,
            dy,
            x,
            lora_A,
            lora_B,
            rank_offsets,
            scalings,
            xa,
            row_order,
            segment_offsets,
            dropout_p,
            rng,
            needs_input_grad,
        )
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    dy2d = dy.reshape(-1, out_features).contiguous()
    x2d = x.reshape(-1, in_features).contiguous()
    lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
    grad_A, grad_B = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    dx = base.grad_input(dy2d) if needs_input_grad else x.new_empty(0)
    for low, high, start, end, scaling in _adapter_segments(rank_offsets, scalings, segment_offsets):
        rows = row_order[start:end]
        dy_rows = dy2d.index_select(0, rows)
        grad_xa = dy_rows @ lora_B[:, low:high]
        torch.mm(grad_xa.t(), _gather_dropped(x2d, rows, rng, dropout_p), out=grad_A[low:high]).mul_(scaling)
        grad_B[:, low:high] = (dy_rows.t() @ xa[start:end, : high - low]).mul_(scaling)
        if not needs_input_grad:
            continue
        if rng.numel():
            _dropout_rows(
                grad_xa @ lora_A[low:high], dx, rows, rng, dropout_p, scatter=True, alpha=scaling, accumulate=True
            )
        else:
            dx.index_copy_(0, rows, torch.addmm(dx.index_select(0, rows), grad_xa, lora_A[low:high], alpha=scaling))
    return dx.view(x.shape) if needs_input_grad else dx, grad_A, grad_B


def _fake_multi_forward(x, lora_A, lora_B, scalings, max_rank):
    rows = math.prod(x.shape[:-1])
    index = torch.int64
    return (
        x.new_empty((*x.shape[:-1], lora_B.shape[0])),
        x.new_empty((rows, max_rank)),
        x.new_empty(rows, dtype=index),
        x.new_empty(scalings.shape[0] + 1, dtype=index),
    )


# base kind -> (the base's tensor arguments, its scalar arguments, their counts, the _Base from them)
_MULTI_BASE_LAYOUTS = {
    "dense": ("Tensor weight", "", 1, 0, lambda tensors, scalars: _DenseBase(*tensors)),
    "nf4": (
        "Tensor packed, Tensor absmax, Tensor code",
        ", int blocksize, SymInt out_features, SymInt in_features",
        3,
        3,
        lambda tensors, scalars: _NF4Base(*tensors, *scalars),
    ),
    "int8": (
        "Tensor weight, Tensor weight_stats",
        ", float threshold",
        2,
        1,
        lambda tensors, scalars: _Int8Base(*tensors, *scalars),
    ),
}
_MULTI_IMPLS = {
    "reference": (_reference_multi_forward, _reference_multi_backward),
    "native": (_native_multi_forward, _native_multi_backward),
    "triton": (_native_multi_forward, _native_multi_backward),
}


def _check_offsets(op: str, name: str, offsets, count: int, last: int, starts_at_zero: bool = True) -> list:
    """offsets int64 [count], non-decreasing from 0 (or from any value >= 0) to `last`; returns them as Python
    ints (one sync)."""
    check_dtype(op, name, offsets, (torch.int64,))
    check_numel(op, name, offsets, count, "one more than the adapter count")
    values = offsets.tolist()
    first_ok = values[0] == 0 if starts_at_zero else values[0] >= 0
    if not first_ok or values[-1] != last or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"{op}: {name} must rise from {'0' if starts_at_zero else '>= 0'} to {last} without "
            f"decreasing, got {values}"
        )
    return values


def _check_index_range(op: str, name: str, t, low: int, high: int) -> None:
    """int64 t with every value in [low, high) (one sync): these index rows in the kernels."""
    check_dtype(op, name, t, (torch.int64,))
    if t.numel():
        lo, hi = t.min().item(), t.max().item()
        if lo < low or hi >= high:
            raise ValueError(f"{op}: {name} must lie in [{low}, {high}), got values in [{lo}, {hi}]")


def _check_multi_adapters(
    op, x, lora_A, lora_B, rank_offsets, scalings, out_features, in_features, dropout_p, rng, width: int, bias=None
) -> int:
    """The packed adapters (A_cat [R, in], B_cat [out, R], rank_offsets [n + 1], scalings fp32 [n], every rank
    <= width); returns M."""
    rows = check_lora_args(op, x, lora_A, lora_B, out_features, in_features, dropout_p, rng, bias)
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"{op}: lora_B is {tuple(lora_B.shape)}, its total rank must be lora_A's {lora_A.shape[0]}")
    check_dtype(op, "scalings", scalings, (torch.float32,))
    if scalings.dim() != 1:
        raise ValueError(f"{op}: scalings must be 1-D, got shape {tuple(scalings.shape)}")
    offsets = _check_offsets(op, "rank_offsets", rank_offsets, scalings.numel() + 1, lora_A.shape[0])
    ranks = [high - low for low, high in zip(offsets, offsets[1:])]
    if ranks and max(ranks) > width:
        raise ValueError(f"{op}: an adapter's rank exceeds max_rank {width}")
    if not torch.isfinite(scalings).all():
        raise ValueError(f"{op}: scalings must be finite")
    return rows


def _define_multi_ops(kind: str):
    """The (forward, backward) op pair of multi-adapter LoRA over base `kind`; arguments as in the section note."""
    tensors_schema, scalars_schema, n_tensors, n_scalars, make_base = _MULTI_BASE_LAYOUTS[kind]
    name = "lora_multi" if kind == "dense" else f"lora_multi_{kind}"

    def forward_impl(impl):
        def forward(x, *args):
            base_tensors, args = args[:n_tensors], args[n_tensors:]
            bias, lora_A, lora_B, rank_offsets, scalings, row_adapter, *rest = args
            base = make_base(base_tensors, rest[:n_scalars])
            return impl(base, x, bias, lora_A, lora_B, rank_offsets, scalings, row_adapter, *rest[n_scalars:])

        return forward

    def backward_impl(impl):
        def backward(dy, x, *args):
            base_tensors, args = args[:n_tensors], args[n_tensors:]
            lora_A, lora_B, rank_offsets, scalings, xa, row_order, segment_offsets, *rest = args
            base = make_base(base_tensors, rest[:n_scalars])
            return impl(
                base, dy, x, lora_A, lora_B, rank_offsets, scalings, xa, row_order, segment_offsets, *rest[n_scalars:]
            )

        return backward

    def fake_forward(x, *args):
        _, lora_A, lora_B, _, scalings, _, *rest = args[n_tensors:]
        return _fake_multi_forward(x, lora_A, lora_B, scalings, rest[n_scalars])

    def fake_backward(dy, x, *args):
        lora_A, lora_B = args[n_tensors : n_tensors + 2]
        return _fake_backward(x, lora_A, lora_B, args[-1])

    check_base = {"dense": _check_dense_base, "nf4": _check_nf4_base, "int8": _check_int8_base}[kind]

    def check_forward(x, *args):
        op = f"{name}_forward"
        base_tensors, (bias, lora_A, lora_B, rank_offsets, scalings, row_adapter, *rest) = (
            args[:n_tensors],
            args[n_tensors:],
        )
        max_rank, dropout_p, rng = rest[n_scalars:]
        out_features, in_features = check_base(op, x, base_tensors, tuple(rest[:n_scalars]))
        check_int(op, "max_rank", max_rank, low=0)
        rows = _check_multi_adapters(
            op, x, lora_A, lora_B, rank_offsets, scalings, out_features, in_features, dropout_p, rng, max_rank, bias
        )
        check_numel(op, "row_adapter", row_adapter, rows, "one adapter id per row of x")
        _check_index_range(op, "row_adapter", row_adapter, -1, scalings.numel())

    def check_backward(dy, x, *args):
        op = f"{name}_backward"
        base_tensors, args = args[:n_tensors], args[n_tensors:]
        lora_A, lora_B, rank_offsets, scalings, xa, row_order, segment_offsets, *rest = args
        dropout_p, rng, _ = rest[n_scalars:]
        out_features, in_features = check_base(op, x, base_tensors, tuple(rest[:n_scalars]))
        if xa.dim() != 2:
            raise ValueError(f"{op}: xa must be 2-D [M, max_rank], got shape {tuple(xa.shape)}")
        rows = _check_multi_adapters(
            op, x, lora_A, lora_B, rank_offsets, scalings, out_features, in_features, dropout_p, rng, xa.shape[1]
        )
        _check_backward_extras(op, dy, x, lora_A, xa, rows, out_features, xa.shape[1])
        check_numel(op, "row_order", row_order, rows, "one entry per row of x")
        _check_index_range(op, "row_order", row_order, 0, rows)
        # segment_offsets[0] counts the base-only rows (adapter -1), sorted first
        _check_offsets(op, "segment_offsets", segment_offsets, scalings.numel() + 1, rows, starts_at_zero=False)

    forward = define_op(
        f"{name}_forward",
        f"(Tensor x, {tensors_schema}, Tensor bias, Tensor lora_A, Tensor lora_B, "
        f"Tensor rank_offsets, Tensor scalings, Tensor row_adapter{scalars_schema}, SymInt max_rank, "
        "float dropout_p, Tensor rng) -> (Tensor, Tensor, Tensor, Tensor)",
        family="lora",
        fake=fake_forward,
        check=check_forward,
        **{backend: forward_impl(pair[0]) for backend, pair in _MULTI_IMPLS.items()},
    )
    backward = define_op(
        f"{name}_backward",
        f"(Tensor dy, Tensor x, {tensors_schema}, Tensor lora_A, Tensor lora_B, "
        f"Tensor rank_offsets, Tensor scalings, Tensor xa, Tensor row_order, Tensor segment_offsets{scalars_schema}, "
        "float dropout_p, Tensor rng, bool needs_input_grad) -> (Tensor, Tensor, Tensor)",
        family="lora",
        fake=fake_backward,
        check=check_backward,
        **{backend: backward_impl(pair[1]) for backend, pair in _MULTI_IMPLS.items()},
    )
    return forward, backward


# base kind -> (forward op, backward op) of multi-adapter LoRA
MULTI_BASE_OPS = {kind: _define_multi_ops(kind) for kind in _MULTI_BASE_LAYOUTS}


@carry_backend
class LoRALinearMultiFunction(torch.autograd.Function):
    """Multi-adapter LoRA over a frozen base; gradients for x, bias and every adapter's A_i, B_i. The adapters
    come in as separate tensors and are packed here (torch.cat: one copy of sum r_i * (in + out) elements per
    forward, kept for backward in place of the n tensors); backward hands each adapter a view of the packed
    gradients (torch.split, no copy). Saves x, A_cat, B_cat, xa [M, max_rank], the row grouping, rng and the
    base's tensors: never x_d or the mask."""

    @staticmethod
    def forward(
        ctx,
        x,
        bias,
        row_adapter,
        rank_offsets,
        scalings,
        max_rank: int,
        dropout_p: float,
        rng,
        base_kind: str,
        base_scalars: tuple,
        ranks: tuple,
        *tensors,
    ):
        num_adapters = len(ranks)
        base_tensors = tensors[: len(tensors) - 2 * num_adapters]
        lora_As, lora_Bs = tensors[len(base_tensors) : -num_adapters], tensors[-num_adapters:]
        lora_A, lora_B = torch.cat(lora_As), torch.cat(lora_Bs, dim=1)
        forward_op, _ = MULTI_BASE_OPS[base_kind]
        y, xa, row_order, segment_offsets = forward_op(
            x,
            *base_tensors,
            bias,
            lora_A,
            lora_B,
            rank_offsets,
            scalings,
            row_adapter,
            *base_scalars,
            max_rank,
            dropout_p,
            rng,
        )
        ctx.save_for_backward(
            x, lora_A, lora_B, rank_offsets, scalings, xa, row_order, segment_offsets, rng, *base_tensors
        )
        ctx.settings = (base_kind, base_scalars, ranks, dropout_p)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, rank_offsets, scalings, xa, row_order, segment_offsets, rng, *base_tensors = (
            ctx.saved_tensors
        )
        base_kind, base_scalars, ranks, dropout_p = ctx.settings
        _, backward_op = MULTI_BASE_OPS[base_kind]
        needs = ctx.needs_input_grad
        dx, grad_A, grad_B = backward_op(
            dy,
            x,
            *base_tensors,
            lora_A,
            lora_B,
            rank_offsets,
            scalings,
            xa,
            row_order,
            segment_offsets,
            *base_scalars,
            dropout_p,
            rng,
            needs[0],
        )
        grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0) if needs[1] else None
        return (
            (dx if needs[0] else None),
            grad_bias,
            *([None] * (9 + len(base_tensors))),
            *torch.split(grad_A, ranks),
            *torch.split(grad_B, ranks, dim=1),
        )


def _adapter_rows(fn: str, adapter_ids, x, num_adapters: int) -> torch.Tensor:
    """adapter_ids (per sequence [B] for x [B, S, ..., in], or per token, x's leading dims) as int64 [M]."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"{fn}: adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype != torch.int64:
        raise TypeError(f"{fn}: adapter_ids must have dtype int64, got {str(adapter_ids.dtype).replace('torch.', '')}")
    check_same_device(fn, x=x, adapter_ids=adapter_ids)
    leading = tuple(x.shape[:-1])
    if tuple(adapter_ids.shape) == leading:
        row_adapter = adapter_ids
    elif x.dim() >= 3 and tuple(adapter_ids.shape) == leading[:1]:
        row_adapter = adapter_ids.view(-1, *([1] * (len(leading) - 1))).expand(leading)
    else:
        per_sequence = f" or [{leading[0]}] (one per sequence)" if x.dim() >= 3 else ""
        raise ValueError(
            f"{fn}: adapter_ids has shape {tuple(adapter_ids.shape)}, expected {list(leading)} "
            f"(one per row of x){per_sequence}"
        )
    if row_adapter.numel():
        low, high = adapter_ids.min().item(), adapter_ids.max().item()
        if low < -1 or high >= num_adapters:
            raise ValueError(
                f"{fn}: adapter_ids must lie in [-1, {num_adapters}) (-1: base only), got values in [{low}, {high}]"
            )
    return row_adapter.reshape(-1).contiguous()


def _check_adapters(fn: str, adapters, x, out_features: int, in_features: int):
    """(lora_As, lora_Bs, scalings as floats) of a non-empty sequence of (lora_A, lora_B, scaling)."""
    if not isinstance(adapters, (list, tuple)):
        raise TypeError(
            f"{fn}: adapters must be a list or tuple of (lora_A, lora_B, scaling), got {type(adapters).__name__}"
        )
    if not adapters:
        raise ValueError(f"{fn}: adapters must hold at least one (lora_A, lora_B, scaling), got an empty sequence")
    lora_As, lora_Bs, scalings = [], [], []
    for index, adapter in enumerate(adapters):
        name = f"adapters[{index}]"
        if not (isinstance(adapter, (list, tuple)) and len(adapter) == 3):
            raise TypeError(f"{fn}: {name} must be a (lora_A, lora_B, scaling) triple, got {type(adapter).__name__}")
        lora_A, lora_B, scaling = adapter
        check_tensor(fn, f"{name}'s lora_A", lora_A, dim=2)
        check_tensor(fn, f"{name}'s lora_B", lora_B, dim=2)
        if lora_A.shape[1] != in_features:
            raise ValueError(
                f"{fn}: {name}'s lora_A is {tuple(lora_A.shape)}, expected [r, {in_features}] (in_features)"
            )
        if lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(
                f"{fn}: {name}'s lora_B is {tuple(lora_B.shape)}, its rank (dim 1) must match lora_A's "
                f"rank {lora_A.shape[0]}"
            )
        if lora_B.shape[0] != out_features:
            raise ValueError(
                f"{fn}: {name}'s lora_B is {tuple(lora_B.shape)}, expected [{out_features}, r] (out_features)"
            )
        check_same_dtype(fn, x=x, **{f"{name}'s lora_A": lora_A, f"{name}'s lora_B": lora_B})
        check_same_device(fn, x=x, **{f"{name}'s lora_A": lora_A, f"{name}'s lora_B": lora_B})
        lora_As.append(lora_A)
        lora_Bs.append(lora_B)
        scalings.append(check_real(fn, f"{name}'s scaling", scaling))
    return lora_As, lora_Bs, scalings


def lora_linear_multi(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None,
    adapters,
    adapter_ids: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """One frozen base, many LoRA adapters in one batch: row m of x gets x W^T + b + s_i * dropout(x) A_i^T B_i^T
    with i = its adapter id (-1: the base alone). Differentiable w.r.t. x, bias and every A_i, B_i (adapter i's
    gradients come from its rows only).

    weight: as lora_linear's (dense, NF4 (packed, state) or int8 (codes, SCB[, threshold])). adapters: a sequence
    of (lora_A [r_i, in], lora_B [out, r_i], scaling_i) in x's dtype; ranks may differ; scaling_i is applied as
    fp32. adapter_ids: int64, per sequence ([B] for x [B, S, in]) or per row (x's leading dims), values in
    [-1, len(adapters)); checking them reads them on the host. Dropout as lora_linear's, the mask of an element
    that of its position in x: a batch where every row uses one adapter matches lora_linear with that adapter
    under the same seed.
    """
    fn = "lora_linear_multi"
    check_tensor(fn, "x", x, min_dim=1)
    dtype = autocast_dtype(x)  # F.linear's autocast rule for every product (ops/_autocast.py)
    if dtype is not None:
        x, bias = cast_like_linear(dtype, x, bias)
        if isinstance(weight, torch.Tensor):
            (weight,) = cast_like_linear(dtype, weight)
        if isinstance(adapters, (list, tuple)):
            adapters = [
                (*cast_like_linear(dtype, *adapter[:2]), *adapter[2:])
                if isinstance(adapter, (list, tuple))
                else adapter
                for adapter in adapters
            ]
    base_kind, base_scalars, base_tensors, out_features, in_features = _base_from_weight(fn, weight, x)
    if base_kind == "dense" and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{fn}: weight requires grad, but lora_linear_multi trains the adapters and bias only; "
            "freeze it (weight.requires_grad_(False)) or train it through lora_linear"
        )
    if x.shape[-1] != in_features:
        raise ValueError(f"{fn}: x's last dim is {x.shape[-1]}, the weight's in_features is {in_features}")
    lora_As, lora_Bs, scalings = _check_adapters(fn, adapters, x, out_features, in_features)
    row_adapter = _adapter_rows(fn, adapter_ids, x, len(lora_As))
    dropout_p = _check_dropout(fn, dropout_p, training)
    bias = _checked_bias(fn, bias, x, out_features)
    ranks = tuple(lora_A.shape[0] for lora_A in lora_As)
    rank_offsets = torch.tensor([0, *itertools.accumulate(ranks)], dtype=torch.int64, device=x.device)
    scalings = torch.tensor(scalings, dtype=torch.float32, device=x.device)
    return LoRALinearMultiFunction.apply(
        x,
        bias,
        row_adapter,
        rank_offsets,
        scalings,
        max(ranks),
        dropout_p,
        _draw_rng(x, dropout_p, training),
        base_kind,
        base_scalars,
        ranks,
        *base_tensors,
        *lora_As,
        *lora_Bs,
    )
