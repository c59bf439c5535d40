"""Fused linear cross-entropy reference: the plain formula, logits of every token at once.

For hidden h [T, H], weight W [V, H], bias b [V] (or none), labels y [T], in the compute dtype
(fp32; fp64 for fp64 inputs):
  z = h W^T + b                                   logits [T, V]
  c = softcap * tanh(z / softcap)                 (c = z when softcap is 0: none)
  lse_t = logsumexp_v c_tv                        (torch.logsumexp: +inf for a row with a +inf logit, -inf
                                                  for a row of -inf, NaN for a row with a NaN)
  loss_t = lse_t - (1 - eps) c_{t,y_t} - (eps / V) sum_v c_tv      (torch's label smoothing eps; the last
         term only when eps > 0, so a -inf logit (a masked token) leaves the loss finite, as in torch)
         = 0 where y_t == ignore_index; NaN where y_t is outside [0, V) and not ignore_index
  reduction: none -> loss_t; sum -> sum_t loss_t; mean -> sum_t loss_t / max(valid tokens, 1)
Gradients for per-token weights g_t (d reduced loss / d loss_t, times the output grad):
  dz_tv = g_t (softmax(c_t)_v - eps / V - (1 - eps) [v == y_t]) (1 - (c_tv / softcap)^2)
  (the last factor only with a softcap; zero rows where y_t == ignore_index)
  dh = dz W,   dW = dz^T h,   db = sum_t dz_t
"""

from __future__ import annotations

import torch

from pyfastpeft.reference._common import accumulate_dtype

NONE, MEAN, SUM = "none", "mean", "sum"
REDUCTIONS = (NONE, MEAN, SUM)


def reduction_weights(labels: torch.Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """d reduced loss / d loss_t, [T] of `dtype`: mean 1 / max(valid, 1) on valid tokens, sum and none 1
    on valid tokens (for none, the weights of loss.sum()); 0 on ignored tokens."""
    valid = (labels != ignore_index).to(dtype)
    if reduction == MEAN:
        return valid / valid.sum().clamp(min=1)
    return valid


def reduce(loss_per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == NONE:
        return loss_per_token
    total = loss_per_token.sum()
    if reduction == SUM:
        return total
    return total / (labels != ignore_index).sum().clamp(min=1).to(total.dtype)


def token_losses(logits, labels, grad_weights, ignore_index: int, label_smoothing: float, softcap: float):
    """(loss_t, lse_t, dz or None) from compute-dtype logits [T, V]; dz only when grad_weights [T] is given."""
    vocab = logits.shape[-1]
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    capped = softcap * torch.tanh(logits / softcap) if softcap else logits
    lse = torch.logsumexp(capped, dim=-1)
    target_index = labels.clamp(0, vocab - 1)[:, None]
    target = capped.gather(-1, target_index)[:, 0]
    loss = lse - (1 - label_smoothing) * target
    if label_smoothing:
        loss = loss - label_smoothing * capped.mean(-1)
    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(valid, torch.where(in_range, loss, nan), torch.zeros_like(loss))
    if grad_weights is None:
        return loss, lse, None
    scale = torch.where(valid, grad_weights.to(logits.dtype), torch.zeros_like(loss))
    scale = torch.where(valid & ~in_range, nan, scale)
    dz = torch.exp(capped - lse[:, None]) - label_smoothing / vocab
    dz = dz.scatter_add(-1, target_index, torch.full_like(target_index, label_smoothing - 1, dtype=dz.dtype))
    dz = dz * scale[:, None]
    if softcap:
        dz = dz * (1 - (capped / softcap) ** 2)
    return loss, lse, dz


def _logits(hidden, weight, bias):
    cd = accumulate_dtype(hidden.dtype)
    logits = hidden.to(cd) @ weight.to(cd).t()
    return logits if bias is None else logits + bias.to(cd)


def _parameter_grads(dz, hidden, weight, bias, need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool):
    cd = dz.dtype
    grad_hidden = (dz @ weight.to(cd)).to(hidden.dtype) if need_grad_hidden else hidden.new_empty(0)
    grad_weight = (dz.t() @ hidden.to(cd)).to(weight.dtype) if need_grad_weight else weight.new_empty(0)
    grad_bias = dz.sum(0).to(bias.dtype) if need_grad_bias else hidden.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


def flce_forward(
    hidden,
    weight,
    labels,
    bias,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    reduction: str,
    need_predictions: bool,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_size: int,
):
    """(loss, lse, grad_hidden, grad_weight, grad_bias, predictions) for hidden [T, H]; grads of the reduced loss
    (of loss.sum() for reduction none), empty where not asked; predictions: int64 [T], each token's argmax of
    hidden W^T + b (softcap keeps the order), empty unless need_predictions. chunk_size is ignored: this is the
    unchunked oracle."""
    logits = _logits(hidden, weight, bias)
    predictions = logits.argmax(-1) if need_predictions else labels.new_empty(0)
    any_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    weights = reduction_weights(labels, ignore_index, reduction, logits.dtype) if any_grad else None
    loss, lse, dz = token_losses(logits, labels, weights, ignore_index, label_smoothing, softcap)
    loss = reduce(loss, labels, ignore_index, reduction)
    if dz is None:
        return (loss, lse, hidden.new_empty(0), weight.new_empty(0), hidden.new_empty(0), predictions)
    grads = _parameter_grads(dz, hidden, weight, bias, need_grad_hidden, need_grad_weight, need_grad_bias)
    return (loss, lse, *grads, predictions)


def flce_backward(
    grad_loss,
    hidden,
    weight,
    labels,
    bias,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_size: int,
):
    """(grad_hidden, grad_weight, grad_bias) for per-token output grads grad_loss [T] (reduction none)."""
    logits = _logits(hidden, weight, bias)
    _, _, dz = token_losses(logits, labels, grad_loss, ignore_index, label_smoothing, softcap)
    return _parameter_grads(dz, hidden, weight, bias, need_grad_hidden, need_grad_weight, need_grad_bias)
