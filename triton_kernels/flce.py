"""Fused linear cross-entropy in Triton: the row pass over one chunk of fp32 logits (Liger-Kernel's
design; the matmuls around it are torch's, driven by pyfastpeft/ops/flce.py).

One row of V logits z, label y, smoothing eps, softcap s (0: none), gradient weight g:
  c_v  = s * tanh(z_v / s)                        (c = z without softcap)
  lse  = m + log(sum_v exp(c_v - m)),  m = max_v c_v       (online over BLOCK_V-column blocks)
         with m replaced by 0 where it is +-inf (torch.logsumexp's shift: a +inf logit gives lse +inf and
         a row of -inf gives -inf, not the NaN of inf - inf)
  loss = lse - (1 - eps) * c_y - (eps / V) * sum_v c_v      (0 where y == ignore_index; the last term
         only when eps > 0, so a -inf logit leaves the loss finite)
  dz_v = g * (exp(c_v - lse) - eps / V - (1 - eps) * [v == y]) * (1 - (c_v / s)^2)
One program per row, two sweeps: the first reads z for lse, c_y and sum c; the second reads z again
and overwrites it with dz (each element is read before it is written, by the thread that writes it).
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
# grad_weights, loss, lse: fp32 [rows]. A label outside [0, V) other than ignore_index gives a NaN row.
@triton.jit
def _rows_kernel(
    logits_ptr,
    labels_ptr,
    grad_weights_ptr,
    loss_ptr,
    lse_ptr,
    vocab,
    ignore_index,
    smoothing,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD: tl.constexpr,
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
        sum_c += tl.where(mask, c, 0.0)
        target += tl.where(col == label, c, 0.0)
    row_max = tl.max(running_max, axis=0)
    row_shift = tl.where(tl.abs(row_max) == float("inf"), 0.0, row_max)
    row_lse = row_shift + tl.log(tl.sum(running_sum * tl.exp(running_max - row_shift), axis=0))
    tl.store(lse_ptr + row, row_lse)
    loss = row_lse - (1.0 - smoothing) * tl.sum(target, axis=0)
    loss -= tl.where(smoothing != 0.0, smoothing / vocab * tl.sum(sum_c, axis=0), 0.0)
    loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    tl.store(loss_ptr + row, loss)
    if HAS_GRAD:
        g = tl.load(grad_weights_ptr + row)
        g = tl.where(ignored, 0.0, tl.where(in_range, g, float("nan")))
        for start in range(0, vocab, BLOCK_V):
            col = start + tl.arange(0, BLOCK_V)
            mask = col < vocab
            z = tl.load(z_row + col, mask=mask, other=0.0)
            c = _softcapped(z, softcap, HAS_SOFTCAP)
            dz = g * (tl.exp(c - row_lse) - smoothing / vocab - tl.where(col == label, 1.0 - smoothing, 0.0))
            if HAS_SOFTCAP:
                t = c / softcap
                dz = dz * (1.0 - t * t)
            tl.store(z_row + col, dz, mask=mask)


def flce_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad_weights: torch.Tensor | None,
    loss: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
) -> None:
    """The row pass on logits [rows, V] (fp32, contiguous, rows >= 1): fills loss and lse (fp32 [rows]);
    with grad_weights (fp32 [rows]) overwrites logits with dz, else leaves them as they are."""
    rows, vocab = logits.shape
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    has_grad = grad_weights is not None
    _rows_kernel[(rows,)](
        logits,
        labels,
        grad_weights if has_grad else loss,
        loss,
        lse,
        vocab,
        ignore_index,
        float(label_smoothing),
        float(softcap),
        HAS_SOFTCAP=softcap > 0,
        HAS_GRAD=has_grad,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
