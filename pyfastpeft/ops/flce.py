"""Fused linear cross-entropy: custom ops, the chunk driver, autograd and the public function.

The loss of logits = hidden W^T (+ bias) without materializing the [tokens, vocab] logits (as
Liger-Kernel's FusedLinearCrossEntropy): tokens go in chunks; per chunk torch computes the logits
into one reused fp32 buffer, one row pass (C++ on CPU, CUDA or Triton on GPUs) turns them into the
losses, the logsumexps and, in place, the logits' gradient, and torch's matmuls fold that into
dh[chunk] = dz W, dW += dz^T h_chunk (fp32 accumulator, cast once) and db += sum dz. On the CPU, bf16
without a bias and with T <= 2 H, the chunks' bf16 dz instead stay side by side in one [T, V] buffer, no
larger than that accumulator, and dW is one bf16 GEMM over all of them (see _chunked).

Ops (hidden [T, H], weight [V, H], labels int64 [T], bias [V] or None, class_weight [V] in the compute
dtype or None; loss and lse in the compute dtype, fp32 or fp64 for fp64 inputs; the math, z-loss included,
is in pyfastpeft/reference/flce.py):
  pyfastpeft::flce_forward(hidden, weight, labels, bias, class_weight, ignore_index, label_smoothing,
      softcap, lse_square_scale, reduction, need_predictions, need_grad_hidden, need_grad_weight,
      need_grad_bias, chunk_size)
      -> (loss: [T] for none, [] for mean/sum (cross-entropy plus z-loss);  lse: [T];
          grad_hidden, grad_weight, grad_bias;
          predictions: int64 [T], each token's argmax of its logits, empty unless need_predictions)
      The gradients are those of the reduced loss (of loss.sum() for none), computed in the forward
      pass; empty where not asked.
  pyfastpeft::flce_backward(grad_loss [T], hidden, weight, labels, bias, class_weight, ignore_index,
      label_smoothing, softcap, lse_square_scale, need_grad_hidden, need_grad_weight, need_grad_bias,
      chunk_size)
      -> (grad_hidden, grad_weight, grad_bias) for per-token output grads: recomputes the logits
      chunk by chunk (reduction none, whose output grads are known only in backward).
softcap 0 means none; lse_square_scale 0 means no z-loss; reduction "none", "mean" or "sum"; chunk_size 0 picks
chunk_rows' default. An output grad that is not asked for is an empty tensor.
"""

