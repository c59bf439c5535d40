"""Fused linear cross-entropy reference: the plain formula, logits of every token at once.

For hidden h [T, H], weight W [V, H], bias b [V] (or none), labels y [T], class weights w [V] (or none:
all 1), z-loss scale s >= 0, in the compute dtype (fp32; fp64 for fp64 inputs):
  z = h W^T + b                                   logits [T, V]
  c = softcap * tanh(z / softcap)                 (c = z when softcap is 0: none)
  lse_t = logsumexp_v c_tv                        (torch.logsumexp: +inf for a row with a +inf logit, -inf
                                                  for a row of -inf, NaN for a row with a NaN)
  ce_t = lse_t - (1 - eps) c_{t,y_t} - (eps / V) sum_v c_tv                 (without class weights)
       = (1 - eps) w_y (lse_t - c_{t,y_t}) + (eps / V) sum_v w_v (lse_t - c_tv)    (with them, y = y_t)
         torch's cross_entropy(weight=w, label_smoothing=eps); the eps term only when eps > 0, so a -inf
         logit (a masked token) leaves the loss finite, as in torch
  zl_t = s lse_t^2                                (z-loss, PaLM's; unweighted by w, as Liger's)
  both 0 where y_t == ignore_index; ce_t NaN where y_t is outside [0, V) and not ignore_index
  reduction: none -> ce_t + zl_t; sum -> sum_t (ce_t + zl_t);
             mean -> sum_t ce_t / D + sum_t zl_t / max(valid tokens, 1), D = sum over valid tokens of w_{y_t}
             (the valid tokens without class weights; 0 when D is 0)
Gradients for per-token weights g_t (d reduced loss / d ce_t, times the output grad) and q_t (d reduced
loss / d zl_t, times 2 s: 2 s g_t for none and sum, 2 s / max(valid tokens, 1) for mean):
  dz_tv = (P_t softmax(c_t)_v - g_t (eps / V) w_v - g_t (1 - eps) w_y [v == y_t]) (1 - (c_tv / softcap)^2)
  P_t = g_t ((1 - eps) w_y + (eps / V) sum_v w_v) + q_t lse_t
  (w = 1 without class weights, so P_t = g_t + q_t lse_t; the last factor only with a softcap; zero rows
  where y_t == ignore_index)
  dh = dz W,   dW = dz^T h,   db = sum_t dz_t
"""

from __future__ import annotations

import torch

from pyfastpeft.reference._common import accumulate_dtype

NONE, MEAN, SUM = "none", "mean", "sum"
REDUCTIONS = (NONE, MEAN, SUM)


def mean_denominator(labels, ignore_index: int, dtype: torch.dtype, class_weight=None) -> torch.Tensor:
    """The mean reduction's divisor, a 0-dim tensor of `dtype`: the number of valid tokens, or with class
    weights the sum of their labels' weights; 1 where that is 0 (the mean of nothing is then 0)."""
    valid = labels != ignore_index
    if class_weight is None:
        return valid.sum().clamp(min=1).to(dtype)
    total = torch.where(valid, class_weight.to(dtype)[labels.clamp(0, class_weight.numel() - 1)], 0).sum()
    return torch.where(total == 0, torch.ones_like(total), total)


def reduction_weights(
    labels: torch.Tensor, ignore_index: int, reduction: str, dtype: torch.dtype, class_weight=None
) -> torch.Tensor:
    """d reduced loss / d ce_t, [T] of `dtype`: mean 1 / mean_denominator on valid tokens, sum and none 1
    on valid tokens (for none, the weights of loss.sum()); 0 on ignored tokens."""
    valid = (labels != ignore_index).to(dtype)
    if reduction == MEAN:
        return valid / mean_denominator(labels, ignore_index, dtype, class_weight)
    return valid


def reduce(loss_per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str, class_weight=None):
    if reduction == NONE:
        return loss_per_token
    total = loss_per_token.sum()
    if reduction == SUM:
        return total
    return total / mean_denominator(labels, ignore_index, total.dtype, class_weight)


def z_losses(lse: torch.Tensor, labels: torch.Tensor, ignore_index: int, lse_square_scale: float) -> torch.Tensor:
    """zl_t = s lse_t^2 on valid tokens, 0 on ignored ones, [T] like lse."""
    return torch.where(labels != ignore_index, lse_square_scale * lse.square(), torch.zeros_like(lse))


