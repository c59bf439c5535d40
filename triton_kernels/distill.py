"""Fused linear distillation in Triton: the row pass over one chunk of fp32 student and teacher logits (the
matmuls around it are torch's, driven by pyfastpeft/ops/distill.py; the math is csrc/cpu/distill.cpp's and
pyfastpeft/reference/distill.py's):
  log p_v = zs_v / tau - lse(zs / tau),  log q_v = zt_v / tau - lse(zt / tau)
  MODE 0 (beta 0):  kd = sum_v q_v (log q_v - log p_v)                        dkd_v = p_v - q_v
  MODE 1 (beta 1):  r_v = log p_v - log q_v, K = sum_v p_v r_v, kd = K         dkd_v = p_v (r_v - K)
  MODE 2:           log m_v = logaddexp(log(1 - beta) + log p_v, log(beta) + log q_v), r_v = log p_v - log m_v,
                    K = sum_v p_v r_v, kd = (1 - beta) K + beta sum_v q_v (log q_v - log m_v)
                                                                               dkd_v = (1 - beta) p_v (r_v - K)
  loss = a (lse(zs) - zs_y) + (1 - a) kd   (0 where y == ignore_index; the cross-entropy only when HAS_HARD)
  dzs_v = g ((1 - a) / tau dkd_v + a (exp(zs_v - lse(zs)) - [v == y]))
One program per row, three sweeps over BLOCK_V-column blocks: the logsumexps (online); the loss, writing q_v
(MODE 0) or r_v over the teacher row, which is scratch; with a gradient, dzs over the student row. Each element
is read and written by the thread that owns its column. The logits are fp32, so the CPU interpreter needs no
upcast here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096


@triton.jit
def _online(running_max, running_sum, x):
    """One step of the online logsumexp per lane: sums are relative to the lane's max, or to 0 where that is
    +-inf (a lane that has seen only masked -inf columns stays at max -inf, sum 0; never inf - inf)."""
    new_max = tl.maximum(running_max, x)
    shift = tl.where(tl.abs(new_max) == float("inf"), 0.0, new_max)
    return new_max, running_sum * tl.exp(running_max - shift) + tl.exp(x - shift)


@triton.jit
def _finish(running_max, running_sum):
    row_max = tl.max(running_max, axis=0)
    row_shift = tl.where(tl.abs(row_max) == float("inf"), 0.0, row_max)
    return row_shift + tl.log(tl.sum(running_sum * tl.exp(running_max - row_shift), axis=0))


# student, teacher: [rows, V] fp32 contiguous (teacher overwritten; student overwritten with dzs when HAS_GRAD);
# labels: int64 [rows]; grad_weights, loss: fp32 [rows]. With HAS_HARD, a label outside [0, V) other than
# ignore_index gives a NaN row (nothing is read out of bounds).
@triton.jit
def _rows_kernel(
    student_ptr,
    teacher_ptr,
    labels_ptr,
    grad_weights_ptr,
    loss_ptr,
    vocab,
    ignore_index,
    beta,
    log_student_share,
    log_teacher_share,
    inverse_tau,
    hard,
    MODE: tl.constexpr,
    HAS_HARD: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = student_ptr + row * vocab
    zt_row = teacher_ptr + row * vocab
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    bad_label = ~ignored & ((label < 0) | (label >= vocab))  # matters only with HAS_HARD
    s_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    t_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    raw_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    t_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    raw_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    target = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        col = start + tl.arange(0, BLOCK_V)
        mask = col < vocab
        zs = tl.load(zs_row + col, mask=mask, other=float("-inf"))
        zt = tl.load(zt_row + col, mask=mask, other=float("-inf"))
        s_max, s_sum = _online(s_max, s_sum, zs * inverse_tau)
        t_max, t_sum = _online(t_max, t_sum, zt * inverse_tau)
        if HAS_HARD:
            raw_max, raw_sum = _online(raw_max, raw_sum, zs)
            target += tl.where(col == label, zs, 0.0)
    lse_s = _finish(s_max, s_sum)
    lse_t = _finish(t_max, t_sum)
    kd_p = tl.zeros([BLOCK_V], dtype=tl.float32)  # K's terms (MODE 1, 2) or the forward KL's (MODE 0)
    kd_q = tl.zeros([BLOCK_V], dtype=tl.float32)  # sum q (log q - log m), MODE 2
    for start in range(0, vocab, BLOCK_V):
        col = start + tl.arange(0, BLOCK_V)
        mask = col < vocab
        log_p = tl.load(zs_row + col, mask=mask, other=0.0) * inverse_tau - lse_s
        log_q = tl.load(zt_row + col, mask=mask, other=0.0) * inverse_tau - lse_t
        if MODE == 0:
            q = tl.exp(log_q)
            kd_p += tl.where(mask, q * (log_q - log_p), 0.0)
            tl.store(zt_row + col, q, mask=mask)
        elif MODE == 1:
            r = log_p - log_q
            kd_p += tl.where(mask, tl.exp(log_p) * r, 0.0)
            tl.store(zt_row + col, r, mask=mask)
        else:
            a = log_p + log_student_share
            b = log_q + log_teacher_share
            log_m = tl.maximum(a, b) + tl.log(1.0 + tl.exp(-tl.abs(a - b)))
            r = log_p - log_m
            kd_p += tl.where(mask, tl.exp(log_p) * r, 0.0)
            kd_q += tl.where(mask, tl.exp(log_q) * (log_q - log_m), 0.0)
            tl.store(zt_row + col, r, mask=mask)
    kl_p = tl.sum(kd_p, axis=0)
    if MODE == 2:
        kd = (1.0 - beta) * kl_p + beta * tl.sum(kd_q, axis=0)
    else:
        kd = kl_p
    loss = (1.0 - hard) * kd
    if HAS_HARD:
        lse_raw = _finish(raw_max, raw_sum)
        loss += hard * (lse_raw - tl.sum(target, axis=0))
        loss = tl.where(bad_label, float("nan"), loss)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    if HAS_GRAD:
        g = tl.load(grad_weights_ptr + row)
        g = tl.where(ignored, 0.0, g)
        if HAS_HARD:
            g = tl.where(bad_label, float("nan"), g)
        kd_scale = g * (1.0 - hard) * inverse_tau
        if MODE == 2:
            kd_scale = kd_scale * (1.0 - beta)
        for start in range(0, vocab, BLOCK_V):
            col = start + tl.arange(0, BLOCK_V)
            mask = col < vocab
            zs = tl.load(zs_row + col, mask=mask, other=0.0)
            scratch = tl.load(zt_row + col, mask=mask, other=0.0)
            p = tl.exp(zs * inverse_tau - lse_s)
            if MODE == 0:
                dz = kd_scale * (p - scratch)
            else:
                dz = kd_scale * p * (scratch - kl_p)
            if HAS_HARD:
                dz += g * hard * (tl.exp(zs - lse_raw) - tl.where(col == label, 1.0, 0.0))
            tl.store(zs_row + col, tl.where(ignored, 0.0, dz), mask=mask)


def distill_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    grad_weights: torch.Tensor | None,
    loss: torch.Tensor,
    ignore_index: int,
    beta: float,
    temperature: float,
    hard_label_weight: float,
) -> None:
    """The row pass on student and teacher logits [rows, V] (fp32, contiguous, rows >= 1): fills loss (fp32
    [rows]) and overwrites the teacher rows; with grad_weights (fp32 [rows]) overwrites the student rows with
    dzs."""
    rows, vocab = student.shape
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    mode = 0 if beta == 0 else 1 if beta == 1 else 2
    shares = (math.log1p(-beta), math.log(beta)) if mode == 2 else (0.0, 0.0)
    has_grad = grad_weights is not None
    _rows_kernel[(rows,)](
        student,
        teacher,
        labels,
        grad_weights if has_grad else loss,
        loss,
        vocab,
        ignore_index,
        float(beta),
        *shares,
        1.0 / temperature,
        float(hard_label_weight),
        MODE=mode,
        HAS_HARD=hard_label_weight > 0,
        HAS_GRAD=has_grad,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
