"""Preference-alignment losses over an lm_head (DPO, IPO, ORPO, SimPO) without materializing the logits.

The policy's pass is the op pyfastpeft::preference_forward: chunks of whole pairs (a chosen row and its
rejected row together), per chunk the logits in one reused fp32 buffer, flce's row kernel with unit gradient
weights (per token ce_t = -log p_t and dz_t = d ce_t / d logits, in place), the chunk's pair losses on [pairs]
vectors (eager torch, d loss / d ce_t written out), the rows of dz scaled by those, then dh and dW from
them: one logits matmul per token, the gradients computed in the forward, as fused_linear_cross_entropy does.
A pair longer than SINGLE_PASS_CHUNKS default chunks (or than an explicit chunk_size) goes alone in
sub-chunks, so the buffer stays within the chunk budget whatever the sequence length. d loss / d ce_t is one
number per sequence (w_c for the chosen row, w_r for the rejected), so dz_t = w_seq u_t with u_t the unit
gradient, and dh_t = w_seq (u_t W): each sub-chunk folds its u into u W (and into per-sequence sums of u for the
bias) at once, and the pair's weights scale them when known; one logits matmul per token, as above. With W's
gradient wanted, sum_t u_t^T h_t would need a [V, H] accumulator per sequence, so there the pair's sub-chunks
go twice instead: the ce of its tokens first, then the logits again with the row pass weighted by d loss /
d ce_t (two logits matmuls per token).
The reference model's log-probabilities come from fused_linear_cross_entropy (reduction "none", no gradient).
Neither model's [tokens, vocab] logits exist whole.

Batch layout (TRL's concatenated forward): hidden [2B, S, H], labels [2B, S] already shifted; rows 0..B-1 are
the chosen completions, rows B..2B-1 the rejected ones of the same prompts, in the same order. Tokens whose
label is ignore_index (the prompt, the padding) count nowhere.

Per pair i, with pi_c, pi_r the policy's summed log-probabilities of the chosen and rejected completion, rho_c,
rho_r the reference model's, n_c, n_r their counted tokens and avg_x = x / max(n_x, 1):
  dpo:    d = (pi_c - rho_c) - (pi_r - rho_r);  loss = -(1 - eps) logsigmoid(beta d) - eps logsigmoid(-beta d)
          (Rafailov et al. 2023; eps > 0 is the conservative DPO of TRL's sigmoid with label smoothing)
  ipo:    d = (pi_c - rho_c) / n_c - (pi_r - rho_r) / n_r;  loss = (d - 1 / (2 beta))^2     (TRL's IPO)
  simpo:  d = avg(pi_c) - avg(pi_r) - gamma / beta;  loss = -(1 - eps) logsigmoid(beta d) - eps logsigmoid(-beta d)
          (Meng et al. 2024, TRL's CPO loss_type="simpo")
  orpo:   log_odds = (avg(pi_c) - avg(pi_r)) - (log(1 - exp(avg(pi_c))) - log(1 - exp(avg(pi_r))));
          loss = -beta logsigmoid(log_odds)                          (Hong et al. 2024, TRL's odds_ratio_loss)
The loss is the mean over pairs, plus nll_weight times the chosen completions' cross-entropy (mean over their
counted tokens): ORPO's SFT term (weight 1 by default), CPO's for the others (0 by default).
Rewards (logged, not differentiable): dpo and ipo beta (pi - rho); simpo and orpo beta avg(pi) (TRL's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyfastpeft.backend import carry_backend
from pyfastpeft.ops import flce as flce_ops
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
)
from pyfastpeft.ops._library import define_op
from pyfastpeft.ops.flce import (
    accumulate_grad_weight,
    check_label_range,
    chunk_rows,
    fused_linear_cross_entropy,
    logits_into,
)
from pyfastpeft.reference import flce as flce_ref
from pyfastpeft.reference._common import accumulate_dtype

LOSSES = ("dpo", "ipo", "simpo", "orpo")
# A pair of up to this many default chunks (4 x 32 MiB of fp32 logits) takes one logits matmul per token, the
# buffer grown to fit it; a longer one takes two, in chunk-sized sub-chunks, so the buffer never outgrows this
# many chunks whatever the sequence length.
SINGLE_PASS_CHUNKS = 4
# On the CPU a chunk has at least this many rows (flce's byte budget gives 64 at a 128k vocabulary): torch's CPU
# GEMM against [V, H] runs far below its rate at 64 rows. Measured, DPO of 4 pairs of 256 tokens, V=128256, H=1024,
# fp32, fwd+bwd with the reference model: 15.8 s at 64 rows, 14.1 s at 128, 10.8 s at 256 (eager: 14.7 s).
CPU_MIN_ROWS = 256


def default_rows(tokens: int, vocab: int, device_type: str) -> int:
    """Rows per chunk when the caller gives none: flce's, raised to CPU_MIN_ROWS on the CPU."""
    rows = chunk_rows(tokens, vocab, 0, device_type)
    return max(rows, min(tokens, CPU_MIN_ROWS)) if device_type == "cpu" else rows