from __future__ import annotations

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops._autocast import autocast_dtype, cast_like_linear
from pyfastpeft.ops._checks import (
    FLOAT_DTYPES,
    check_bool,
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
from pyfastpeft.reference import flce as ref
from pyfastpeft.reference._common import accumulate_dtype
from pyfastpeft.reference.flce import NONE, REDUCTIONS

# Chunk size: the fp32 logits buffer of one chunk stays within CHUNK_BYTES (plus its copy in the
# input dtype for the dh matmul), whatever the number of tokens, in a power of two of rows, but at least
# a floor of rows so the three matmuls per chunk, each of which streams all of W [V, H], stay compute-bound.
# Each chunk of n rows does 2n flops per weight element read (n per byte in bf16): a CPU host here runs about
# 8 flops per byte of DRAM bandwidth, so 64 rows suffice; an H100/H200 runs about 300, so at a 128k vocabulary
# 32 MiB (64 rows) would leave the GPU memory-bound several times over: its floor is 512 rows (a 262 MB fp32
# buffer at V = 128256, 525 MB at 256000, next to a lm_head of 1-2 GB).
# Liger sizes chunks as tokens / ceil(V / H), which keeps chunk x V near tokens x H: the buffer then
# grows with the batch (16k tokens at H 4096, V 32000: 2048 rows, 262 MB); ours does not.
CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 64
MIN_CHUNK_ROWS_CUDA = 512


def chunk_rows(tokens: int, vocab: int, requested: int, device_type: str = "cpu") -> int:
    """Rows per chunk: `requested` when > 0, else the largest power of two whose fp32 [rows, vocab]
    buffer fits CHUNK_BYTES, at least the device's floor (MIN_CHUNK_ROWS, MIN_CHUNK_ROWS_CUDA on "cuda");
    never more than the tokens (at least 1)."""
    if requested > 0:
        rows = requested
    else:
        fitting = CHUNK_BYTES // (4 * vocab)
        floor = MIN_CHUNK_ROWS_CUDA if device_type == "cuda" else MIN_CHUNK_ROWS
        rows = max(floor, 1 << max(0, fitting.bit_length() - 1))
    return max(1, min(rows, tokens))


# On the CPU a fp16/bf16 product goes through a temporary in h's dtype, this many vocabulary columns at a time: the
# temporary stays small next to the fp32 buffer (a whole one would add half the buffer to the peak), and the
# blocks run as fast as one matmul (measured, 256 x 1024 x 128256 bf16: 173 ms in blocks of 4096, 190 ms whole).
LOGITS_BLOCK_COLUMNS = 4096


def logits_into(h, weight, out) -> None:
    """out [n, V] (compute dtype) = h @ weight^T, accumulated in fp32. CUDA torch multiplies fp16/bf16
    into an fp32 output directly; CPU torch has no such matmul, so there the logits round to h's dtype
    once (as the output of HF's lm_head does) before the fp32 row pass."""
    if h.dtype == out.dtype:
        torch.mm(h, weight.t(), out=out)
    elif h.is_cuda:
        torch.mm(h, weight.t(), out_dtype=out.dtype, out=out)
    else:
        for start in range(0, weight.shape[0], LOGITS_BLOCK_COLUMNS):
            block = slice(start, start + LOGITS_BLOCK_COLUMNS)
            out[:, block].copy_(torch.mm(h, weight[block].t()))


# On the CPU a bf16 chunk's dW product goes in blocks of vocabulary rows of this many elements (4 MiB in bf16).
GRAD_BLOCK_ELEMENTS = 2 << 20


def accumulate_grad_weight(accumulator, dz, dz_input_dtype, h) -> None:
    """accumulator [V, H] (compute dtype) += dz^T h. On CUDA from the fp16/bf16 operands into fp32. On the CPU,
    which has no mixed-precision matmul: bf16 operands (dz rounded as on CUDA) in blocks of vocabulary rows, each
    block's product rounded once to bf16 and added into the fp32 accumulator, since CPU bf16 GEMMs run well above
    fp32's rate (measured here, 32000 x 4096 from 256 rows: 196 ms against 335 ms); the rounding is one per chunk,
    as eager's one bf16 GEMM over all tokens rounds once. fp16 in fp32: CPU fp16 matmuls are slow."""
    if h.dtype == accumulator.dtype:
        accumulator.addmm_(dz.t(), h)
    elif h.is_cuda:
        torch.addmm(accumulator, dz_input_dtype.t(), h, out_dtype=accumulator.dtype, out=accumulator)
    elif h.dtype == torch.bfloat16:
        rows = max(1, GRAD_BLOCK_ELEMENTS // max(1, h.shape[1]))
        for start in range(0, accumulator.shape[0], rows):
            block = slice(start, start + rows)
            accumulator[block].add_(torch.mm(dz_input_dtype[:, block].t(), h))
    else:
        accumulator.addmm_(dz.t(), h.to(accumulator.dtype))


def _stores_bf16(hidden, compute_dtype, bias) -> bool:
    return (
        hidden.device.type == "cpu"
        and hidden.dtype == torch.bfloat16
        and compute_dtype == torch.float32
        and bias is None
    )


def _chunked(
    row_pass,
    hidden,
    weight,
    labels,
    bias,
    class_weight,
    grad_weights,
    z_grad_weights,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_size: int,
    predictions=None,
):
    """(ce_t [T], lse [T], grad_hidden, grad_weight, grad_bias) chunk by chunk. grad_weights: None (no
    gradients) or [T] in the compute dtype, the weight of each token's cross-entropy in the gradients (g_t);
    z_grad_weights: None (no z-loss) or [T], q_t (see the reference). row_pass(logits, labels, grad_weights,
    z_grad_weights, class_weight, loss, lse, ignore_index, label_smoothing, softcap) is the backend's row kernel
    on one chunk (contiguous views; the optional ones None)."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    cd, device = accumulate_dtype(hidden.dtype), hidden.device
    loss = torch.empty(tokens, dtype=cd, device=device)
    lse = torch.empty(tokens, dtype=cd, device=device)
    with_grads = grad_weights is not None
    with_z = with_grads and z_grad_weights is not None
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_grad_hidden else None
    grad_bias = torch.zeros(vocab, dtype=cd, device=device) if need_grad_bias else None
    rows = chunk_rows(tokens, vocab, chunk_size, device.type)
    # The native CPU row pass over bf16 logits (no bias) reads and writes them in place, in fp32 inside: the bf16
    # product is the chunk's buffer and the row pass leaves dz rounded to bf16 for the matmuls after it, with no
    # fp32 copy of either (the same values: the logits round to bf16 once in either path, and so does dz)
    stored = hidden.dtype if row_pass is native_rows and _stores_bf16(hidden, cd, bias) else cd
    # There, with a trained lm_head, every token's dz stays in its chunk's rows of one [T, V] buffer while that is
    # no larger than the fp32 [V, H] dW accumulator it replaces (T <= 2 H): dW is then one bf16 GEMM over all
    # tokens, rounded once as eager's is, with neither the accumulator nor its final copy.
    whole_dz = with_grads and need_grad_weight and stored != cd and tokens <= 2 * hidden.shape[1]
    grad_weight = None
    if need_grad_weight and not whole_dz:
        grad_weight = torch.zeros(weight.shape, dtype=cd, device=device)
    logits_buffer = torch.empty(tokens if whole_dz else rows, vocab, dtype=stored, device=device)
    bias_c = None if bias is None else bias.to(cd)
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        h, logits = hidden[start:stop], logits_buffer[start:stop] if whole_dz else logits_buffer[: stop - start]
        logits_into(h, weight, logits)
        if bias_c is not None:
            logits.add_(bias_c)
        if predictions is not None:  # before the row pass overwrites the logits with their gradient
            torch.argmax(logits, dim=-1, out=predictions[start:stop])
        row_pass(
            logits,
            labels[start:stop],
            grad_weights[start:stop] if with_grads else None,
            z_grad_weights[start:stop] if with_z else None,
            class_weight,
            loss[start:stop],
            lse[start:stop],
            ignore_index,
            label_smoothing,
            softcap,
        )
        if not with_grads:
            continue
        dz_input_dtype = logits.to(hidden.dtype)
        if grad_hidden is not None:
            torch.mm(dz_input_dtype, weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            accumulate_grad_weight(grad_weight, logits, dz_input_dtype, h)
        if grad_bias is not None:
            grad_bias += logits.sum(0)
    if whole_dz:
        grad_weight = torch.mm(logits_buffer.t(), hidden)
    if grad_hidden is None:
        grad_hidden = hidden.new_empty(0)
    return (
        loss,
        lse,
        grad_hidden,
        weight.new_empty(0) if grad_weight is None else grad_weight.to(weight.dtype),
        hidden.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype),
    )


def native_rows(
    logits,
    labels,
    grad_weights,
    z_grad_weights,
    class_weight,
    loss,
    lse,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
) -> None:
    rows, vocab = logits.shape
    if rows == 0:
        return
    args = (
        logits,
        labels,
        grad_weights,
        z_grad_weights,
        class_weight,
        loss,
        lse,
        rows,
        vocab,
        loss.dtype,
        logits.dtype,
        ignore_index,
        label_smoothing,
        softcap,
    )
    _native.launch("flce_rows", logits, *args)


def triton_rows(
    logits,
    labels,
    grad_weights,
    z_grad_weights,
    class_weight,
    loss,
    lse,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
) -> None:
    if logits.shape[0]:
        triton_module("flce").flce_rows(
            logits,
            labels,
            grad_weights,
            z_grad_weights,
            class_weight,
            loss,
            lse,
            ignore_index,
            label_smoothing,
            softcap,
        )


def _forward_with(row_pass):
    def forward(
        hidden,
        weight,
        labels,
        bias,
        class_weight,
        ignore_index,
        label_smoothing,
        softcap,
        lse_square_scale,
        reduction,
        need_predictions,
        need_grad_hidden,
        need_grad_weight,
        need_grad_bias,
        chunk_size,
    ):
        any_grad = need_grad_hidden or need_grad_weight or need_grad_bias
        labels = labels.contiguous()
        cd = accumulate_dtype(hidden.dtype)
        class_weight = None if class_weight is None else class_weight.contiguous()
        predictions = torch.empty(labels.shape[0] if need_predictions else 0, dtype=torch.int64, device=labels.device)
        weights = z_weights = None
        if any_grad:
            weights = ref.reduction_weights(labels, ignore_index, reduction, cd, class_weight)
            if lse_square_scale:
                z_weights = (2 * lse_square_scale) * ref.reduction_weights(labels, ignore_index, reduction, cd)
        loss, lse, grad_hidden, grad_weight, grad_bias = _chunked(
            row_pass,
            hidden,
            weight,
            labels,
            bias,
            class_weight,
            weights,
            z_weights,
            ignore_index,
            label_smoothing,
            softcap,
            need_grad_hidden,
            need_grad_weight,
            need_grad_bias,
            chunk_size,
            predictions if need_predictions else None,
        )
        loss = ref.reduce(loss, labels, ignore_index, reduction, class_weight)
        if lse_square_scale:
            z_loss = ref.z_losses(lse, labels, ignore_index, lse_square_scale)
            loss = loss + ref.reduce(z_loss, labels, ignore_index, reduction)
        return loss, lse, grad_hidden, grad_weight, grad_bias, predictions

    return forward


def _backward_with(row_pass):
    def backward(
        grad_loss,
        hidden,
        weight,
        labels,
        bias,
        class_weight,
        ignore_index,
        label_smoothing,
        softcap,
        lse_square_scale,
        need_grad_hidden,
        need_grad_weight,
        need_grad_bias,
        chunk_size,
    ):
        weights = grad_loss.to(accumulate_dtype(hidden.dtype)).contiguous()
        _, _, grad_hidden, grad_weight, grad_bias = _chunked(
            row_pass,
            hidden,
            weight,
            labels.contiguous(),
            bias,
            None if class_weight is None else class_weight.contiguous(),
            weights,
            (2 * lse_square_scale) * weights if lse_square_scale else None,
            ignore_index,
            label_smoothing,
            softcap,
            need_grad_hidden,
            need_grad_weight,
            need_grad_bias,
            chunk_size,
        )
        return grad_hidden, grad_weight, grad_bias

    return backward


def _fake_grads(hidden, weight, bias, need_grad_hidden, need_grad_weight, need_grad_bias):
    return (
        torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        if need_grad_hidden
        else hidden.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_grad_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_grad_bias else hidden.new_empty(0),
    )


def _check_shapes(fn, hidden, weight, labels):
    torch._check(
        hidden.dim() == 2 and weight.dim() == 2 and weight.shape[1] == hidden.shape[1],
        lambda: f"{fn}: hidden must be [T, H] and weight [V, H]",
    )
    torch._check(labels.dim() == 1 and labels.shape[0] == hidden.shape[0], lambda: f"{fn}: labels must be [T]")


def _fake_forward(
    hidden,
    weight,
    labels,
    bias,
    class_weight,
    ignore_index,
    label_smoothing,
    softcap,
    lse_square_scale,
    reduction,
    need_predictions,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    chunk_size,
):
    _check_shapes("flce_forward", hidden, weight, labels)
    cd = accumulate_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == NONE else (), dtype=cd)
    lse = hidden.new_empty((hidden.shape[0],), dtype=cd)
    predictions = labels.new_empty((labels.shape[0] if need_predictions else 0,))
    grads = _fake_grads(hidden, weight, bias, need_grad_hidden, need_grad_weight, need_grad_bias)
    return (loss, lse, *grads, predictions)


def _fake_backward(
    grad_loss,
    hidden,
    weight,
    labels,
    bias,
    class_weight,
    ignore_index,
    label_smoothing,
    softcap,
    lse_square_scale,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    chunk_size,
):
    _check_shapes("flce_backward", hidden, weight, labels)
    torch._check(grad_loss.shape == labels.shape, lambda: "flce_backward: grad_loss must be [T]")
    return _fake_grads(hidden, weight, bias, need_grad_hidden, need_grad_weight, need_grad_bias)


def _check_bias_grad(op, bias, need_grad_bias) -> None:
    if bias is None and need_grad_bias:
        raise ValueError(f"{op}: need_grad_bias is True but bias is None")


def _check_inputs(op, hidden, weight, labels, bias, class_weight, settings, chunk_size):
    """hidden [T, H] and weight [V, H] of one float dtype, labels int64 [T], bias None or [V] in that dtype,
    class_weight None or [V] in the compute dtype; settings (ignore_index, label_smoothing, softcap,
    lse_square_scale). Labels outside [0, V) are not checked here (a sync per call): the kernels give them a
    NaN loss and never index by them out of bounds."""
    ignore_index, label_smoothing, softcap, lse_square_scale = settings
    check_dtype(op, "hidden", hidden, FLOAT_DTYPES)
    check_dtype(op, "weight", weight, (hidden.dtype,))
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{op}: hidden and weight must be 2-D, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    check_features(op, "hidden", hidden, "hidden size")
    check_last_dim(op, "hidden", hidden, weight.shape[1], "weight's hidden size")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight must have at least one row (the vocabulary), got {tuple(weight.shape)}")
    check_dtype(op, "labels", labels, (torch.int64,))
    check_numel(op, "labels", labels, hidden.shape[0], "one per row of hidden")
    if bias is not None:
        check_dtype(op, "bias", bias, (hidden.dtype,))
    check_optional(op, "bias", bias, weight.shape[0], "the vocabulary")
    if class_weight is not None:
        check_dtype(op, "class_weight", class_weight, (accumulate_dtype(hidden.dtype),))
    check_optional(op, "class_weight", class_weight, weight.shape[0], "the vocabulary")
    check_int(op, "ignore_index", ignore_index)
    check_real(op, "label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
    check_real(op, "softcap", softcap, low=0.0)
    check_real(op, "lse_square_scale", lse_square_scale, low=0.0)
    check_int(op, "chunk_size", chunk_size, low=0)


def _check_forward(hidden, weight, labels, bias, class_weight, *rest):
    settings, reduction, need_predictions, *needs = rest[:4], rest[4], rest[5], *rest[6:]
    check_bool("flce_forward", "need_predictions", need_predictions)
    _check_inputs("flce_forward", hidden, weight, labels, bias, class_weight, settings, needs[-1])
    if reduction not in REDUCTIONS:
        raise ValueError(f"flce_forward: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_bias_grad("flce_forward", bias, needs[-2])


def _check_backward(grad_loss, hidden, weight, labels, bias, class_weight, *rest):
    settings, needs = rest[:4], rest[4:]
    _check_inputs("flce_backward", hidden, weight, labels, bias, class_weight, settings, needs[-1])
    check_dtype("flce_backward", "grad_loss", grad_loss, FLOAT_DTYPES)
    check_numel("flce_backward", "grad_loss", grad_loss, hidden.shape[0], "one per row of hidden")
    _check_bias_grad("flce_backward", bias, needs[-2])


_SETTINGS = "Tensor? class_weight, int ignore_index, float label_smoothing, float softcap, float lse_square_scale"
_NEEDS = "bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias, int chunk_size"
flce_forward = define_op(
    "flce_forward",
    f"(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, {_SETTINGS}, str reduction, "
    f"bool need_predictions, {_NEEDS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    family="flce",
    fake=_fake_forward,
    reference=ref.flce_forward,
    native=_forward_with(native_rows),
    triton=_forward_with(triton_rows),
    check=_check_forward,
)
flce_backward = define_op(
    "flce_backward",
    f"(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, {_SETTINGS}, {_NEEDS})"
    " -> (Tensor, Tensor, Tensor)",
    family="flce",
    fake=_fake_backward,
    reference=ref.flce_backward,
    native=_backward_with(native_rows),
    triton=_backward_with(triton_rows),
    triton_dtypes=(torch.float32,),
    check=_check_backward,
)


@carry_backend
class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """(loss, lse, predictions) of hidden [T, H], weight [V, H], labels [T], bias [V] or None, class_weight
    [V] (compute dtype) or None. mean/sum: the gradients
    are computed in the forward pass and scaled by the output grad in backward (nothing [T, V] is saved).
    none: backward recomputes the logits chunk by chunk with the per-token output grads. lse is not
    differentiable. dW (dbias) is computed only when the weight (bias) requires grad."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        bias,
        class_weight,
        ignore_index: int,
        label_smoothing: float,
        softcap: float,
        lse_square_scale: float,
        reduction: str,
        need_predictions: bool,
        chunk_size: int,
    ):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        settings = (class_weight, ignore_index, label_smoothing, softcap, lse_square_scale)
        ctx.settings, ctx.needs, ctx.reduction, ctx.chunk_size = settings[1:], needs, reduction, chunk_size
        if reduction == NONE:
            loss, lse, *_, predictions = flce_forward(
                hidden, weight, labels, bias, *settings, reduction, need_predictions, False, False, False, chunk_size
            )
            ctx.save_for_backward(hidden, weight, labels, bias, class_weight)
        else:
            loss, lse, grad_hidden, grad_weight, grad_bias, predictions = flce_forward(
                hidden, weight, labels, bias, *settings, reduction, need_predictions, *needs, chunk_size
            )
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(lse, predictions)
        return loss, lse, predictions

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_predictions):
        if ctx.reduction == NONE:
            hidden, weight, labels, bias, class_weight = ctx.saved_tensors
            grads = flce_backward(
                grad_loss.contiguous(),
                hidden,
                weight,
                labels,
                bias,
                class_weight,
                *ctx.settings,
                *ctx.needs,
                ctx.chunk_size,
            )
        else:
            # loss.backward() passes exactly 1: the saved gradients are the answer, returned without a copy (a
            # second dW, [V, H] and often the step's largest tensor, would double the peak). Any other scale
            # multiplies out of place, so the saved gradients serve every backward through this graph.
            if not torch.compiler.is_compiling() and float(grad_loss) == 1.0:
                grads = ctx.saved_tensors
            else:
                grads = tuple((g * grad_loss).to(g.dtype) for g in ctx.saved_tensors)
        grad_hidden, grad_weight, grad_bias = (g if need else None for g, need in zip(grads, ctx.needs))
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None, None, None, None, None


