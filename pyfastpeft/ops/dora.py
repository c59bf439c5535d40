"""DoRA over a frozen base: custom ops, the autograd Function and the public dora_linear.

    y = x W^T + b + (g - 1) * (x_d W^T) + g * s (x_d A^T) B^T,    g = m / ||W + s B A||_row (detached)
PEFT's DoRA layer (peft.tuners.lora.dora.DoraLinearLayer); the math of forward and backward is written out in
pyfastpeft/reference/dora.py. The products are LoRA's own ops over the same base kinds (ops/lora.py: dense, NF4,
LLM.int8), so every base and backend LoRA has, DoRA has; this file adds what DoRA computes around them:
  pyfastpeft::dora_norm{_kind}(*base tensors, lora_A, lora_B, *base scalars, scaling) -> n
      ||W + s B A|| per row, fp32 [out] (fp64 when A, B or a dense W is). On the CPU it never builds W + s B A, nor a
      dense W from a quantized base: one pass over W's rows adds s B A a chunk at a time and sums the squares (a
      quantized base is dequantized a tile of rows at a time into fp32 first). PEFT builds the whole dense matrix
      (and an identity of in x in) on every forward.
  pyfastpeft::dora_scale(z, scale, addend) -> y = scale * z + addend, one rounding (addend None, [out] or [M, out])
  pyfastpeft::dora_grad(dy, z, scale) -> (scale * dy, sum over rows of dy * z): one read of dY and z gives the
      gradient fed to LoRA's backward and the magnitude's.
  pyfastpeft::dora_dropout(x, rng, dropout_p) -> x_d: LoRA's counter-based mask (pyfastpeft/reference/lora.py).
scale and the sums are fp32 (fp64 for fp64 data), [out]. dora_scale and dora_grad have Triton kernels
(triton_kernels/dora.py; compiled for sm_80/sm_90 in CI, not yet run on a GPU), which CUDA tensors use under
use_backend("triton"); until GPU measurements are committed, CUDA's default for this family is the reference.

Autograd saves x (never x_d: the mask is regenerated from rng), A, B, xa [M, r], z [M, out] (the pre-scale output,
which the magnitude's gradient needs), the magnitude, n, rng and the base. Without dropout the forward is one fused
LoRA call and one dora_scale pass; with dropout the base product runs on x and on x_d, as in PEFT.
"""

from __future__ import annotations

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops import int8 as int8_ops
from pyfastpeft.ops import lora as lora_ops
from pyfastpeft.ops import nf4 as nf4_ops
from pyfastpeft.ops._autocast import autocast_dtype, cast_like_linear
from pyfastpeft.ops._checks import FLOAT_DTYPES, check_dtype, check_real, check_same_device, check_tensor
from pyfastpeft.ops._library import define_op, triton_module
from pyfastpeft.ops.lora_base import BASE_KINDS, KINDS, BaseKind, dispatch_base
from pyfastpeft.reference import dora as ref
from pyfastpeft.reference import int8 as int8_ref
from pyfastpeft.reference import lora as lora_ref
from pyfastpeft.reference import nf4 as nf4_ref

# Rows of W dequantized at a time by the native norm: about 1 MiB of fp32, so a tile stays in the L2 cache.
NORM_TILE_BYTES = 1 << 20

_ADDEND_KINDS = {"none": 0, "row": 1, "full": 2}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- dora_scale / dora_grad ----------------------------------------------------------------------------------


def _check_scale(op: str, z, scale) -> None:
    check_dtype(op, "z", z, FLOAT_DTYPES)
    if z.dim() != 2:
        raise ValueError(f"{op}: z must be 2-D [M, out_features], got shape {tuple(z.shape)}")
    check_dtype(op, "scale", scale, (_compute_dtype(z.dtype),))
    if tuple(scale.shape) != (z.shape[1],):
        raise ValueError(f"{op}: scale has shape {tuple(scale.shape)}, expected [{z.shape[1]}] (z's columns)")


def _check_dora_scale(z, scale, addend):
    op = "dora_scale"
    _check_scale(op, z, scale)
    if addend is not None:
        check_dtype(op, "addend", addend, (z.dtype,))
        if tuple(addend.shape) not in ((z.shape[1],), tuple(z.shape)):
            raise ValueError(
                f"{op}: addend has shape {tuple(addend.shape)}, expected [{z.shape[1]}] or {list(z.shape)} (z's)"
            )


