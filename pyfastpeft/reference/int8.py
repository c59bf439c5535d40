"""LLM.int8 reference kernels in PyTorch: the oracle of the tests and the fallback on every device.

Vector-wise quantization of x [M, K] (x is flattened to 2-D over its leading dims), in fp32:
    outlier column k  <=>  threshold > 0 and some |x[m, k]| >= threshold
    row_stats[m] = max |x[m, k]| over the elements with |x[m, k]| < threshold (all of them when
                   threshold == 0)                                                        fp32 [M]
    q[m, k]      = round_half_even(x[m, k] * (127 / row_stats[m]))   int8, the product in fp32 in that order,
                   where 127 / row_stats is torch's `scalar / tensor`: reciprocal, then times 127 (two roundings;
                   bitsandbytes writes it so, and a single correctly rounded division moves some ties)
                   0 where column k is an outlier column (bitsandbytes zeroes the outlier elements; with
                   more than one row it zeroes their whole columns; with one row those coincide)
Column-wise (bitsandbytes' int8_double_quant column half; its order: x * 127 first, then the division):
    col_stats[k] = max |x[m, k]| over m, outlier elements excluded                       fp32 [K]
    q[m, k]      = round_half_even((x[m, k] * 127) / col_stats[k]), 0 at outlier elements
Edge cases, where bitsandbytes produces NaN codes: a stat of 0 (a row or column of zeros) gives codes 0;
a non-finite product (inf or NaN in x) gives code 0, while the stat keeps the inf / NaN (max propagates
NaN), so the dequantized row or the matmul output of that row is non-finite, visibly.

Matmul epilogue (bitsandbytes' int8_mm_dequant, whose constant 6.200124e-05 is 1/127^2 = 6.2000124e-05 with a
digit dropped, 1.8e-5 too large; we use the float32 nearest 1/127^2):
    out[m, n] = float(C[m, n]) * (row_stats[m] * col_stats[n]) * (1 / 127^2) (+ addend[m, n]) (+ bias[n])
in fp32, cast once to the output dtype (bf16 output never passes through fp16).

LLM.int8 linear, x [M, K], weight codes W [N, K] with stats SCB [N] (the weight quantized row-wise):
    out = epilogue(q(x) @ W^T)  +  x[:, outliers] @ (W[:, outliers] * SCB / 127)^T
and its input gradient dX = dY @ (W * SCB[:, None] / 127).
"""

from __future__ import annotations

import torch

# 1/127^2 rounded once to fp32 (as the native kernels hold it), and bitsandbytes' 1/127 of int8_vectorwise_dequant.
MM_DEQUANT_SCALE = float(torch.tensor(1.0 / 16129.0, dtype=torch.float32))
DEQUANT_SCALE = 7.874015718698502e-3


def _codes(scaled: torch.Tensor) -> torch.Tensor:
    """round_half_even of fp32 values in [-127, 127] to int8; non-finite values (0 * inf, x / 0) -> 0."""
    scaled = torch.where(torch.isfinite(scaled), scaled, torch.zeros((), dtype=scaled.dtype, device=scaled.device))
    return torch.round(scaled).clamp_(-127, 127).to(torch.int8)


