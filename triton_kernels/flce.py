"""Fused linear cross-entropy in Triton: the row pass over one chunk of fp32 logits (Liger-Kernel's
design; the matmuls around it are torch's, driven by pyfastpeft/ops/flce.py).

One row of V logits z, label y, smoothing eps, softcap s (0: none), class weights w (optional; all 1
without), gradient weight g and z-loss gradient weight q (optional, 0 without; see pyfastpeft/reference/flce.py):
  c_v  = s * tanh(z_v / s)                        (c = z without softcap)
  lse  = m + log(sum_v exp(c_v - m)),  m = max_v c_v       (online over BLOCK_V-column blocks)
         with m replaced by 0 where it is +-inf (torch.logsumexp's shift: a +inf logit gives lse +inf and
         a row of -inf gives -inf, not the NaN of inf - inf)
  loss = lse - (1 - eps) * c_y - (eps / V) * sum_v c_v      (without class weights)
       = (1 - eps) * w_y * (lse - c_y) + (eps / V) * (W * lse - sum_v w_v c_v),  W = sum_v w_v   (with)
         (0 where y == ignore_index; the eps term only when eps > 0, so a -inf logit leaves the loss finite)
  dz_v = (P * exp(c_v - lse) - g * (eps / V) * w_v - g * (1 - eps) * w_y * [v == y]) * (1 - (c_v / s)^2)
  P    = g * ((1 - eps) * w_y + (eps / V) * W) + q * lse
One program per row, two sweeps: the first reads z for lse, c_y and sum c (sum w c and W with class weights);
the second reads z again and overwrites it with dz (each element is read before it is written, by the thread
that writes it).
The logits are fp32, so the CPU interpreter needs no upcast here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096


@triton.jit
def _softcapped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates to +-1 for large |x| (exp gives inf or 0).
        c = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    else:
        c = z
    return c


# logits: [rows, V] fp32 contiguous (overwritten with dz when HAS_GRAD); labels: int64 [rows];
# grad_weights, z_grad_weights (read when HAS_Z), loss, lse: fp32 [rows]; class_weight (read when
# HAS_CLASS_WEIGHT): fp32 [V]. A label outside [0, V) other than ignore_index gives a NaN row.
@triton.jit
def _rows_kernel(
    logits_ptr,
    labels_ptr,
    grad_weights_ptr,
    z_grad_weights_ptr,
    class_weight_ptr,
    loss_ptr,
    lse_ptr,
    vocab,
    ignore_index,
    smoothing,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * vocab
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < vocab)
    running_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    sum_c = tl.zeros([BLOCK_V], dtype=tl.float32)
    target = tl.zeros([BLOCK_V], dtype=tl.float32)
    weight_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        col = start + tl.arange(0, BLOCK_V)
        mask = col < vocab
        c = _softcapped(tl.load(z_row + col, mask=mask, other=0.0), softcap, HAS_SOFTCAP)
        c = tl.where(mask, c, float("-inf"))
        new_max = tl.maximum(running_max, c)
        # running_sum is relative to the lane's shift: its max, or 0 where that is +-inf (a lane that has seen
        # only masked columns stays at max -inf, sum 0; one that has seen +inf at sum +inf), never inf - inf
        shift = tl.where(tl.abs(new_max) == float("inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.exp(c - shift)
        running_max = new_max
        if HAS_CLASS_WEIGHT:
            w = tl.load(class_weight_ptr + col, mask=mask, other=0.0)
            sum_c += tl.where(mask, w * c, 0.0)
            weight_sum += w
        else:
            sum_c += tl.where(mask, c, 0.0)
        target += tl.where(col == label, c, 0.0)
    row_max = tl.max(running_max, axis=0)
    row_shift = tl.where(tl.abs(row_max) == float("inf"), 0.0, row_max)
    row_lse = row_shift + tl.log(tl.sum(running_sum * tl.exp(running_max - row_shift), axis=0))
    tl.store(lse_ptr + row, row_lse)
    c_target = tl.sum(target, axis=0)
    if HAS_CLASS_WEIGHT:
        w_sum = tl.sum(weight_sum, axis=0)
        label_weight = tl.load(class_weight_ptr + label, mask=in_range & ~ignored, other=1.0)
        loss = (1.0 - smoothing) * label_weight * (row_lse - c_target)
        loss += tl.where(smoothing != 0.0, smoothing / vocab * (w_sum * row_lse - tl.sum(sum_c, axis=0)), 0.0)
    else:
        loss = row_lse - (1.0 - smoothing) * c_target
        loss -= tl.where(smoothing != 0.0, smoothing / vocab * tl.sum(sum_c, axis=0), 0.0)
    loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    tl.store(loss_ptr + row, loss)
    if HAS_GRAD:
        g = tl.load(grad_weights_ptr + row)
        g = tl.where(ignored, 0.0, tl.where(in_range, g, float("nan")))
        g_target = g * (1.0 - smoothing)
        if HAS_CLASS_WEIGHT:
            g_target = g_target * label_weight
            p_scale = g * ((1.0 - smoothing) * label_weight + smoothing / vocab * w_sum)
        else:
            p_scale = g
        if HAS_Z:
            p_scale += tl.where(ignored, 0.0, tl.load(z_grad_weights_ptr + row) * row_lse)
        for start in range(0, vocab, BLOCK_V):
            col = start + tl.arange(0, BLOCK_V)
            mask = col < vocab
            z = tl.load(z_row + col, mask=mask, other=0.0)
            c = _softcapped(z, softcap, HAS_SOFTCAP)
            if HAS_CLASS_WEIGHT:
                smooth = g * smoothing / vocab * tl.load(class_weight_ptr + col, mask=mask, other=0.0)
            else:
                smooth = g * smoothing / vocab
            dz = p_scale * tl.exp(c - row_lse) - smooth - tl.where(col == label, g_target, 0.0)
            if HAS_SOFTCAP:
                t = c / softcap
                dz = dz * (1.0 - t * t)
            tl.store(z_row + col, dz, mask=mask)


def flce_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad_weights: torch.Tensor | None,
    z_grad_weights: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    loss: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
) -> None:
    """The row pass on logits [rows, V] (fp32, contiguous, rows >= 1): fills loss and lse (fp32 [rows]);
    with grad_weights (fp32 [rows]) overwrites logits with dz (with the z-loss term when z_grad_weights, fp32
    [rows], is given), else leaves them as they are. class_weight: fp32 [V] or None."""
    rows, vocab = logits.shape
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    has_grad = grad_weights is not None
    has_z = has_grad and z_grad_weights is not None
    _rows_kernel[(rows,)](
        logits,
        labels,
        grad_weights if has_grad else loss,
        z_grad_weights if has_z else loss,
        loss if class_weight is None else class_weight,
        loss,
        lse,
        vocab,
        ignore_index,
        float(label_smoothing),
        float(softcap),
        HAS_SOFTCAP=softcap > 0,
        HAS_GRAD=has_grad,
        HAS_Z=has_z,
        HAS_CLASS_WEIGHT=class_weight is not None,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
