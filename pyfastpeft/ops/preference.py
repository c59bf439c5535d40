"""Preference-alignment losses over an lm_head (DPO, IPO, ORPO, SimPO) without materializing the logits.

The per-token log-probabilities of the labels come from fused_linear_cross_entropy with reduction "none"
(log p_t = -ce_t, chunked over tokens; its backward recomputes the logits chunk by chunk with the per-token
output grads), so neither the policy's nor the reference model's [tokens, vocab] logits exist whole. The
sequence sums, the pairwise loss and the rewards are [batch]-sized eager torch on top.

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

from pyfastpeft.ops.flce import fused_linear_cross_entropy

LOSSES = ("dpo", "ipo", "simpo", "orpo")
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

    # orpo: log(1 - exp(x)) for x < 0, stable on both sides of -log 2
    def log1mexp(x):
        return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    return -beta * F.logsigmoid(log_odds), beta * avg_c, beta * avg_r


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
    policy_logps, counts = sequence_logps(hidden, weight, labels, bias, ignore_index, softcap, chunk_size)
    pi_c, pi_r = policy_logps[:pairs], policy_logps[pairs:]
    n_c, n_r = counts[:pairs], counts[pairs:]
    rho_c = rho_r = None
    if loss in NEEDS_REFERENCE:
        rho_c, rho_r = _reference_logps(
            fn, pairs, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias, labels, ignore_index,
            softcap, chunk_size,
        )  # fmt: skip
    elif any(t is not None for t in (ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight)):
        raise ValueError(f"{fn}: {loss} is reference-free; pass no reference log-probabilities or inputs")
    per_pair, chosen_rewards, rejected_rewards = _pair_losses(
        loss, float(beta), float(label_smoothing), float(simpo_gamma), pi_c, pi_r, n_c, n_r, rho_c, rho_r
    )
    total = per_pair.mean()
    nll = -pi_c.sum() / n_c.sum().clamp(min=1)
    if nll_weight:
        total = total + nll_weight * nll
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    margins = chosen_rewards - rejected_rewards
    return PreferenceOutput(
        loss=total,
        chosen_logps=pi_c.detach(),
        rejected_logps=pi_r.detach(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_margins=margins,
        reward_accuracy=(margins > 0).float().mean(),
        nll_loss=nll.detach(),
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
    with torch.no_grad():
        logps, _ = sequence_logps(ref_hidden, ref_weight, labels, ref_bias, ignore_index, softcap, chunk)
    return logps[:pairs].float(), logps[pairs:].float()