def token_losses(
    logits,
    labels,
    grad_weights,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    class_weight=None,
    z_grad_weights=None,
):
    """(ce_t, lse_t, dz or None) from compute-dtype logits [T, V]; dz only when grad_weights [T] (g_t) is given,
    with the z-loss term when z_grad_weights [T] (q_t) is. class_weight: [V] in the compute dtype, or None."""
    vocab = logits.shape[-1]
    eps = label_smoothing
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    capped = softcap * torch.tanh(logits / softcap) if softcap else logits
    lse = torch.logsumexp(capped, dim=-1)
    target_index = labels.clamp(0, vocab - 1)[:, None]
    target = capped.gather(-1, target_index)[:, 0]
    if class_weight is None:
        loss = lse - (1 - eps) * target
        if eps:
            loss = loss - eps * capped.mean(-1)
    else:
        label_weight = class_weight[target_index[:, 0]]
        loss = (1 - eps) * label_weight * (lse - target)
        if eps:
            loss = loss + eps / vocab * (class_weight.sum() * lse - capped @ class_weight)
    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(valid, torch.where(in_range, loss, nan), torch.zeros_like(loss))
    if grad_weights is None:
        return loss, lse, None
    scale = torch.where(valid, grad_weights.to(logits.dtype), torch.zeros_like(loss))
    scale = torch.where(valid & ~in_range, nan, scale)
    target_scale = (1 - eps) * scale
    if class_weight is None:
        p_scale = scale
        uniform = (eps / vocab) * scale[:, None]
    else:
        target_scale = target_scale * label_weight
        p_scale = scale * ((1 - eps) * label_weight + eps / vocab * class_weight.sum())
        uniform = (eps / vocab) * scale[:, None] * class_weight[None, :]
    if z_grad_weights is not None:
        p_scale = p_scale + torch.where(valid, z_grad_weights.to(logits.dtype) * lse, torch.zeros_like(lse))
    dz = torch.exp(capped - lse[:, None]) * p_scale[:, None] - uniform
    dz = dz.scatter_add(-1, target_index, -target_scale[:, None])
    if softcap:
        dz = dz * (1 - (capped / softcap) ** 2)
    return loss, lse, dz


def linear_logits(hidden, weight, bias):
    cd = accumulate_dtype(hidden.dtype)
    logits = hidden.to(cd) @ weight.to(cd).t()
    return logits if bias is None else logits + bias.to(cd)


def parameter_grads(dz, hidden, weight, bias, need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool):
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
    class_weight,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    lse_square_scale: float,
    reduction: str,
    need_predictions: bool,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_size: int,
):
    """(loss, lse, grad_hidden, grad_weight, grad_bias, predictions) for hidden [T, H]; loss is the reduced
    ce + zl (per token for none), grads of the reduced loss (of loss.sum() for reduction none), empty where not
    asked; predictions: int64 [T], each token's argmax of hidden W^T + b (softcap keeps the order), empty unless
    need_predictions. chunk_size is ignored: this is the unchunked oracle."""
    logits = linear_logits(hidden, weight, bias)
    cd = logits.dtype
    predictions = logits.argmax(-1) if need_predictions else labels.new_empty(0)
    any_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    weights = reduction_weights(labels, ignore_index, reduction, cd, class_weight) if any_grad else None
    z_weights = None
    if any_grad and lse_square_scale:
        z_weights = 2 * lse_square_scale * reduction_weights(labels, ignore_index, reduction, cd)
    loss, lse, dz = token_losses(
        logits, labels, weights, ignore_index, label_smoothing, softcap, class_weight, z_weights
    )
    loss = reduce(loss, labels, ignore_index, reduction, class_weight)
    if lse_square_scale:
        loss = loss + reduce(z_losses(lse, labels, ignore_index, lse_square_scale), labels, ignore_index, reduction)
    if dz is None:
        return (loss, lse, hidden.new_empty(0), weight.new_empty(0), hidden.new_empty(0), predictions)
    grads = parameter_grads(dz, hidden, weight, bias, need_grad_hidden, need_grad_weight, need_grad_bias)
    return (loss, lse, *grads, predictions)


def flce_backward(
    grad_loss,
    hidden,
    weight,
    labels,
    bias,
    class_weight,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    lse_square_scale: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_size: int,
):
    """(grad_hidden, grad_weight, grad_bias) for per-token output grads grad_loss [T] (reduction none)."""
    logits = linear_logits(hidden, weight, bias)
    z_weights = 2 * lse_square_scale * grad_loss if lse_square_scale else None
    _, _, dz = token_losses(logits, labels, grad_loss, ignore_index, label_smoothing, softcap, class_weight, z_weights)
    return parameter_grads(dz, hidden, weight, bias, need_grad_hidden, need_grad_weight, need_grad_bias)