def outlier_mask(x2d: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [M, K]: |x| >= threshold in fp32 (all False when threshold <= 0), as the kernels and bitsandbytes' CUDA
    kernel compare. In x's own dtype a bf16 or fp16 x would meet the threshold rounded to that dtype (6.01 is 6.0 in
    bf16) and count 6.0 as an outlier where they do not."""
    if threshold <= 0:
        return torch.zeros(x2d.shape, dtype=torch.bool, device=x2d.device)
    return x2d.float().abs() >= threshold


def _masked_abs(x2d: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    return x2d.float().abs().masked_fill(outliers, 0.0)


def _nan_max(t: torch.Tensor, dim: int) -> torch.Tensor:
    """amax over `dim` of an fp32 tensor that may be empty along it (max of nothing = 0)."""
    if t.shape[dim] == 0:
        shape = list(t.shape)
        del shape[dim]
        return torch.zeros(shape, dtype=torch.float32, device=t.device)
    return t.amax(dim=dim)


def vectorwise_quant(x2d: torch.Tensor, threshold: float):
    """Row-wise quantization of x [M, K] -> (q int8 [M, K], row_stats fp32 [M], outlier_cols int64 [n_outliers])."""
    outliers = outlier_mask(x2d, threshold)
    outlier_cols = outliers.any(dim=0).nonzero().view(-1)
    row_stats = _nan_max(_masked_abs(x2d, outliers), 1)
    scale = 127.0 / row_stats  # torch: row_stats.reciprocal() * 127.0, exactly as bitsandbytes runs it
    q = _codes(x2d.float() * scale[:, None])
    q[:, outlier_cols] = 0
    return q, row_stats, outlier_cols


def colwise_quant(x2d: torch.Tensor, threshold: float):
    """Column-wise quantization of x [M, K] -> (q int8 [M, K], col_stats fp32 [K], outlier_cols int64)."""
    outliers = outlier_mask(x2d, threshold)
    outlier_cols = outliers.any(dim=0).nonzero().view(-1)
    col_stats = _nan_max(_masked_abs(x2d, outliers), 0)
    q = _codes((x2d.float() * 127.0) / col_stats[None, :])
    q.masked_fill_(outliers, 0)
    return q, col_stats, outlier_cols


def vectorwise_dequant(q: torch.Tensor, stats: torch.Tensor, axis: int) -> torch.Tensor:
    """q [M, K] int8 with one stat per row (axis 0) or per column (axis 1) -> fp32 q * stat / 127."""
    stats = stats.float()
    return q.float() * (stats[:, None] if axis == 0 else stats[None, :]) * DEQUANT_SCALE


def mm_dequant(c: torch.Tensor, row_stats, col_stats, bias, addend, dtype: torch.dtype) -> torch.Tensor:
    """The int8 matmul epilogue above: c int32 [M, N]; bias [N] and addend fp32 [M, N] may be None."""
    out = c.float() * (row_stats.float()[:, None] * col_stats.float()[None, :]) * MM_DEQUANT_SCALE
    if addend is not None:
        out = out + addend.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 [M, K] @ b int8 [N, K]^T -> int32 [M, N], exact: every partial sum is an integer below 2^53,
    so fp64 (which every device multiplies, unlike int64) holds it exactly."""
    return (a.double() @ b.double().t()).to(torch.int32)


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the outlier columns are multiplied in: x's own; fp16 runs in fp32 (slow fp16 GEMMs on CPU)."""
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32


def outlier_product(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    weight_stats: torch.Tensor,
    outlier_cols: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 [M, N]: x[:, outliers] @ (W[:, outliers] * SCB / 127)^T in the compute dtype of x (into `out`, an
    fp32 [M, N] tensor, when given and the compute dtype is fp32)."""
    compute = matmul_dtype(x2d.dtype)
    sub_x = x2d[:, outlier_cols].to(compute)
    sub_w = vectorwise_dequant(weight[:, outlier_cols], weight_stats, 0).to(compute)
    if out is not None and compute == torch.float32:
        return torch.mm(sub_x, sub_w.t(), out=out)
    return (sub_x @ sub_w.t()).float()


def int8_linear(x, weight, weight_stats, bias, threshold: float):
    """LLM.int8 product of x [..., K] with int8 weight codes [N, K] and their row stats [N]; bias may be None."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x.dtype == torch.float64:  # the gradcheck path: the same product without rounding x to int8
        out = x2d @ dequantize_weight(weight, weight_stats, torch.float64).t()
        if bias is not None:
            out = out + bias
        return out.view(*lead, weight.shape[0])
    q, row_stats, outlier_cols = vectorwise_quant(x2d, threshold)
    addend = outlier_product(x2d, weight, weight_stats, outlier_cols) if outlier_cols.numel() else None
    out = mm_dequant(int8_matmul(q, weight), row_stats, weight_stats, bias, addend, x.dtype)
    return out.view(*lead, weight.shape[0])


def dequantize_weight(weight: torch.Tensor, weight_stats: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] = codes * SCB[:, None] / 127 in dtype (computed in fp32, fp64 for fp64)."""
    if dtype == torch.float64:
        return weight.double() * weight_stats.double()[:, None] / 127.0
    return vectorwise_dequant(weight, weight_stats, 0).to(dtype)


def int8_linear_grad_input(dy, weight, weight_stats):
    """dX [..., K] = dY [..., N] @ (W * SCB / 127) in dY's compute dtype (no dW: the int8 weight is frozen)."""
    compute = matmul_dtype(dy.dtype)
    dx = dy.reshape(-1, weight.shape[0]).to(compute) @ dequantize_weight(weight, weight_stats, compute)
    return dx.to(dy.dtype).view(*dy.shape[:-1], weight.shape[1])
