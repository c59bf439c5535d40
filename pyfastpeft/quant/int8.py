"""Vector-wise int8 quantization (LLM.int8's storage): the public functions over the pyfastpeft::int8_* ops.

Same codes and stats as bitsandbytes' functions of the same names; the formulas and edge cases are in
pyfastpeft/reference/int8.py. Where bitsandbytes returns NaN codes (a row of zeros) ours are 0, and the
epilogue writes bf16 without passing through fp16.
"""

from __future__ import annotations

import math

import torch

from pyfastpeft.ops import int8 as ops
from pyfastpeft.ops._checks import check_tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_threshold(fn: str, threshold) -> float:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold) or threshold < 0:
        raise ValueError(f"{fn}: threshold must be a number >= 0, got {threshold!r}")
    return float(threshold)


def _check_input(fn: str, x) -> None:
    check_tensor(fn, "x", x, dtypes=_FLOATS, min_dim=1)


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 0.0):
    """Row-wise absmax int8 quantization of x [..., K] (one stat per row of the flattened [M, K]).

    Returns (q int8 shaped like x, row_stats fp32 [M], outlier_cols): outlier_cols is None when threshold is
    0, else the sorted int64 indices of the columns holding any |x| >= threshold (possibly empty); those
    columns are 0 in q and excluded from row_stats.
    """
    fn = "int8_vectorwise_quant"
    _check_input(fn, x)
    threshold = _check_threshold(fn, threshold)
    q, row_stats, outlier_cols = ops.int8_vectorwise_quant_op(x, threshold)
    return q, row_stats, (outlier_cols if threshold > 0 else None)


def int8_colwise_quant(x: torch.Tensor, threshold: float = 0.0):
    """Column-wise absmax int8 quantization of x [..., K] -> (q int8, col_stats fp32 [K], outlier_cols or None).
    Outlier elements (|x| >= threshold) are 0 in q and excluded from col_stats."""
    fn = "int8_colwise_quant"
    _check_input(fn, x)
    threshold = _check_threshold(fn, threshold)
    q, col_stats, outlier_cols = ops.int8_colwise_quant_op(x, threshold)
    return q, col_stats, (outlier_cols if threshold > 0 else None)


def int8_double_quant(x: torch.Tensor, threshold: float = 0.0):
    """Row-wise and column-wise quantization of the same x (bitsandbytes' int8_double_quant):
    returns (q_row, q_col, row_stats, col_stats, outlier_cols or None)."""
    q_row, row_stats, outlier_cols = int8_vectorwise_quant(x, threshold)
    q_col, col_stats, _ = int8_colwise_quant(x, threshold)
    return q_row, q_col, row_stats, col_stats, outlier_cols


def int8_vectorwise_dequant(q: torch.Tensor, stats: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """fp32 q * stats / 127 with one stat per row (axis=0, q's leading dims flattened) or per column (axis=1)."""
    fn = "int8_vectorwise_dequant"
    check_tensor(fn, "q", q, dtypes=(torch.int8,), min_dim=1)
    check_tensor(fn, "stats", stats, dtypes=(torch.float32,), dim=1)
    if axis not in (0, 1):
        raise ValueError(f"{fn}: axis must be 0 (row stats) or 1 (column stats), got {axis!r}")
    q2d = q.reshape(-1, q.shape[-1])
    expected = q2d.shape[axis]
    if stats.shape[0] != expected:
        raise ValueError(
            f"{fn}: stats has {stats.shape[0]} elements, q has {expected} {'rows' if axis == 0 else 'columns'}"
        )
    return ops.int8_vectorwise_dequant_op(q2d, stats, axis).view(q.shape)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 product with int32 accumulation: a [M, K] @ b [N, K]^T -> int32 [M, N] (K <= 65536)."""
    fn = "int8_matmul"
    check_tensor(fn, "a", a, dtypes=(torch.int8,), dim=2)
    check_tensor(fn, "b", b, dtypes=(torch.int8,), dim=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn}: a has {a.shape[1]} columns, b has {b.shape[1]} (both are [rows, K])")
    if a.shape[1] > ops.MAX_IN_FEATURES:
        raise ValueError(f"{fn}: K is {a.shape[1]}, at most {ops.MAX_IN_FEATURES} keeps int32 accumulation exact")
    if a.device != b.device:
        raise ValueError(f"{fn}: b is on {b.device}, a is on {a.device}")
    return ops.int8_matmul_op(a, b)


def int8_mm_dequant(
    c: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """c int32 [M, N] * (row_stats [M] x col_stats [N]) / 127^2 + bias, computed in fp32 and written once in dtype."""
    fn = "int8_mm_dequant"
    check_tensor(fn, "c", c, dtypes=(torch.int32,), dim=2)
    check_tensor(fn, "row_stats", row_stats, dtypes=(torch.float32,), dim=1)
    check_tensor(fn, "col_stats", col_stats, dtypes=(torch.float32,), dim=1)
    if dtype not in _FLOATS:
        raise TypeError(f"{fn}: dtype must be a floating dtype, got {dtype}")
    if row_stats.shape[0] != c.shape[0] or col_stats.shape[0] != c.shape[1]:
        raise ValueError(
            f"{fn}: c is {tuple(c.shape)}, row_stats has {row_stats.shape[0]} and col_stats "
            f"{col_stats.shape[0]} elements"
        )
    if bias is not None:
        check_tensor(fn, "bias", bias, dim=1)
        if bias.shape[0] != c.shape[1]:
            raise ValueError(f"{fn}: bias has {bias.shape[0]} elements, c has {c.shape[1]} columns")
    return ops.int8_mm_dequant_op(c, row_stats, col_stats, bias, dtype)


def quantize_int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense weight [N, K] -> (codes int8 [N, K], SCB fp32 [N]): row-wise, no outliers (bitsandbytes' Int8Params)."""
    fn = "quantize_int8_weight"
    check_tensor(fn, "weight", weight, dtypes=_FLOATS, dim=2)
    q, stats, _ = ops.int8_vectorwise_quant_op(weight.detach(), 0.0)
    return q, stats
