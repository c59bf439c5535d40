"""Fused linear distillation: custom ops, the chunk driver, autograd and the public function.

Knowledge distillation of a student's lm_head output towards a teacher's, without materializing either
[tokens, vocab] logits: tokens go in chunks (the flce machinery); per chunk torch computes the student's
and the teacher's logits into two reused fp32 buffers, one row pass (C++ on CPU, Triton on GPUs) turns them
into the per-token losses and, in place, the student logits' gradient, and torch's matmuls fold that into
dh[chunk] = dzs W and dW += dzs^T h (fp32 accumulator, cast once), db += sum dzs. The teacher gets no
gradient.

Ops (student hidden [T, Hs], weight [V, Hs], bias [V] or None; teacher hidden [T, Ht], weight [V, Ht], bias
[V] or None, of one float dtype of their own; labels int64 [T]; the loss in the student's compute dtype, fp32
or fp64 for fp64 inputs; the math is in pyfastpeft/reference/distill.py):
  pyfastpeft::distill_forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
      student_bias, teacher_bias, ignore_index, beta, temperature, hard_label_weight, reduction,
      need_grad_hidden, need_grad_weight, need_grad_bias, chunk_size)
      -> (loss: [T] for none, [] for mean/sum;  grad_hidden, grad_weight, grad_bias of the student)
      The gradients are those of the reduced loss (of loss.sum() for none), computed in the forward pass;
      empty where not asked.
  pyfastpeft::distill_backward(grad_loss [T], the same inputs and settings but reduction)
      -> (grad_hidden, grad_weight, grad_bias) for per-token output grads (reduction none), recomputing the
      logits chunk by chunk.
beta in [0, 1] (0: forward KL, 1: reverse KL, between: the generalized JSD); temperature > 0; hard_label_weight
in [0, 1]; chunk_size 0 picks the default (the flce byte budget shared by the two buffers).
"""

