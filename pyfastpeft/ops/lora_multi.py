"""Multi-adapter LoRA batches over a frozen base: custom ops, backends, autograd and lora_linear_multi.

One batch, many adapters (S-LoRA / Punica's SGMV layout), trained: each row of x picks an adapter (or -1, base
only). The math, the packed layout (A_cat [R, in], B_cat [out, R], rank_offsets int64 [n + 1], scalings fp32
[n]) and the row grouping (row_order, segment_offsets) are written out in pyfastpeft/reference/lora.py.
  pyfastpeft::lora_multi_forward(x, weight, bias, lora_A, lora_B, rank_offsets, scalings, row_adapter,
      max_rank, dropout_p, rng) -> (y, xa, row_order, segment_offsets)
  pyfastpeft::lora_multi_backward(dy, x, weight, lora_A, lora_B, rank_offsets, scalings, xa, row_order,
      segment_offsets, dropout_p, rng, needs_input_grad) -> (dx, dA_cat, dB_cat)
  _nf4 / _int8 variants: the base tensors in place of weight and the base scalars before max_rank / dropout_p.
xa: [M, max_rank] in row_order, zeros past each adapter's rank. The grouping is computed once, in forward.
Backends: reference (a loop over adapters, dropout over the whole x); native CPU (a stable argsort, then per
adapter one GEMM pair on its gathered rows; dropout fused into the gather of x and the scatter-add of dX by
the C++ lora_dropout_rows, at each row's original position). There is no segmented Triton kernel: the triton
backend runs the native path on CPU tensors and the reference elsewhere.
"""

from __future__ import annotations

import itertools
import math

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops._autocast import autocast_dtype, cast_like_linear
from pyfastpeft.ops._checks import (
    check_dtype,
    check_int,
    check_numel,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from pyfastpeft.ops._library import define_op
from pyfastpeft.ops.lora import (
    _check_backward_extras,
    _check_dropout,
    _checked_bias,
    _draw_rng,
    _fake_backward,
    _keep_scale,
    _keep_threshold,
    _up_grads,
    check_lora_args,
)
from pyfastpeft.ops.lora_base import BASE_KINDS, BaseKind, dispatch_base
from pyfastpeft.reference import lora as ref


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
        _keep_threshold(dropout_p),
        _keep_scale(dropout_p),
        alpha,
        accumulate,
    )


def _gather_dropped(x2d, rows, rng, dropout_p: float):
    """dropout(x)[rows] [len(rows), in] without forming dropout(x)."""
    if rng is None:
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
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    dy2d = dy.reshape(-1, out_features).contiguous()
    x2d = x.reshape(-1, in_features).contiguous()
    lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
    grad_A, grad_B = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    dx = base.grad_input(dy2d) if needs_input_grad else x.new_empty(0)
    for low, high, start, end, scaling in _adapter_segments(rank_offsets, scalings, segment_offsets):
        rows = row_order[start:end]
        dy_rows = dy2d.index_select(0, rows)
        # dY B and s dY^T xa as lora_linear's backward makes them (its kernel where it takes one): the same bits
        grad_xa, grad_B[:, low:high] = _up_grads(dy_rows, lora_B[:, low:high], xa[start:end, : high - low], scaling)
        torch.mm(grad_xa.t(), _gather_dropped(x2d, rows, rng, dropout_p), out=grad_A[low:high]).mul_(scaling)
        if not needs_input_grad:
            continue
        if rng is not None:
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


def _cpu_native_else_reference(native, reference):
    """No segmented Triton kernel: under the triton backend, the native path on CPU tensors, else the reference."""

    def run(base, *args):
        return (native if args[0].device.type == "cpu" else reference)(base, *args)

    return run


_MULTI_IMPLS = {
    "reference": (_reference_multi_forward, _reference_multi_backward),
    "native": (_native_multi_forward, _native_multi_backward),
    "triton": (
        _cpu_native_else_reference(_native_multi_forward, _reference_multi_forward),
        _cpu_native_else_reference(_native_multi_backward, _reference_multi_backward),
    ),
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


def _define_multi_ops(kind: BaseKind):
    """The (forward, backward) op pair of multi-adapter LoRA over base `kind`; arguments as in the module note."""
    tensors_schema, scalars_schema = kind.tensors_schema, kind.scalars_schema
    n_tensors, n_scalars, make_base, check_base = kind.n_tensors, kind.n_scalars, kind.make, kind.check
    name = kind.op_name("lora_multi")

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
        f"(Tensor x, {tensors_schema}, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        f"Tensor rank_offsets, Tensor scalings, Tensor row_adapter{scalars_schema}, SymInt max_rank, "
        "float dropout_p, Tensor? rng) -> (Tensor, Tensor, Tensor, Tensor)",
        family="lora",
        fake=fake_forward,
        check=check_forward,
        **{backend: forward_impl(pair[0]) for backend, pair in _MULTI_IMPLS.items()},
    )
    backward = define_op(
        f"{name}_backward",
        f"(Tensor dy, Tensor x, {tensors_schema}, Tensor lora_A, Tensor lora_B, "
        f"Tensor rank_offsets, Tensor scalings, Tensor xa, Tensor row_order, Tensor segment_offsets{scalars_schema}, "
        "float dropout_p, Tensor? rng, bool needs_input_grad) -> (Tensor, Tensor, Tensor)",
        family="lora",
        fake=fake_backward,
        check=check_backward,
        **{backend: backward_impl(pair[1]) for backend, pair in _MULTI_IMPLS.items()},
    )
    return forward, backward


# base kind name -> (forward op, backward op) of multi-adapter LoRA
MULTI_BASE_OPS = {kind.name: _define_multi_ops(kind) for kind in BASE_KINDS}


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
    kind, base_scalars, base_tensors, out_features, in_features = dispatch_base(fn, weight, x)
    if kind.trainable and weight.requires_grad and torch.is_grad_enabled():
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
        kind.name,
        base_scalars,
        ranks,
        *base_tensors,
        *lora_As,
        *lora_Bs,
    )