NEEDS_REFERENCE = ("dpo", "ipo")


@dataclass
class PreferenceOutput:
    """loss: the scalar to minimize. The rest are [B] (accuracy a scalar), detached, for logging: the policy's
    summed log-probabilities of the chosen and rejected completions, the rewards, their margins, and the share
    of pairs whose chosen reward beats the rejected one."""

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_margins: torch.Tensor
    reward_accuracy: torch.Tensor
    nll_loss: torch.Tensor


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over each sequence's counted tokens of log softmax(hidden W^T + b)[label], counted tokens) for hidden
    [N, S, H] and labels [N, S]: [N] fp32 and [N] int64, differentiable in hidden, weight and bias, through
    fused_linear_cross_entropy's chunked pass (no [N S, V] logits)."""
    token_loss = fused_linear_cross_entropy(
        hidden,
        weight,
        labels,
        bias,
        ignore_index=ignore_index,
        softcap=softcap,
        reduction="none",
        chunk_size=chunk_size,
    )
    return -token_loss.sum(-1), (labels != ignore_index).sum(-1)


def _pair_losses(loss, beta, label_smoothing, gamma, pi_c, pi_r, n_c, n_r, rho_c, rho_r):
    """(per-pair loss [B], chosen rewards, rejected rewards) in fp32."""
    avg_c, avg_r = pi_c / n_c.clamp(min=1), pi_r / n_r.clamp(min=1)
    if loss in ("dpo", "simpo"):
        if loss == "dpo":
            d = (pi_c - rho_c) - (pi_r - rho_r)
            rewards = beta * (pi_c - rho_c), beta * (pi_r - rho_r)
        else:
            d = avg_c - avg_r - gamma / beta
            rewards = beta * avg_c, beta * avg_r
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
        return per_pair, *rewards
    if loss == "ipo":
        d = (pi_c - rho_c) / n_c.clamp(min=1) - (pi_r - rho_r) / n_r.clamp(min=1)
        return (d - 1 / (2 * beta)) ** 2, beta * (pi_c - rho_c), beta * (pi_r - rho_r)

    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    return -beta * F.logsigmoid(log_odds), beta * avg_c, beta * avg_r


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _pair_part(loss, settings, ce_c, ce_r, n_c, n_r, rho_c, rho_r, pairs: int, chosen_tokens):
    """(these pairs' share of the loss: sum of their losses / pairs, plus nll_weight * their chosen tokens' ce /
    chosen_tokens; its gradient in the chosen and rejected ce sums [k] each). The derivatives are written out
    (autograd is off inside an op): with pi = -ce and the pair's margin d as in the module docstring,
      dpo, simpo:  dL/dd = beta (eps sigmoid(beta d) - (1 - eps) sigmoid(-beta d))
      ipo:         dL/dd = 2 (d - 1 / (2 beta))
      orpo:        dL/d log_odds = -beta sigmoid(-log_odds);  d log_odds / d avg_c = 1 / (1 - exp(avg_c)), and
                   -1 / (1 - exp(avg_r)) for avg_r
    and dd / dpi_c = 1 (dpo) or 1 / n_c (ipo, simpo, orpo's avg), the negatives for the rejected side."""
    beta, eps, gamma, nll_weight = settings
    pi_c, pi_r = -ce_c, -ce_r
    per_pair = _pair_losses(loss, beta, eps, gamma, pi_c, pi_r, n_c, n_r, rho_c, rho_r)[0]
    inv_c, inv_r = 1 / n_c.clamp(min=1), 1 / n_r.clamp(min=1)
    if loss in ("dpo", "simpo"):
        d = (pi_c - rho_c) - (pi_r - rho_r) if loss == "dpo" else pi_c * inv_c - pi_r * inv_r - gamma / beta
        slope = beta * (eps * torch.sigmoid(beta * d) - (1 - eps) * torch.sigmoid(-beta * d))
        grad_pi_c, grad_pi_r = (slope, -slope) if loss == "dpo" else (slope * inv_c, -slope * inv_r)
    elif loss == "ipo":
        d = (pi_c - rho_c) * inv_c - (pi_r - rho_r) * inv_r
        slope = 2 * (d - 1 / (2 * beta))
        grad_pi_c, grad_pi_r = slope * inv_c, -slope * inv_r
    else:
        avg_c, avg_r = pi_c * inv_c, pi_r * inv_r
        log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
        slope = -beta * torch.sigmoid(-log_odds)
        grad_pi_c = slope * inv_c / -torch.expm1(avg_c)
        grad_pi_r = -slope * inv_r / -torch.expm1(avg_r)
    part = per_pair.sum() / pairs
    grad_c, grad_r = -grad_pi_c / pairs, -grad_pi_r / pairs
    if nll_weight:
        part = part + nll_weight * ce_c.sum() / chosen_tokens
        grad_c = grad_c + nll_weight / chosen_tokens
    return part, grad_c, grad_r