def _check_dora_grad(dy, z, scale):
    op = "dora_grad"
    _check_scale(op, z, scale)
    check_dtype(op, "dy", dy, (z.dtype,))
    if dy.shape != z.shape:
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, z has {tuple(z.shape)}")


def _reference_scale(z, scale, addend):
    y = scale * z.to(scale.dtype)
    if addend is not None:
        y = y + addend.to(scale.dtype)
    return y.to(z.dtype)


def _native_scale(z, scale, addend):
    y = _native.empty(z.shape, dtype=z.dtype, device=z.device)
    if z.numel():
        kind = "none" if addend is None else ("row" if addend.dim() == 1 else "full")
        addend = None if addend is None else addend.contiguous()
        _native.launch(
            "dora_scale", z, z.contiguous(), scale.contiguous(), addend, _ADDEND_KINDS[kind], y, *z.shape, z.dtype
        )
    return y


def _reference_grad(dy, z, scale):
    c = scale.dtype
    return (scale * dy.to(c)).to(dy.dtype), (dy.to(c) * z.to(c)).sum(0)


def _native_grad(dy, z, scale):
    dy_scaled = _native.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    column_sum = torch.zeros(z.shape[1], dtype=scale.dtype, device=z.device)
    if z.numel():
        _native.launch(
            "dora_grad",
            z,
            dy.contiguous(),
            z.contiguous(),
            scale.contiguous(),
            dy_scaled,
            column_sum,
            *z.shape,
            z.dtype,
        )
    return dy_scaled, column_sum


def _triton_scale(z, scale, addend):
    if scale.dtype != torch.float32:  # fp64 data: the kernels compute in fp32
        return _reference_scale(z, scale, addend)
    y = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    triton_module("dora").dora_scale(
        z.contiguous(), scale.contiguous(), None if addend is None else addend.contiguous(), y
    )
    return y


def _triton_grad(dy, z, scale):
    if scale.dtype != torch.float32:
        return _reference_grad(dy, z, scale)
    g = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    column_sum = torch.zeros(z.shape[1], dtype=torch.float32, device=z.device)
    triton_module("dora").dora_grad(dy.contiguous(), z.contiguous(), scale.contiguous(), g, column_sum)
    return g, column_sum


dora_scale = define_op(
    "dora_scale",
    "(Tensor z, Tensor scale, Tensor? addend) -> Tensor",
    family="dora",
    fake=lambda z, scale, addend: z.new_empty(z.shape),
    reference=_reference_scale,
    native=_native_scale,
    triton=_triton_scale,
    check=_check_dora_scale,
)
dora_grad = define_op(
    "dora_grad",
    "(Tensor dy, Tensor z, Tensor scale) -> (Tensor, Tensor)",
    family="dora",
    fake=lambda dy, z, scale: (dy.new_empty(dy.shape), scale.new_empty(scale.shape)),
    reference=_reference_grad,
    native=_native_grad,
    triton=_triton_grad,
    check=_check_dora_grad,
)


# ---- dora_dropout --------------------------------------------------------------------------------------------