def host_may_read(t: torch.Tensor) -> bool:
    """Whether a value of t may be read back on the host: not while torch.compile traces, nor while a CUDA graph
    captures (where the read would sync)."""
    return not (torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def counted_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """The indices (int64 [n], n < T, maybe 0) of the entries of labels [T] that count (not ignore_index) when not
    all do; else None. The chunked passes then run over these rows alone: an ignored row (a prompt token, padding,
    a prompt-tuning virtual token, the last position of each sequence) adds nothing to a loss or a gradient, yet
    would cost its full share of the lm_head matmuls. Finding them puts their count on the host, which
    torch.compile tracing and CUDA graph capture forbid: there it gives None and every row is computed."""
    if not host_may_read(labels):
        return None
    rows = (labels != ignore_index).nonzero().squeeze(1)
    return rows if rows.numel() < labels.numel() else None


def scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, count: int) -> torch.Tensor:
    """values [n] put back at rows of a zero [count] vector (differentiable); values itself when rows is None."""
    return values if rows is None else values.new_zeros(count).index_copy(0, rows, values)


def check_label_range(fn: str, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """CPU tensors in eager mode only: elsewhere the check would cost a device sync or break the graph,
    and the kernels give an out-of-range label a NaN loss instead (never reading out of bounds)."""
    if labels.device.type != "cpu" or torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"{fn}: labels must be in [0, {vocab}) or ignore_index ({ignore_index}), got {labels[bad][0].item()}"
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    return_lse: bool = False,
    chunk_size: int | None = None,
    return_token_accuracy: bool = False,
    class_weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
    loss_dtype: torch.dtype | None = None,
):
    """F.cross_entropy(hidden @ weight.T + bias, labels) with the logits computed in fp32 (the lm_head and
    loss of a causal LM), without materializing the [tokens, vocab] logits.

    hidden [..., H], weight [V, H], labels int64 hidden.shape[:-1] (already shifted), bias [V] or None;
    hidden, weight and bias share one float dtype. softcap: logits -> softcap * tanh(logits / softcap)
    first (Gemma-2). reduction "mean" (over tokens whose label is not ignore_index; 0 when there are
    none), "sum" or "none" (labels' shape). Loss and lse are fp32 (fp64 for fp64 inputs); with
    return_lse, returns (loss, lse), lse = logsumexp of each token's (softcapped) logits, labels' shape,
    not differentiable. Tokens whose label is ignore_index take no part in the lm_head matmuls (see counted_rows),
    unless return_lse asks for every token's lse. chunk_size: tokens per chunk (default: see chunk_rows), counted
    tokens only where ignored ones are left out. return_token_accuracy: also
    return the share of tokens (not ignore_index) whose label is the argmax of their logits, an fp32 scalar (0
    when no token counts), not differentiable, as TRL's SFTTrainer logs it (mean_token_accuracy); it costs one
    argmax per chunk of logits, which are never materialized whole.
    class_weight: [V] float tensor (Liger's ce_weight), F.cross_entropy's weight: each token's loss is scaled
    by its label's weight (with label smoothing, the smoothing term weights each class by its own), and the
    mean divides by the sum of the counted tokens' label weights (0 when that sum is 0); not differentiable.
    lse_square_scale: the z-loss (PaLM; Liger's lse_square_scale), s * lse^2 per counted token, added to the
    loss (unweighted by class_weight; the mean divides it by the number of counted tokens). return_z_loss:
    also return that z-loss term alone, reduced as the loss, not differentiable (for logging; its gradient is
    in the loss's). loss_dtype: the dtype of the returned loss and z-loss (default fp32, fp64 for fp64
    inputs; e.g. hidden.dtype for the loss in the input dtype); the softmax is fp32 whatever it is.
    The return value is loss, or a tuple (loss[, lse][, z_loss][, token_accuracy]) in that order.
    On CPU, fp16/bf16 logits round to the input dtype before the fp32 softmax (CPU torch has no
    mixed-precision matmul); on CUDA they are accumulated into fp32.
    """
    fn = "fused_linear_cross_entropy"
    check_tensor(fn, "hidden", hidden, min_dim=1)
    # the lm_head product follows F.linear's autocast rule (ops/_autocast.py); the loss stays fp32
    hidden, weight, bias = cast_like_linear(autocast_dtype(hidden), hidden, weight, bias)
    check_tensor(fn, "weight", weight, dim=2)
    check_features(fn, "hidden", hidden, "hidden size")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{fn}: labels must have dtype int64, got {str(labels.dtype).replace('torch.', '')}")
    check_same_device(fn, hidden=hidden, weight=weight, labels=labels)
    check_same_dtype(fn, hidden=hidden, weight=weight)
    vocab, hidden_size = weight.shape
    if hidden_size != hidden.shape[-1]:
        raise ValueError(f"{fn}: weight is [{vocab}, {hidden_size}], hidden's last dim is {hidden.shape[-1]}")
    if vocab < 1:
        raise ValueError(f"{fn}: weight must have at least one row (vocab), got shape {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{fn}: labels must have shape {tuple(hidden.shape[:-1])} (hidden's without the last dim), "
            f"got {tuple(labels.shape)}"
        )
    if bias is not None:
        check_tensor(fn, "bias", bias, dim=1)
        check_same_device(fn, hidden=hidden, bias=bias)
        check_same_dtype(fn, hidden=hidden, bias=bias)
        if bias.shape[0] != vocab:
            raise ValueError(f"{fn}: bias has {bias.shape[0]} elements, weight has {vocab} rows")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1), got {label_smoothing}")
    if softcap is not None and not 0.0 < softcap < float("inf"):
        raise ValueError(f"{fn}: softcap must be None or a finite number > 0, got {softcap}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, flag in (("return_token_accuracy", return_token_accuracy), ("return_z_loss", return_z_loss)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(flag).__name__}")
    if isinstance(lse_square_scale, bool) or not isinstance(lse_square_scale, (int, float)):
        raise TypeError(f"{fn}: lse_square_scale must be a real number, got {type(lse_square_scale).__name__}")
    if not 0.0 <= lse_square_scale < float("inf"):
        raise ValueError(f"{fn}: lse_square_scale must be a finite number >= 0, got {lse_square_scale}")
    if loss_dtype is not None and loss_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: loss_dtype must be None or a float dtype, got {loss_dtype!r}")
    cd = accumulate_dtype(hidden.dtype)
    if class_weight is not None:
        check_tensor(fn, "class_weight", class_weight, dim=1)
        check_dtype(fn, "class_weight", class_weight, FLOAT_DTYPES)
        check_same_device(fn, hidden=hidden, class_weight=class_weight)
        if class_weight.shape[0] != vocab:
            raise ValueError(f"{fn}: class_weight has {class_weight.shape[0]} elements, weight has {vocab} rows")
        if class_weight.requires_grad:
            raise ValueError(f"{fn}: class_weight must not require grad (the loss is not differentiable in it)")
        class_weight = class_weight.to(cd)
    check_label_range(fn, labels, vocab, ignore_index)
    flat_hidden, flat = hidden.reshape(-1, hidden_size), labels.reshape(-1)
    rows = None if return_lse else counted_rows(flat, ignore_index)  # lse is wanted for every row
    if rows is not None:
        flat_hidden, flat = flat_hidden.index_select(0, rows), flat.index_select(0, rows)
    loss, lse, predictions = FusedLinearCrossEntropyFunction.apply(
        flat_hidden,
        weight,
        flat,
        bias,
        class_weight,
        ignore_index,
        float(label_smoothing),
        float(softcap or 0.0),
        float(lse_square_scale),
        reduction,
        return_token_accuracy,
        chunk_size or 0,
    )
    if reduction == NONE:
        loss = scatter_rows(loss, rows, labels.numel()).view(labels.shape)
    if loss_dtype is not None:
        loss = loss.to(loss_dtype)
    results = (loss,) + ((lse.view(labels.shape),) if return_lse else ())
    if return_z_loss:
        z_loss = ref.reduce(
            ref.z_losses(lse, flat, ignore_index, float(lse_square_scale)), flat, ignore_index, reduction
        )
        z_loss = scatter_rows(z_loss, rows, labels.numel()).view(labels.shape) if reduction == NONE else z_loss
        results += (z_loss.to(loss_dtype or cd),)
    if return_token_accuracy:
        counted = flat != ignore_index
        correct = (predictions == flat) & counted
        results += (correct.sum().float() / counted.sum().clamp(min=1).float(),)
    return results if len(results) > 1 else loss