def _reference_rows(logits, labels, grad_weights, z_grad_weights, class_weight, loss, lse, ignore_index, eps, softcap):
    """flce's row pass by its eager formula (the reference backend's), in place like the kernels."""
    values, lses, dz = flce_ref.token_losses(logits, labels, grad_weights, ignore_index, eps, softcap)
    loss.copy_(values)
    lse.copy_(lses)
    if dz is not None:
        logits.copy_(dz)


def _forward_with(row_pass, chunked: bool = True):
    def forward(hidden, weight, labels, bias, ref_c, ref_r, loss, beta, eps, gamma, nll_weight, ignore_index, softcap,
                need_grad_hidden, need_grad_weight, need_grad_bias, chunk_size):  # fmt: skip
        """(loss, logps [2B], grad_hidden, grad_weight, grad_bias), chunk by chunk of whole pairs."""
        sequences, seq_len, hidden_size = hidden.shape
        pairs, vocab, device = sequences // 2, weight.shape[0], hidden.device
        cd = accumulate_dtype(hidden.dtype)
        labels = labels.contiguous()
        counts = (labels != ignore_index).sum(-1).to(cd)
        chosen_tokens = counts[:pairs].sum().clamp(min=1)
        settings = (beta, eps, gamma, nll_weight)
        with_grads = need_grad_hidden or need_grad_weight or need_grad_bias
        tokens = sequences * seq_len
        if not chunked:
            capacity = tokens
        else:
            capacity = chunk_size if chunk_size > 0 else default_rows(tokens, vocab, device.type)
            capacity = max(1, min(capacity, tokens))
        # Whole pairs per chunk while a pair fits the chunk. A pair up to SINGLE_PASS_CHUNKS chunks long (the
        # default chunk only) goes alone in one pass, the buffer grown to it; a longer one goes alone in
        # sub-chunks, twice.
        pair_rows = 2 * seq_len
        pairs_per_chunk = max(1, capacity // pair_rows)
        if pair_rows <= capacity * (1 if chunk_size else SINGLE_PASS_CHUNKS):
            capacity = pairs_per_chunk * pair_rows
        # Only counted tokens go through the matmuls (flce_ops.counted_rows): the buffer needs no more rows than
        # the most any group of pairs counts.
        if flce_ops.host_may_read(labels):
            groups = -(-pairs // pairs_per_chunk)
            per_pair = F.pad(counts.view(2, pairs).sum(0), (0, groups * pairs_per_chunk - pairs))
            capacity = max(1, min(capacity, int(per_pair.view(groups, pairs_per_chunk).sum(1).max())))
        buffer = torch.empty(capacity, vocab, dtype=cd, device=device)
        unit = torch.ones(capacity, dtype=cd, device=device)  # the row pass zeroes ignored rows itself
        token_lse = torch.empty_like(unit)
        logps = torch.empty(sequences, dtype=cd, device=device)
        total = torch.zeros((), dtype=cd, device=device)
        # ignored rows keep these zeros; the group's counted rows are copied in
        grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device) if need_grad_hidden else None
        flat_hidden, flat_labels = hidden.reshape(tokens, hidden_size), labels.view(tokens)
        grad_weight = torch.zeros(weight.shape, dtype=cd, device=device) if need_grad_weight else None
        grad_bias = torch.zeros(vocab, dtype=cd, device=device) if need_grad_bias else None
        bias_c = None if bias is None else bias.to(cd)

        def logits_of(h, rows):
            logits = buffer[:rows]
            logits_into(h, weight, logits)
            if bias_c is not None:
                logits.add_(bias_c)
            return logits

        def fold(dz, h, dh_rows):
            """dh_rows (or None) = dz W in the input dtype; dW += dz^T h; db += sum dz."""
            dz_input_dtype = dz.to(hidden.dtype)
            if dh_rows is not None:
                torch.mm(dz_input_dtype, weight, out=dh_rows)
            if grad_weight is not None:
                accumulate_grad_weight(grad_weight, dz, dz_input_dtype, h)
            if grad_bias is not None:
                grad_bias.add_(dz.sum(0))

        for start in range(0, pairs, pairs_per_chunk):
            stop = min(start + pairs_per_chunk, pairs)
            k, n = stop - start, 2 * (stop - start) * seq_len
            chosen, rejected = slice(start, stop), slice(pairs + start, pairs + stop)
            # the group's rows of the flattened batch, its chosen sequences then its rejected ones; then those that
            # count, each gathered once
            chosen_rows = torch.arange(start * seq_len, stop * seq_len, device=device)
            source = torch.cat([chosen_rows, chosen_rows + pairs * seq_len])
            sequence = torch.arange(n, device=device) // seq_len  # each row's, in 0..2k-1
            kept = flce_ops.counted_rows(flat_labels.index_select(0, source), ignore_index)  # None: every row
            if kept is not None:
                source, sequence = source.index_select(0, kept), sequence.index_select(0, kept)
            h, y = flat_hidden.index_select(0, source), flat_labels.index_select(0, source)
            n_kept = y.shape[0]
            token_loss = torch.empty(n_kept, dtype=cd, device=device)
            dh = torch.empty(n_kept, hidden_size, dtype=hidden.dtype, device=device) if need_grad_hidden else None
            single = n_kept <= capacity
            # sub-chunks fold their unit gradients as they go (dh and db are linear in each sequence's weight)
            folding = with_grads and not single and not need_grad_weight
            if folding:
                unit_dh = torch.empty_like(dh) if need_grad_hidden else None
                unit_db = torch.zeros(2 * k, vocab, dtype=cd, device=device) if need_grad_bias else None
            # pass 1: the tokens' ce (and, when the group fits one chunk, their unit gradients, kept in the buffer)
            for sub in range(0, n_kept, capacity):
                rows = slice(sub, min(sub + capacity, n_kept))
                m = rows.stop - rows.start
                logits = logits_of(h[rows], m)
                unit_weights = unit[:m] if with_grads and (single or folding) else None
                row_pass(logits, y[rows], unit_weights, None, None, token_loss[rows], token_lse[:m], ignore_index, 0.0,
                         softcap)  # fmt: skip
                if folding:
                    if unit_dh is not None:
                        torch.mm(logits.to(hidden.dtype), weight, out=unit_dh[rows])
                    if unit_db is not None:
                        unit_db.index_add_(0, sequence[rows], logits)
            ce = torch.zeros(2 * k, dtype=cd, device=device).index_add_(0, sequence, token_loss)
            logps[chosen], logps[rejected] = -ce[:k], -ce[k:]
            refs = (None, None) if ref_c is None else (ref_c[chosen], ref_r[chosen])
            part, grad_c, grad_r = _pair_part(
                loss, settings, ce[:k], ce[k:], counts[chosen], counts[rejected], *refs, pairs, chosen_tokens
            )
            total += part
            if not with_grads:
                continue
            token_weights = torch.cat([grad_c, grad_r]).index_select(0, sequence)  # d loss / d ce_t
            if single:  # dz = d loss / d ce_t * d ce_t / d logits, from the unit gradients in the buffer
                if n_kept:
                    logits.mul_(token_weights[:, None])
                    fold(logits, h, dh)
            elif folding:  # dh_t = w_seq (u_t W), db = sum over sequences of w_seq sum_t u_t
                if dh is not None:
                    dh.copy_(unit_dh.to(cd) * token_weights[:, None])
                if unit_db is not None:
                    grad_bias.add_(torch.cat([grad_c, grad_r]) @ unit_db)
            else:  # pass 2: the logits again, the row pass with the tokens' weights
                for sub in range(0, n_kept, capacity):
                    rows = slice(sub, min(sub + capacity, n_kept))
                    m = rows.stop - rows.start
                    logits = logits_of(h[rows], m)
                    row_pass(logits, y[rows], token_weights[rows], None, None, token_loss[rows], token_lse[:m],
                             ignore_index, 0.0, softcap)  # fmt: skip
                    fold(logits, h[rows], None if dh is None else dh[rows])
            if dh is not None:
                grad_hidden.view(tokens, hidden_size).index_copy_(0, source, dh)
        return (
            total,
            logps,
            hidden.new_empty(0) if grad_hidden is None else grad_hidden,
            weight.new_empty(0) if grad_weight is None else grad_weight.to(weight.dtype),
            hidden.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype),
        )

    return forward