from __future__ import annotations

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops._autocast import autocast_dtype, cast_like_linear
from pyfastpeft.ops._checks import (
    FLOAT_DTYPES,
    check_dtype,
    check_features,
    check_int,
    check_last_dim,
    check_numel,
    check_optional,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from pyfastpeft.ops._library import define_op, triton_module
from pyfastpeft.ops.flce import (
    accumulate_grad_weight,
    check_label_range,
    chunk_rows,
    counted_rows,
    logits_into,
    scatter_rows,
)
from pyfastpeft.reference import distill as ref
from pyfastpeft.reference._common import accumulate_dtype
from pyfastpeft.reference.flce import NONE, REDUCTIONS, reduce, reduction_weights

# loss name -> beta of the generalized JSD (None: the caller's beta)
LOSSES = {"kl": 0.0, "reverse_kl": 1.0, "jsd": None}


def _chunked(
    row_pass,
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    grad_weights,
    settings,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_size: int,
):
    """(loss_t [T], grad_hidden, grad_weight, grad_bias) chunk by chunk. grad_weights: None (no gradients) or
    [T] in the compute dtype, d reduced loss / d loss_t. settings: (ignore_index, beta, temperature,
    hard_label_weight). row_pass(student, teacher, labels, grad_weights or None, loss, *settings) is the
    backend's row kernel on one chunk (contiguous views; the teacher rows are scratch)."""
    tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
    cd, device = accumulate_dtype(student_hidden.dtype), student_hidden.device
    loss = torch.empty(tokens, dtype=cd, device=device)
    with_grads = grad_weights is not None
    grad_hidden = torch.empty_like(student_hidden, memory_format=torch.contiguous_format) if need_grad_hidden else None
    grad_weight = torch.zeros(student_weight.shape, dtype=cd, device=device) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, dtype=cd, device=device) if need_grad_bias else None
    # two fp32 buffers share the byte budget of flce's one
    rows = chunk_rows(tokens, 2 * vocab, chunk_size, device.type)
    student_buffer = torch.empty(rows, vocab, dtype=cd, device=device)
    teacher_buffer = torch.empty(rows, vocab, dtype=cd, device=device)
    student_bias_c = None if student_bias is None else student_bias.to(cd)
    teacher_bias_c = None if teacher_bias is None else teacher_bias.to(cd)
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        h, student, teacher = student_hidden[start:stop], student_buffer[: stop - start], teacher_buffer[: stop - start]
        logits_into(h, student_weight, student)
        logits_into(teacher_hidden[start:stop], teacher_weight, teacher)
        if student_bias_c is not None:
            student.add_(student_bias_c)
        if teacher_bias_c is not None:
            teacher.add_(teacher_bias_c)
        row_pass(
            student,
            teacher,
            labels[start:stop],
            grad_weights[start:stop] if with_grads else None,
            loss[start:stop],
            *settings,
        )
        if not with_grads:
            continue
        dz_input_dtype = student.to(student_hidden.dtype)
        if grad_hidden is not None:
            torch.mm(dz_input_dtype, student_weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            accumulate_grad_weight(grad_weight, student, dz_input_dtype, h)
        if grad_bias is not None:
            grad_bias += student.sum(0)
    return (
        loss,
        student_hidden.new_empty(0) if grad_hidden is None else grad_hidden,
        student_weight.new_empty(0) if grad_weight is None else grad_weight.to(student_weight.dtype),
        student_hidden.new_empty(0) if grad_bias is None else grad_bias.to(student_bias.dtype),
    )


def _native_rows(student, teacher, labels, grad_weights, loss, ignore_index, beta, temperature, hard) -> None:
    rows, vocab = student.shape
    if rows:
        args = (student, teacher, labels, grad_weights, loss, rows, vocab, student.dtype)
        _native.launch("distill_rows", student, *args, ignore_index, beta, temperature, hard)


def _triton_rows(student, teacher, labels, grad_weights, loss, ignore_index, beta, temperature, hard) -> None:
    if student.shape[0]:
        triton_module("distill").distill_rows(
            student, teacher, labels, grad_weights, loss, ignore_index, beta, temperature, hard
        )


def _forward_with(row_pass):
    def forward(sh, sw, th, tw, labels, sb, tb, ignore_index, beta, temperature, hard, reduction, *needs):
        *grad_needs, chunk_size = needs
        labels = labels.contiguous()
        cd = accumulate_dtype(sh.dtype)
        weights = reduction_weights(labels, ignore_index, reduction, cd) if any(grad_needs) else None
        loss, *grads = _chunked(
            row_pass,
            sh,
            sw,
            th,
            tw,
            labels,
            sb,
            tb,
            weights,
            (ignore_index, beta, temperature, hard),
            *grad_needs,
            chunk_size,
        )
        return (reduce(loss, labels, ignore_index, reduction), *grads)

    return forward


def _backward_with(row_pass):
    def backward(grad_loss, sh, sw, th, tw, labels, sb, tb, ignore_index, beta, temperature, hard, *needs):
        weights = grad_loss.to(accumulate_dtype(sh.dtype)).contiguous()
        settings = (ignore_index, beta, temperature, hard)
        _, *grads = _chunked(row_pass, sh, sw, th, tw, labels.contiguous(), sb, tb, weights, settings, *needs)
        return tuple(grads)

    return backward


def _fake_grads(sh, sw, sb, need_grad_hidden, need_grad_weight, need_grad_bias):
    return (
        torch.empty(sh.shape, dtype=sh.dtype, device=sh.device) if need_grad_hidden else sh.new_empty(0),
        torch.empty_like(sw, memory_format=torch.contiguous_format) if need_grad_weight else sw.new_empty(0),
        torch.empty_like(sb) if need_grad_bias else sh.new_empty(0),
    )


def _fake_forward(sh, sw, th, tw, labels, sb, tb, ignore_index, beta, temperature, hard, reduction, *needs):
    loss = sh.new_empty((sh.shape[0],) if reduction == NONE else (), dtype=accumulate_dtype(sh.dtype))
    return (loss, *_fake_grads(sh, sw, sb, *needs[:3]))


def _fake_backward(grad_loss, sh, sw, th, tw, labels, sb, tb, ignore_index, beta, temperature, hard, *needs):
    torch._check(grad_loss.shape == labels.shape, lambda: "distill_backward: grad_loss must be [T]")
    return _fake_grads(sh, sw, sb, *needs[:3])


def _check_inputs(op, sh, sw, th, tw, labels, sb, tb, settings, needs):
    """Student hidden [T, Hs] and weight [V, Hs] of one float dtype (bias [V] in it or None); teacher hidden
    [T, Ht] and weight [V, Ht] of one float dtype (bias likewise); labels int64 [T]."""
    ignore_index, beta, temperature, hard = settings
    for side, hidden, weight, bias in (("student", sh, sw, sb), ("teacher", th, tw, tb)):
        check_dtype(op, f"{side}_hidden", hidden, FLOAT_DTYPES)
        check_dtype(op, f"{side}_weight", weight, (hidden.dtype,))
        if hidden.dim() != 2 or weight.dim() != 2:
            raise ValueError(
                f"{op}: {side}_hidden and {side}_weight must be 2-D, got {tuple(hidden.shape)} and "
                f"{tuple(weight.shape)}"
            )
        check_features(op, f"{side}_hidden", hidden, "hidden size")
        check_last_dim(op, f"{side}_hidden", hidden, weight.shape[1], f"{side}_weight's hidden size")
        if bias is not None:
            check_dtype(op, f"{side}_bias", bias, (hidden.dtype,))
        check_optional(op, f"{side}_bias", bias, sw.shape[0], "the vocabulary")
    if sw.shape[0] < 1:
        raise ValueError(f"{op}: student_weight must have at least one row (the vocabulary), got {tuple(sw.shape)}")
    if tw.shape[0] != sw.shape[0]:
        raise ValueError(
            f"{op}: teacher_weight has {tw.shape[0]} rows, student_weight {sw.shape[0]}: the vocabularies differ"
        )
    if th.shape[0] != sh.shape[0]:
        raise ValueError(
            f"{op}: teacher_hidden has {th.shape[0]} rows, student_hidden {sh.shape[0]}: one per token each"
        )
    check_dtype(op, "labels", labels, (torch.int64,))
    check_numel(op, "labels", labels, sh.shape[0], "one per row of student_hidden")
    check_int(op, "ignore_index", ignore_index)
    check_real(op, "beta", beta, low=0.0, high=1.0)
    check_real(op, "temperature", temperature, low=0.0)
    if temperature <= 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    check_real(op, "hard_label_weight", hard, low=0.0, high=1.0)
    if needs[2] and sb is None:
        raise ValueError(f"{op}: need_grad_bias is True but student_bias is None")
    check_int(op, "chunk_size", needs[3], low=0)


def _check_forward(sh, sw, th, tw, labels, sb, tb, ignore_index, beta, temperature, hard, reduction, *needs):
    _check_inputs("distill_forward", sh, sw, th, tw, labels, sb, tb, (ignore_index, beta, temperature, hard), needs)
    if reduction not in REDUCTIONS:
        raise ValueError(f"distill_forward: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_backward(grad_loss, sh, sw, th, tw, labels, sb, tb, ignore_index, beta, temperature, hard, *needs):
    settings = (ignore_index, beta, temperature, hard)
    _check_inputs("distill_backward", sh, sw, th, tw, labels, sb, tb, settings, needs)
    check_dtype("distill_backward", "grad_loss", grad_loss, FLOAT_DTYPES)
    check_numel("distill_backward", "grad_loss", grad_loss, sh.shape[0], "one per row of student_hidden")


_INPUTS = (
    "Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, Tensor labels, "
    "Tensor? student_bias, Tensor? teacher_bias, int ignore_index, float beta, float temperature, "
    "float hard_label_weight"
)
_NEEDS = "bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias, int chunk_size"
distill_forward = define_op(
    "distill_forward",
    f"({_INPUTS}, str reduction, {_NEEDS}) -> (Tensor, Tensor, Tensor, Tensor)",
    family="distill",
    fake=_fake_forward,
    reference=ref.distill_forward,
    native=_forward_with(_native_rows),
    triton=_forward_with(_triton_rows),
    check=_check_forward,
)
distill_backward = define_op(
    "distill_backward",
    f"(Tensor grad_loss, {_INPUTS}, {_NEEDS}) -> (Tensor, Tensor, Tensor)",
    family="distill",
    fake=_fake_backward,
    reference=ref.distill_backward,
    native=_backward_with(_native_rows),
    triton=_backward_with(_triton_rows),
    triton_dtypes=(torch.float32,),
    check=_check_backward,
)


@carry_backend
class FusedLinearDistillationFunction(torch.autograd.Function):
    """loss of the student (hidden, weight, bias) against the teacher (hidden, weight, bias), which gets no
    gradient. mean/sum: the student's gradients are computed in the forward pass and scaled by the output grad
    in backward (nothing [T, V] is saved). none: backward recomputes both logits chunk by chunk."""

    @staticmethod
    def forward(ctx, sh, sw, th, tw, labels, sb, tb, settings, reduction: str, chunk_size: int):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5])
        ctx.settings, ctx.needs, ctx.reduction, ctx.chunk_size = settings, needs, reduction, chunk_size
        inputs = (sh, sw, th, tw, labels, sb, tb, *settings)
        if reduction == NONE:
            loss, *_ = distill_forward(*inputs, reduction, False, False, False, chunk_size)
            ctx.save_for_backward(sh, sw, th, tw, labels, sb, tb)
        else:
            loss, *grads = distill_forward(*inputs, reduction, *needs, chunk_size)
            ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == NONE:
            grads = distill_backward(
                grad_loss.contiguous(), *ctx.saved_tensors, *ctx.settings, *ctx.needs, ctx.chunk_size
            )
        elif not torch.compiler.is_compiling() and float(grad_loss) == 1.0:
            grads = ctx.saved_tensors  # loss.backward(): the saved gradients, without a copy of dW
        else:
            grads = tuple((g * grad_loss).to(g.dtype) for g in ctx.saved_tensors)
        grad_hidden, grad_weight, grad_bias = (g if need else None for g, need in zip(grads, ctx.needs))
        return grad_hidden, grad_weight, None, None, None, grad_bias, None, None, None, None


