"""Perplexity of a causal LM over a long token sequence, by transformers' documented sliding-window recipe,
with the loss of each window computed by fused_linear_cross_entropy (the window's [tokens, vocab] logits never
exist)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pyfastpeft.integrations.prepare import fused_loss_forward


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, max_length: int | None = None, stride: int = 512) -> float:
    """exp(mean negative log-likelihood) of input_ids [1, N] (or [N]) under model, a transformers causal LM.

    Windows of max_length tokens (default: the config's max_position_embeddings) start every `stride` tokens;
    each scores only the tokens the previous window did not (the rest of the window is context, labels -100),
    as transformers' "Perplexity of fixed-length models" guide does, but summing the exact negative
    log-likelihood of each scored token (the first token of the sequence has no prediction and is not scored).
    The model's logit transform (logit scale, final logit softcap) is applied as its own forward does; the
    router aux loss of MoE models is left out. The model runs as it is (call model.eval() first)."""
    fn = "perplexity"
    forward, reason = fused_loss_forward(model)
    if forward is None:
        raise ValueError(f"{fn}: {reason}")
    forward.aux_loss_coef = 0.0
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64:
        raise TypeError(f"{fn}: input_ids must be an int64 tensor")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"{fn}: input_ids must be [1, N] (or [N]) with N >= 2, got {tuple(input_ids.shape)}")
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
    for name, value in (("max_length", max_length), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {value!r}")
    if stride > max_length:
        raise ValueError(f"{fn}: stride ({stride}) must be <= max_length ({max_length}), or tokens go unscored")
    if max_length < 2:
        raise ValueError(f"{fn}: max_length must be >= 2 (a window of one token predicts nothing)")
    seq_len = input_ids.shape[1]
    nll, scored, previous_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        window = input_ids[:, begin:end]
        labels = window.clone()
        labels[:, : (end - begin) - (end - previous_end)] = -100  # context: scored by an earlier window
        counted = int((labels[:, 1:] != -100).sum())
        if counted:
            # num_items_in_batch=1: the fused forward returns the sum of the scored tokens' losses
            nll += float(forward.fused_forward(window, labels=labels, num_items_in_batch=1, use_cache=False).loss)
            scored += counted
        previous_end = end
        if end == seq_len:
            break
    return math.exp(nll / scored)