def _fake_forward(hidden, weight, labels, bias, *rest):
    need_grad_hidden, need_grad_weight, need_grad_bias = rest[-4:-1]
    cd = accumulate_dtype(hidden.dtype)
    return (
        hidden.new_empty((), dtype=cd),
        hidden.new_empty((hidden.shape[0],), dtype=cd),
        torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        if need_grad_hidden
        else hidden.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_grad_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_grad_bias else hidden.new_empty(0),
    )


def _check_forward(hidden, weight, labels, bias, ref_c, ref_r, loss, beta, eps, gamma, nll_weight, ignore_index,
                   softcap, need_grad_hidden, need_grad_weight, need_grad_bias, chunk_size):  # fmt: skip
    op = "preference_forward"
    check_dtype(op, "hidden", hidden, FLOAT_DTYPES)
    check_dtype(op, "weight", weight, (hidden.dtype,))
    if hidden.dim() != 3 or hidden.shape[0] % 2 or weight.dim() != 2:
        raise ValueError(f"{op}: hidden must be [2B, S, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")  # fmt: skip
    check_features(op, "hidden", hidden, "hidden size")
    if hidden.shape[1] < 1:
        raise ValueError(f"{op}: hidden must hold at least one token per sequence, got {tuple(hidden.shape)}")
    check_last_dim(op, "hidden", hidden, weight.shape[1], "weight's hidden size")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight must have at least one row (the vocabulary), got {tuple(weight.shape)}")
    check_dtype(op, "labels", labels, (torch.int64,))
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"{op}: labels must be {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    if bias is not None:
        check_dtype(op, "bias", bias, (hidden.dtype,))
    check_optional(op, "bias", bias, weight.shape[0], "the vocabulary")
    if loss not in LOSSES:
        raise ValueError(f"{op}: loss must be one of {LOSSES}, got {loss!r}")
    if (ref_c is None) != (ref_r is None) or (ref_c is None) == (loss in NEEDS_REFERENCE):
        raise ValueError(
            f"{op}: {loss} takes {'both' if loss in NEEDS_REFERENCE else 'no'} reference log-probabilities"
        )
    for name, t in (("ref_chosen_logps", ref_c), ("ref_rejected_logps", ref_r)):
        if t is not None:
            check_dtype(op, name, t, (accumulate_dtype(hidden.dtype),))
            check_numel(op, name, t, hidden.shape[0] // 2, "one per pair")
    check_real(op, "beta", beta, low=0.0)
    if beta <= 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    check_real(op, "label_smoothing", eps, low=0.0, high=0.5, high_open=True)
    check_real(op, "simpo_gamma", gamma)
    check_real(op, "nll_weight", nll_weight, low=0.0)
    check_int(op, "ignore_index", ignore_index)
    check_real(op, "softcap", softcap, low=0.0)
    if need_grad_bias and bias is None:
        raise ValueError(f"{op}: need_grad_bias is True but bias is None")
    check_int(op, "chunk_size", chunk_size, low=0)


preference_forward = define_op(
    "preference_forward",
    "(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor? ref_chosen_logps, "
    "Tensor? ref_rejected_logps, str loss, float beta, float label_smoothing, float simpo_gamma, float nll_weight, "
    "int ignore_index, float softcap, bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias, "
    "int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    family="flce",
    fake=_fake_forward,
    reference=_forward_with(_reference_rows, chunked=False),
    native=_forward_with(flce_ops.native_rows),
    triton=_forward_with(flce_ops.triton_rows),
    check=_check_forward,
)


@carry_backend
class FusedLinearPreferenceFunction(torch.autograd.Function):
    """(loss, logps [2B]) of the policy; the gradients are computed in the forward and scaled by the loss's
    output grad in backward (nothing [T, V] is saved). logps is not differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ref_c, ref_r, settings, chunk_size: int):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        ctx.needs = needs
        total, logps, *grads = preference_forward(
            hidden, weight, labels, bias, ref_c, ref_r, *settings, *needs, chunk_size
        )
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(logps)
        return total, logps

    @staticmethod
    def backward(ctx, grad_loss, grad_logps):
        if not torch.compiler.is_compiling() and float(grad_loss) == 1.0:
            grads = ctx.saved_tensors
        else:
            grads = tuple((g * grad_loss).to(g.dtype) for g in ctx.saved_tensors)
        grad_hidden, grad_weight, grad_bias = (g if need else None for g, need in zip(grads, ctx.needs))
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None


def fused_linear_preference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    loss: str = "dpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    nll_weight: float | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> PreferenceOutput:
    """DPO / IPO / SimPO / ORPO over the policy's lm_head (hidden @ weight.T + bias), chunked: see the module's
    docstring for the layout and the formulas. hidden [2B, S, H] (chosen rows, then rejected), labels [2B, S].

    dpo and ipo need the reference model's log-probabilities: precomputed (ref_chosen_logps, ref_rejected_logps,
    [B] each, as TRL's precompute_ref_log_probs writes them) or its lm_head inputs (ref_hidden [2B, S, H_ref],
    ref_weight [V, H_ref], ref_bias), computed here with no gradient in the same chunked way. simpo and orpo are
    reference-free. label_smoothing (dpo, simpo): in [0, 0.5). nll_weight: the chosen completions'
    cross-entropy added to the loss (default 1 for orpo, 0 otherwise).
    """
    fn = "fused_linear_preference"
    if loss not in LOSSES:
        raise ValueError(f"{fn}: loss must be one of {LOSSES}, got {loss!r}")
    for name, value in (("beta", beta), ("simpo_gamma", simpo_gamma), ("label_smoothing", label_smoothing)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value != value
            or abs(value) == float("inf")
        ):
            raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if beta <= 0:
        raise ValueError(f"{fn}: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if nll_weight is None:
        nll_weight = 1.0 if loss == "orpo" else 0.0
    if isinstance(nll_weight, bool) or not isinstance(nll_weight, (int, float)) or not 0 <= nll_weight < float("inf"):
        raise ValueError(f"{fn}: nll_weight must be a finite number >= 0, got {nll_weight!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"{fn}: hidden must be a [2B, S, H] tensor (chosen rows, then rejected)")
    if hidden.shape[0] % 2 or hidden.shape[0] == 0:
        raise ValueError(
            f"{fn}: hidden's first dim must be 2B > 0 (B chosen rows, then B rejected), got {hidden.shape[0]}"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:2]:
        raise ValueError(f"{fn}: labels must have shape {tuple(hidden.shape[:2])}")
    pairs = hidden.shape[0] // 2
    rho_c = rho_r = None
    if loss in NEEDS_REFERENCE:
        rho_c, rho_r = _reference_logps(
            fn, pairs, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias, labels, ignore_index,
            softcap, chunk_size,
        )  # fmt: skip
    elif any(t is not None for t in (ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight)):
        raise ValueError(f"{fn}: {loss} is reference-free; pass no reference log-probabilities or inputs")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if softcap is not None and not 0.0 < softcap < float("inf"):
        raise ValueError(f"{fn}: softcap must be None or a finite number > 0, got {softcap}")
    # the lm_head product follows F.linear's autocast rule (ops/_autocast.py); the loss stays fp32
    hidden, weight, bias = cast_like_linear(autocast_dtype(hidden), hidden, weight, bias)
    if labels.dtype != torch.int64:
        raise TypeError(f"{fn}: labels must have dtype int64, got {str(labels.dtype).replace('torch.', '')}")
    if weight.dim() == 2:
        check_label_range(fn, labels, weight.shape[0], ignore_index)
    cd = accumulate_dtype(hidden.dtype)
    settings = (loss, float(beta), float(label_smoothing), float(simpo_gamma), float(nll_weight), ignore_index,
                float(softcap or 0.0))  # fmt: skip
    total, logps = FusedLinearPreferenceFunction.apply(
        hidden,
        weight,
        labels,
        bias,
        None if rho_c is None else rho_c.to(cd),
        None if rho_r is None else rho_r.to(cd),
        settings,
        chunk_size or 0,
    )
    pi_c, pi_r = logps[:pairs], logps[pairs:]
    counts = (labels != ignore_index).sum(-1)
    n_c, n_r = counts[:pairs], counts[pairs:]
    _, chosen_rewards, rejected_rewards = _pair_losses(
        loss, float(beta), float(label_smoothing), float(simpo_gamma), pi_c, pi_r, n_c, n_r, rho_c, rho_r
    )
    margins = chosen_rewards - rejected_rewards
    return PreferenceOutput(
        loss=total,
        chosen_logps=pi_c,
        rejected_logps=pi_r,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_margins=margins,
        reward_accuracy=(margins > 0).float().mean(),
        nll_loss=-pi_c.sum() / n_c.sum().clamp(min=1),
    )


def _reference_logps(
    fn, pairs, chosen, rejected, ref_hidden, ref_weight, ref_bias, labels, ignore_index, softcap, chunk
):
    if (chosen is None) != (rejected is None):
        raise ValueError(f"{fn}: pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if chosen is not None:
        if ref_hidden is not None or ref_weight is not None:
            raise ValueError(f"{fn}: pass the reference log-probabilities or the reference inputs, not both")
        for name, t in (("ref_chosen_logps", chosen), ("ref_rejected_logps", rejected)):
            if not isinstance(t, torch.Tensor) or t.shape != (pairs,) or not t.is_floating_point():
                raise ValueError(f"{fn}: {name} must be a float tensor of shape ({pairs},)")
        return chosen.detach().float(), rejected.detach().float()
    if ref_hidden is None or ref_weight is None:
        raise ValueError(
            f"{fn}: this loss needs the reference model: ref_chosen_logps and ref_rejected_logps, or ref_hidden "
            "and ref_weight"
        )
    if not isinstance(ref_hidden, torch.Tensor) or ref_hidden.shape[:2] != labels.shape:
        raise ValueError(f"{fn}: ref_hidden must have shape {tuple(labels.shape)} + (hidden,)")
    if chunk is None:  # the policy's rows per chunk, CPU_MIN_ROWS on the CPU included
        chunk = default_rows(labels.numel(), ref_weight.shape[0], ref_hidden.device.type)
    with torch.no_grad():
        logps, _ = sequence_logps(ref_hidden, ref_weight, labels, ref_bias, ignore_index, softcap, chunk)
    return logps[:pairs].float(), logps[pairs:].float()