def _check_side(fn, side, hidden, weight, bias):
    check_tensor(fn, f"{side}_hidden", hidden, min_dim=1)
    check_tensor(fn, f"{side}_weight", weight, dim=2)
    check_features(fn, f"{side}_hidden", hidden, "hidden size")
    check_same_device(fn, **{f"{side}_hidden": hidden, f"{side}_weight": weight})
    check_same_dtype(fn, **{f"{side}_hidden": hidden, f"{side}_weight": weight})
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{fn}: {side}_weight is {list(weight.shape)}, {side}_hidden's last dim is {hidden.shape[-1]}")
    if bias is not None:
        check_tensor(fn, f"{side}_bias", bias, dim=1)
        check_same_device(fn, **{f"{side}_hidden": hidden, f"{side}_bias": bias})
        check_same_dtype(fn, **{f"{side}_hidden": hidden, f"{side}_bias": bias})
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{fn}: {side}_bias has {bias.shape[0]} elements, {side}_weight has {weight.shape[0]} rows"
            )


def fused_linear_distillation(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    loss: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distillation loss of a student's lm_head (student_hidden @ student_weight.T + student_bias) towards a
    teacher's (teacher_hidden @ teacher_weight.T + teacher_bias), both softmaxed at `temperature`, without
    materializing either [tokens, vocab] logits; the teacher gets no gradient.

    hidden [..., H] (the student's and the teacher's hidden sizes may differ), weights [V, H] with one
    vocabulary; labels int64 hidden.shape[:-1] (already shifted) or None. loss: "kl" (forward KL(teacher ||
    student), Hinton's), "reverse_kl" (KL(student || teacher)) or "jsd" (the generalized Jensen-Shannon
    divergence of GKD with `beta`, TRL's generalized_jsd_loss: beta 0 and 1 are its forward and reverse KL).
    Tokens whose label is ignore_index count nowhere (and skip both lm_heads' matmuls); without labels every token
    counts. hard_label_weight a:
    the loss is a * cross_entropy(student logits, labels) + (1 - a) * divergence (needs labels; the
    cross-entropy at temperature 1). reduction "mean" (over counted tokens; 0 when none), "sum" or "none"
    (labels' shape). The divergence is not multiplied by temperature^2 (as TRL's). The loss is fp32 (fp64 for
    fp64 students). Autocast casts each side's product like F.linear's.
    """
    fn = "fused_linear_distillation"
    if loss not in LOSSES:
        raise ValueError(f"{fn}: loss must be one of {tuple(LOSSES)}, got {loss!r}")
    for name, value, high in (("beta", beta, 1.0), ("hard_label_weight", hard_label_weight, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
            raise ValueError(f"{fn}: {name} must be a number in [0, 1], got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    check_tensor(fn, "student_hidden", student_hidden, min_dim=1)
    check_tensor(fn, "teacher_hidden", teacher_hidden, min_dim=1)
    # each lm_head product follows F.linear's autocast rule; the loss stays fp32; the teacher is a constant
    student_hidden, student_weight, student_bias = cast_like_linear(
        autocast_dtype(student_hidden), student_hidden, student_weight, student_bias
    )
    teacher_hidden, teacher_weight, teacher_bias = (
        None if t is None else t.detach()
        for t in cast_like_linear(autocast_dtype(teacher_hidden), teacher_hidden, teacher_weight, teacher_bias)
    )
    _check_side(fn, "student", student_hidden, student_weight, student_bias)
    _check_side(fn, "teacher", teacher_hidden, teacher_weight, teacher_bias)
    check_same_device(fn, student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    vocab = student_weight.shape[0]
    if vocab < 1:
        raise ValueError(f"{fn}: student_weight must have at least one row (vocab), got {tuple(student_weight.shape)}")
    if teacher_weight.shape[0] != vocab:
        raise ValueError(
            f"{fn}: the vocabularies differ: student_weight has {vocab} rows, teacher_weight {teacher_weight.shape[0]}"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"{fn}: teacher_hidden has tokens {tuple(teacher_hidden.shape[:-1])}, student_hidden "
            f"{tuple(student_hidden.shape[:-1])}: they must match"
        )
    token_shape = student_hidden.shape[:-1]
    labelled = labels is not None
    if not labelled:
        if hard_label_weight:
            raise ValueError(f"{fn}: hard_label_weight > 0 needs labels")
        labels = torch.zeros(token_shape, dtype=torch.int64, device=student_hidden.device)
        ignore_index = -1  # no token is ignored
    else:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{fn}: labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype != torch.int64:
            raise TypeError(f"{fn}: labels must have dtype int64, got {str(labels.dtype).replace('torch.', '')}")
        check_same_device(fn, student_hidden=student_hidden, labels=labels)
        if labels.shape != token_shape:
            raise ValueError(
                f"{fn}: labels must have shape {tuple(token_shape)} (student_hidden's without the last dim), "
                f"got {tuple(labels.shape)}"
            )
        if hard_label_weight:
            check_label_range(fn, labels, vocab, ignore_index)
    beta = LOSSES[loss] if LOSSES[loss] is not None else float(beta)
    settings = (ignore_index, beta, float(temperature), float(hard_label_weight))
    student_rows = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    flat = labels.reshape(-1)
    rows = counted_rows(flat, ignore_index) if labelled else None  # ignored tokens skip both lm_heads
    if rows is not None:
        student_rows, teacher_rows = student_rows.index_select(0, rows), teacher_rows.index_select(0, rows)
        flat = flat.index_select(0, rows)
    out = FusedLinearDistillationFunction.apply(
        student_rows,
        student_weight,
        teacher_rows,
        teacher_weight,
        flat,
        student_bias,
        teacher_bias,
        settings,
        reduction,
        chunk_size or 0,
    )
    return scatter_rows(out, rows, labels.numel()).view(token_shape) if reduction == NONE else out