def _check_dropout(x, rng, dropout_p):
    op = "dora_dropout"
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_real(op, "dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    check_dtype(op, "rng", rng, (torch.int64,))
    if rng.shape != (2,):
        raise ValueError(f"{op}: rng must be the int64 pair (seed, offset) of shape [2], got shape {tuple(rng.shape)}")


def _native_dropout(x, rng, dropout_p):
    out = _native.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        lora_ops.dropout_into(x.contiguous(), out, rng, dropout_p)
    return out


def _triton_dropout(x, rng, dropout_p):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        keep_scale = float(torch.tensor(1.0 / (1.0 - dropout_p), dtype=torch.float32))
        triton_module("lora").dropout_into(x.contiguous(), out, rng, dropout_p, keep_scale, 1.0, False)
    return out


dora_dropout = define_op(
    "dora_dropout",
    "(Tensor x, Tensor rng, float dropout_p) -> Tensor",
    family="lora",  # LoRA's mask, on LoRA's backends
    fake=lambda x, rng, dropout_p: x.new_empty(x.shape),
    reference=lambda x, rng, dropout_p: lora_ref.dropout(x, dropout_p, rng).contiguous(),
    native=_native_dropout,
    triton=_triton_dropout,
    check=_check_dropout,
)


# ---- dora_norm, one op per base kind ------------------------------------------------------------------------


def _reference_dense_weight(base, dtype: torch.dtype) -> torch.Tensor:
    """The base's W as a dense [out, in] tensor of dtype (the reference builds it whole, as PEFT does)."""
    if base.kind == "dense":
        return base.weight.to(dtype)
    if base.kind == "nf4":
        numel = base.out_features * base.in_features
        flat = nf4_ref.dequantize_4bit(base.packed, base.absmax, base.code, base.blocksize, numel, torch.float32)
        return flat.view(base.out_features, base.in_features).to(dtype)
    return int8_ref.dequantize_weight(base.weight, base.weight_stats, torch.float32).to(dtype)


def _quantized_row_tiles(base, out_features: int, in_features: int):
    """Yields (n0, n1, W[n0:n1] as fp32) of an NF4 or int8 base through one reused tile, natively dequantized."""
    if base.kind == "nf4":
        yield from nf4_ops._weight_tiles(
            base.packed, base.absmax, base.code, base.blocksize, out_features, in_features, torch.float32
        )
        return
    rows = max(1, min(out_features, NORM_TILE_BYTES // max(1, 4 * in_features)))
    buffer = torch.empty(rows * in_features, dtype=torch.float32)
    weight, stats = base.weight.contiguous(), base.weight_stats.float().contiguous()
    for n0 in range(0, out_features, rows):
        n1 = min(n0 + rows, out_features)
        tile = buffer[: (n1 - n0) * in_features].view(n1 - n0, in_features)
        int8_ops.dequantize_rows_into(weight[n0:n1], stats[n0:n1], tile)
        yield n0, n1, tile


def norm_into(weight, lora_A, lora_B, scaling: float, norm) -> None:
    """Native: norm[i] = ||W[i] + s B[i] A|| for a contiguous dense W [rows, in] of any float dtype; lora_A [r, in],
    lora_B [rows, r] and norm [rows] contiguous, in norm's dtype (fp32 or fp64), r <= MAX_NATIVE_NORM_RANK."""
    if norm.numel():
        _native.launch(
            "dora_norm",
            weight,
            weight,
            weight.dtype,
            lora_A,
            lora_B,
            norm.dtype,
            scaling,
            norm,
            *weight.shape,
            lora_A.shape[0],
        )


MAX_NATIVE_NORM_RANK = 256  # the CPU kernel's bound (csrc/cpu/dora.cpp); larger ranks run the reference


def _norm_impls(kind: BaseKind):
    n_tensors, n_scalars = kind.n_tensors, kind.n_scalars

    def split(args):
        base_tensors, (lora_A, lora_B, *rest) = args[:n_tensors], args[n_tensors:]
        return kind.make(base_tensors, rest[:n_scalars]), lora_A, lora_B, rest[n_scalars]

    def reference(*args):
        base, lora_A, lora_B, scaling = split(args)
        c = ref.compute_dtype(lora_A, lora_B)
        return ref.weight_norm(_reference_dense_weight(base, c), lora_A, lora_B, scaling)

    def native(*args):
        base, lora_A, lora_B, scaling = split(args)
        if lora_A.device.type != "cpu" or lora_A.shape[0] > MAX_NATIVE_NORM_RANK:
            return reference(*args)
        c = ref.compute_dtype(lora_A, lora_B, base.weight if kind.name == "dense" else None)
        out_features, in_features = lora_B.shape[0], lora_A.shape[1]
        norm = torch.empty(out_features, dtype=c)
        lora_A_c, lora_B_c = lora_A.to(c).contiguous(), lora_B.to(c).contiguous()
        if kind.name == "dense":
            norm_into(base.weight.contiguous(), lora_A_c, lora_B_c, scaling, norm)
        else:
            for n0, n1, tile in _quantized_row_tiles(base, out_features, in_features):
                norm_into(tile, lora_A_c, lora_B_c[n0:n1], scaling, norm[n0:n1])
        return norm

    return reference, native


def _norm_check(name: str, kind: BaseKind):
    n_tensors, n_scalars = kind.n_tensors, kind.n_scalars

    def check(*args):
        op = name
        base_tensors, (lora_A, lora_B, *rest) = args[:n_tensors], args[n_tensors:]
        # a dense W may be of any float dtype here: the norm reads it in fp32 whatever the products' dtype
        like = base_tensors[0] if kind.name == "dense" else lora_A
        check_dtype(op, "lora_A", lora_A, FLOAT_DTYPES)
        out_features, in_features = kind.check(op, like, base_tensors, tuple(rest[:n_scalars]))
        check_dtype(op, "lora_B", lora_B, (lora_A.dtype,))
        if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
            raise ValueError(f"{op}: lora_A is {tuple(lora_A.shape)}, expected [r, {in_features}] (in_features)")
        if tuple(lora_B.shape) != (out_features, lora_A.shape[0]):
            raise ValueError(
                f"{op}: lora_B is {tuple(lora_B.shape)}, expected [{out_features}, {lora_A.shape[0]}] (out, r)"
            )
        check_real(op, "scaling", rest[n_scalars])

    return check


def _define_norm_op(kind: BaseKind):
    name = kind.op_name("dora_norm")
    reference, native = _norm_impls(kind)
    return define_op(
        name,
        f"({kind.tensors_schema}, Tensor lora_A, Tensor lora_B{kind.scalars_schema}, float scaling) -> Tensor",
        family="dora",
        fake=lambda *args: args[kind.n_tensors + 1].new_empty(
            args[kind.n_tensors + 1].shape[0],
            dtype=ref.compute_dtype(args[kind.n_tensors], *(args[: kind.n_tensors] if kind.name == "dense" else ())),
        ),
        reference=reference,
        native=native,
        triton=reference,
        check=_norm_check(name, kind),
    )


NORM_OPS = {kind.name: _define_norm_op(kind) for kind in BASE_KINDS}


# ---- autograd ------------------------------------------------------------------------------------------------


@carry_backend
class DoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + (g - 1) (x_d W^T) + g s (x_d A^T) B^T with g = m / n and n given (detached); gradients for x,
    bias, A, B and the magnitude m (pyfastpeft/reference/dora.py)."""

    @staticmethod
    def forward(
        ctx, x, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, rng, base_kind, base_ints, *base_tensors
    ):
        forward_op, _ = lora_ops.BASE_OPS[base_kind]
        out_features = lora_B.shape[0]
        g = magnitude.to(norm.dtype) / norm
        x_lora = x if rng is None else dora_dropout(x.reshape(-1, x.shape[-1]), rng, dropout_p)
        z, xa = forward_op(x_lora, *base_tensors, None, lora_A, lora_B, *base_ints, scaling, 0.0, None)
        z = z.reshape(-1, out_features)
        if rng is None:  # y = g z + b
            y = dora_scale(z, g, bias)
        else:  # y = (x W^T + b + s xa B^T) + (g - 1) z
            addend = KINDS[base_kind].make(base_tensors, base_ints).forward(x.reshape(-1, x.shape[-1]), bias)
            addend.addmm_(xa, lora_B.t(), alpha=scaling)
            y = dora_scale(z, g - 1, addend)
        ctx.save_for_backward(x, lora_A, lora_B, xa, z, magnitude, norm, rng, *base_tensors)
        ctx.settings = (base_kind, base_ints, scaling, dropout_p)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, xa, z, magnitude, norm, rng, *base_tensors = ctx.saved_tensors
        base_kind, base_ints, scaling, dropout_p = ctx.settings
        _, backward_op = lora_ops.BASE_OPS[base_kind]
        needs = ctx.needs_input_grad
        dy2d = dy.reshape(-1, dy.shape[-1]).to(z.dtype)
        g = magnitude.to(norm.dtype) / norm
        g_dy, column_sum = dora_grad(dy2d, z, g)
        x2d = x.reshape(-1, x.shape[-1])
        x_lora = x2d if rng is None else dora_dropout(x2d, rng, dropout_p)
        dx, grad_A, grad_B = backward_op(
            g_dy, x_lora, *base_tensors, lora_A, lora_B, xa, *base_ints, scaling, 0.0, None, needs[0]
        )
        if needs[0] and rng is not None:  # dX = dY W + D[(g dY) W + s (g dY B) A - dY W]
            through_base = KINDS[base_kind].make(base_tensors, base_ints).grad_input(dy2d)
            dx = through_base + dora_dropout(dx.sub_(through_base), rng, dropout_p)
        grad_magnitude = (column_sum / norm).to(magnitude.dtype) if needs[4] else None
        grad_bias = dy2d.sum(0) if needs[1] else None
        return (
            (dx.view(x.shape) if needs[0] else None),
            grad_bias,
            (grad_A if needs[2] else None),
            (grad_B if needs[3] else None),
            grad_magnitude,
            None,
            None,
            None,
            None,
            None,
            None,
            *([None] * len(base_tensors)),
        )


# ---- the public functions ------------------------------------------------------------------------------------


def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + scaling * B A|| per row of W, fp32 [out] (fp64 when A or B is), without gradient: DoRA's column norm
    (PEFT's get_weight_norm). weight: as lora_linear takes it (dense, NF4 (packed, state), int8 tuple); lora_A [r,
    in], lora_B [out, r] of one float dtype, which need not be the weight's."""
    fn = "dora_weight_norm"
    check_tensor(fn, "lora_A", lora_A, dim=2)
    check_tensor(fn, "lora_B", lora_B, dim=2)
    like = weight if isinstance(weight, torch.Tensor) else lora_A
    kind, base_ints, base_tensors, _, _ = dispatch_base(fn, weight, like)
    check_same_device(fn, lora_A=lora_A, lora_B=lora_B, weight=base_tensors[0])
    scaling = check_real(fn, "scaling", scaling)
    with torch.no_grad():
        return NORM_OPS[kind.name](*base_tensors, lora_A.detach(), lora_B.detach(), *base_ints, scaling)


def dora_linear(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    weight_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """PEFT's DoRA linear: x W^T + b + (g - 1) * (x_d W^T) + g * scaling * x_d A^T B^T, g = magnitude / n with
    n = ||W + scaling B A||_row detached (x_d = dropout(x) when training with dropout_p > 0, else x, and then
    y = g * (x W^T + scaling x A^T B^T) + b). Differentiable w.r.t. x, bias, A, B and magnitude.

    weight, bias, lora_A, lora_B, scaling, dropout_p, training: as lora_linear (autocast casts x, A, B and bias as
    it does there). magnitude: [out] float, PEFT's lora_magnitude_vector; kept in its own dtype (fp32 over a
    half-precision model, as PEFT keeps it), so g and the combination run in fp32. weight_norm: n if already
    known (fp32 [out]), else it is computed from the uncast A and B (dora_weight_norm).
    """
    fn = "dora_linear"
    check_tensor(fn, "x", x, min_dim=1)
    check_tensor(fn, "magnitude", magnitude, dim=1)
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    check_tensor(fn, "weight_norm", weight_norm, dim=1)
    dtype = autocast_dtype(x)
    x_c, lora_A_c, lora_B_c, bias_c = cast_like_linear(dtype, x, lora_A, lora_B, bias)
    weight_c = cast_like_linear(dtype, weight)[0] if isinstance(weight, torch.Tensor) else weight
    if isinstance(weight_c, torch.Tensor) and weight_c.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: weight requires grad; DoRA trains the magnitude and A, B over a frozen weight")
    kind, base_ints, base_tensors, out_features, in_features = dispatch_base(fn, weight_c, x_c)
    for name, t in (("magnitude", magnitude), ("weight_norm", weight_norm)):
        if t.shape[0] != out_features:
            raise ValueError(f"{fn}: {name} has {t.shape[0]} elements, out_features is {out_features}")
    check_same_device(fn, x=x, magnitude=magnitude, weight_norm=weight_norm)
    # the op-level contract (shapes of x, A, B, bias; dropout_p) is checked by lora_linear's own rules
    check_tensor(fn, "lora_A", lora_A_c, dim=2)
    check_tensor(fn, "lora_B", lora_B_c, dim=2)
    lora_ops.check_lora_args(fn, x_c, lora_A_c, lora_B_c, out_features, in_features, dropout_p, None)
    if lora_B_c.shape[1] != lora_A_c.shape[0]:
        raise ValueError(f"{fn}: lora_B is {tuple(lora_B_c.shape)}, its rank must be lora_A's {lora_A_c.shape[0]}")
    bias_c = lora_ops._checked_bias(fn, bias_c, x_c, out_features)
    scaling = check_real(fn, "scaling", scaling)
    dropout_p = lora_ops._check_dropout(fn, dropout_p, training)
    return DoRALinearFunction.apply(
        x_c,
        bias_c,
        lora_A_c,
        lora_B_c,
        magnitude,
        weight_norm.detach().to(_compute_dtype(x_c.dtype)),
        scaling,
        dropout_p,
        lora_ops._draw_rng(x_c, dropout_p, training),
        kind.name,
        base_ints,
        *base_tensors,
    )
