"""Fused linear distillation reference: the plain formula, the logits of every token at once.

For student hidden h [T, Hs], weight W [V, Hs], bias b; teacher hidden g [T, Ht], weight U [V, Ht], bias c;
labels y [T]; temperature tau > 0; beta in [0, 1]; hard-label weight a in [0, 1]; in the compute dtype (fp32;
fp64 for fp64 inputs):
  zs = h W^T + b,  zt = g U^T + c                              logits [T, V]
  p = softmax(zs / tau) (student),  q = softmax(zt / tau) (teacher), m = (1 - beta) p + beta q
  kd_t = beta KL(q || m) + (1 - beta) KL(p || m)    for 0 < beta < 1: the generalized JSD of GKD (Agarwal et
                                                    al. 2024), as TRL's generalized_jsd_loss computes it
       = KL(q || p) for beta 0 (forward KL),  KL(p || q) for beta 1 (reverse KL)   (TRL's two special cases)
  ce_t = logsumexp(zs) - zs_y                                  the hard-label cross-entropy, at temperature 1
  loss_t = a ce_t + (1 - a) kd_t on counted tokens (y != ignore_index), 0 on the others
  reduction: none -> loss_t; sum -> sum_t loss_t; mean -> sum_t loss_t / max(counted tokens, 1)
log m is logaddexp(log(1 - beta) + log p, log beta + log q), so no term is 0 * log 0 for finite logits.
Gradient of kd_t in the student's logits (the teacher gets none):
  beta 0:   (p - q) / tau
  else:     c p_v (r_v - K) / tau,   r_v = log p_v - log m_v,  K = sum_v p_v r_v = KL(p || m)
            (c = 1 - beta; for beta 1, c = 1 and m = q)
  (d/dp_v of (1 - beta) sum p log p - sum m log m is (1 - beta) r_v (plus a constant that the softmax's
  Jacobian removes), and d/ds_v of a function of p = softmax(s) is p_v (d_v - sum_k p_k d_k).)
Gradient of ce_t: softmax(zs)_v - [v == y]. For per-token weights w_t (d reduced loss / d loss_t):
  dzs_tv = w_t (a dce + (1 - a) dkd),   dh = dzs W,  dW = dzs^T h,  db = sum_t dzs_t
"""

from __future__ import annotations

import math

import torch

from pyfastpeft.reference.flce import REDUCTIONS, linear_logits, parameter_grads, reduce, reduction_weights

__all__ = ["REDUCTIONS", "distill_backward", "distill_forward", "token_losses"]


def token_losses(student, teacher, labels, grad_weights, ignore_index: int, beta: float, temperature: float, hard):
    """(loss_t, dzs or None) from compute-dtype student and teacher logits [T, V]; dzs only when grad_weights
    [T] is given. hard: the hard-label weight a."""
    vocab = student.shape[-1]
    counted = labels != ignore_index
    log_p = torch.log_softmax(student / temperature, dim=-1)
    log_q = torch.log_softmax(teacher / temperature, dim=-1)
    p = log_p.exp()
    if beta == 0:
        kd = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif beta == 1:
        r = log_p - log_q
        kl_p = kd = (p * r).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        r = log_p - log_m
        kl_p = (p * r).sum(-1)
        kd = (1 - beta) * kl_p + beta * (log_q.exp() * (log_q - log_m)).sum(-1)
    loss = (1 - hard) * kd
    if hard:
        in_range = (labels >= 0) & (labels < vocab)
        target_index = labels.clamp(0, vocab - 1)[:, None]
        lse = torch.logsumexp(student, dim=-1)
        ce = lse - student.gather(-1, target_index)[:, 0]
        ce = torch.where(in_range | ~counted, ce, torch.full_like(ce, float("nan")))
        loss = loss + hard * ce
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    if grad_weights is None:
        return loss, None
    if beta == 0:
        dkd = p - log_q.exp()
    else:
        dkd = (1 - beta if beta < 1 else 1.0) * p * (r - kl_p[:, None])
    dz = (1 - hard) / temperature * dkd
    if hard:
        dce = torch.softmax(student, dim=-1).scatter_add(-1, target_index, -torch.ones_like(student[:, :1]))
        dce = torch.where((in_range | ~counted)[:, None], dce, torch.full_like(dce, float("nan")))
        dz = dz + hard * dce
    scale = torch.where(counted, grad_weights.to(student.dtype), torch.zeros_like(loss))
    return loss, torch.where(counted[:, None], dz * scale[:, None], torch.zeros_like(dz))


def _both_logits(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias):
    """The student's and the teacher's logits [T, V], both in the student's compute dtype."""
    student = linear_logits(student_hidden, student_weight, student_bias)
    return student, linear_logits(teacher_hidden, teacher_weight, teacher_bias).to(student.dtype)


def distill_forward(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    ignore_index: int,
    beta: float,
    temperature: float,
    hard_label_weight: float,
    reduction: str,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_size: int,
):
    """(loss, grad_hidden, grad_weight, grad_bias) of the student; grads of the reduced loss (of loss.sum() for
    reduction none), empty where not asked. chunk_size is ignored: this is the unchunked oracle."""
    student, teacher = _both_logits(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias
    )
    any_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    weights = reduction_weights(labels, ignore_index, reduction, student.dtype) if any_grad else None
    loss, dz = token_losses(student, teacher, labels, weights, ignore_index, beta, temperature, hard_label_weight)
    loss = reduce(loss, labels, ignore_index, reduction)
    if dz is None:
        return loss, student_hidden.new_empty(0), student_weight.new_empty(0), student_hidden.new_empty(0)
    grads = parameter_grads(
        dz, student_hidden, student_weight, student_bias, need_grad_hidden, need_grad_weight, need_grad_bias
    )
    return (loss, *grads)


def distill_backward(
    grad_loss,
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    ignore_index: int,
    beta: float,
    temperature: float,
    hard_label_weight: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_size: int,
):
    """(grad_hidden, grad_weight, grad_bias) of the student for per-token output grads grad_loss [T]
    (reduction none)."""
    student, teacher = _both_logits(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias
    )
    _, dz = token_losses(student, teacher, labels, grad_loss, ignore_index, beta, temperature, hard_label_weight)
    return parameter_grads(
        dz, student_hidden, student_weight, student_bias, need_grad_hidden, need_grad_weight, need_grad_bias
    )
