"""LLM.int8 benchmark cases: x [M, K] @ int8 W [N, K]^T with outlier columns; vector-wise quantization."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import pyfastpeft
from pyfastpeft.bench.cases._common import HIDDEN, INTERMEDIATE, tensor_bytes
from pyfastpeft.bench.harness import Case, Goal, Implementation, KernelCall, Workload
from pyfastpeft.ops import int8 as int8_ops

INT8_WEIGHTS = {False: ((HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN)), True: ((HIDDEN, HIDDEN),)}
INT8_ROWS = {False: (1, 512), True: (1, 128)}
INT8_OUTLIERS = {False: (0.0, 0.001, 0.01), True: (0.001,)}  # fraction of x's columns holding outliers
INT8_THRESHOLD = 6.0


def _int8_inputs(rows: int, out_features: int, in_features: int, outlier_fraction: float, dtype, device):
    """x with round(fraction * K) outlier columns (each holding |x| >= 8 in row 0, N(0, 8^2) elsewhere),
    the int8 weight codes and SCB of a N(0, 0.02^2) weight."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=generator)
    columns = torch.randperm(in_features, generator=generator)[: round(outlier_fraction * in_features)]
    x[:, columns] *= 8.0
    x[0, columns] = 8.0
    from pyfastpeft.quant import quantize_int8_weight

    codes, scb = quantize_int8_weight(torch.randn(out_features, in_features, generator=generator) * 0.02)
    return x.to(device=device, dtype=dtype), codes.to(device), scb.to(device)


def eager_int8_linear(x, codes, scb, threshold: float):
    """LLM.int8 as a user writes it in eager PyTorch around torch._int_mm (bitsandbytes' default backend
    with its fp32 matmul swapped for the int8 one): quantize, int8 GEMM, dequantize, add the outlier product."""
    xf = x.float()
    outliers = xf.abs() >= threshold
    columns = outliers.any(0).nonzero().view(-1)
    row_stats = xf.abs().masked_fill(outliers, 0).amax(1)
    q = torch.round(xf * (127.0 / row_stats)[:, None])
    q[:, columns] = 0
    q = q.to(torch.int8)
    if q.is_cuda and q.shape[0] <= 16:  # cuBLASLt's int8 GEMM takes M > 16: decode pads its rows
        q = torch.nn.functional.pad(q, (0, 0, 0, 17 - q.shape[0]))
    products = torch._int_mm(q, codes.t())[: x.shape[0]]
    out = products.float() * (row_stats[:, None] * scb[None, :]) * (1 / 16129)
    if columns.numel():
        weight = (codes[:, columns].float() * scb[:, None] / 127).to(x.dtype)
        out += (x[:, columns] @ weight.t()).float()
    return out.to(x.dtype)


def _int8_kernel(
    rows: int, out_features: int, in_features: int, outlier_fraction: float, dtype, device, backward: bool
) -> KernelCall:
    """forward: int8_linear (quantize x, int8 GEMV/GEMM, epilogue, outlier product); backward: dX = dY @ W."""
    x, codes, scb = _int8_inputs(rows, out_features, in_features, outlier_fraction, dtype, device)
    if backward:
        dy = torch.randn(rows, out_features, dtype=dtype, device=device)
        return KernelCall(lambda: int8_ops.int8_linear_grad_input(dy, codes, scb), tensor_bytes(codes, scb, dy, x))
    bias = None
    return KernelCall(
        lambda: int8_ops.int8_linear_op(x, codes, scb, bias, INT8_THRESHOLD),
        tensor_bytes(x, codes, scb) + rows * out_features * x.element_size(),
        graphable=INT8_THRESHOLD <= 0,  # with a threshold, the outlier columns' count is read on the host
    )


def _int8_workload(
    rows: int,
    out_features: int,
    in_features: int,
    outlier_fraction: float,
    reference: str,
    dtype: torch.dtype,
    device: torch.device,
) -> Workload:
    """Ours: pyfastpeft's int8_linear. Reference "eager": eager_int8_linear above; "dense bf16" / "dense fp32":
    F.linear with the dequantized weight and the activations in that dtype (the dense layer int8 replaces)."""
    x, codes, scb = _int8_inputs(rows, out_features, in_features, outlier_fraction, dtype, device)
    x.requires_grad_(True)
    if reference == "eager":
        reference_x = x
        reference_fn = functools.partial(eager_int8_linear, x, codes, scb, INT8_THRESHOLD)
    else:
        dense_dtype = {"dense bf16": torch.bfloat16, "dense fp32": torch.float32}[reference]
        reference_x = x.detach().to(dense_dtype).requires_grad_(True)
        dense = (codes.float() * scb[:, None] / 127).to(dense_dtype)
        reference_fn = functools.partial(F.linear, reference_x, dense)
    return Workload(
        ours=Implementation(lambda: pyfastpeft.functional.int8_linear(x, codes, scb, threshold=INT8_THRESHOLD), (x,)),
        reference=Implementation(reference_fn, (reference_x,)),
        kernels={
            "forward": functools.partial(
                _int8_kernel, rows, out_features, in_features, outlier_fraction, dtype, device, False
            ),
            "backward": functools.partial(
                _int8_kernel, rows, out_features, in_features, outlier_fraction, dtype, device, True
            ),
        },
    )


def _int8_quant_kernel(rows: int, in_features: int, dtype, device) -> KernelCall:
    x, _, _ = _int8_inputs(rows, 1, in_features, 0.001, dtype, device)
    q = torch.empty(x.shape, dtype=torch.int8, device=device)
    stats = torch.empty(rows, dtype=torch.float32, device=device)
    return KernelCall(lambda: int8_ops.quantize_into(x, q, stats, 0, INT8_THRESHOLD), tensor_bytes(x, q, stats))


def _int8_quant_workload(rows: int, in_features: int, dtype: torch.dtype, device: torch.device) -> Workload:
    """Ours: int8_vectorwise_quant (row-wise, outliers at 6.0). Reference: the same function on the
    reference backend (bitsandbytes' pure-PyTorch formula)."""
    from pyfastpeft.quant import int8_vectorwise_quant

    x, _, _ = _int8_inputs(rows, 1, in_features, 0.001, dtype, device)
    quantize = functools.partial(int8_vectorwise_quant, x, INT8_THRESHOLD)

    def reference():
        with pyfastpeft.use_backend("reference"):  # the harness runs the reference side on the auto backend
            return quantize()

    return Workload(
        ours=Implementation(quantize, ()),
        reference=Implementation(reference, ()),
        kernels={"forward": functools.partial(_int8_quant_kernel, rows, in_features, dtype, device)},
    )


INT8_REFERENCES = {
    "eager": ("", "eager LLM.int8 around torch._int_mm", 1.2),
    "dense bf16": (" vs dense bf16", "dense bf16 F.linear (bf16 activations and weight)", 1.2),
    "dense fp32": (" vs dense fp32", "dense fp32 F.linear", 1.5),
}  # reference -> (shape suffix, name, the speedup goal at M > 1 with outliers on this CPU)


def int8_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    """Against eager LLM.int8, a dense bf16 layer (both activation dtypes) and a dense fp32 one (fp32 activations);
    the quantization kernel at >= 60% of copy bandwidth. Headline: M=512 and M=1 at 4096^2 with 0.1% outliers."""
    cases = []
    for out_features, in_features in INT8_WEIGHTS[quick]:
        for rows in INT8_ROWS[quick]:
            for fraction in INT8_OUTLIERS[quick]:
                shape = f"M={rows} {out_features}x{in_features} outliers={fraction:.1%}"
                for reference, (suffix, name, speedup) in INT8_REFERENCES.items():
                    modes = ("forward", "both") if reference != "eager" and rows > 1 and fraction else ("forward",)
                    goals = (Goal("speedup", speedup),) if rows > 1 and fraction else ()
                    headline = not quick and out_features == in_features and fraction == 0.001
                    cases += [
                        Case(
                            "int8",
                            shape + suffix,
                            dtype,
                            mode,
                            name,
                            functools.partial(
                                _int8_workload, rows, out_features, in_features, fraction, reference, dtype
                            ),
                            goals=goals,
                            headline=headline and mode == "forward" and (reference == "eager" or rows > 1),
                        )
                        for dtype in dtypes
                        for mode in modes
                        if reference != "dense fp32" or dtype == torch.float32
                    ]
    rows = INT8_ROWS[quick][-1] * (2 if quick else 8)
    cases += [
        Case(
            "int8",
            f"quantize M={rows} K={HIDDEN}",
            dtype,
            "forward",
            "PyTorch formula (bitsandbytes' default)",
            functools.partial(_int8_quant_workload, rows, HIDDEN, dtype),
            goals=(Goal("copy", 0.6),),
            headline=not quick,
        )
        for dtype in dtypes
    ]
    return cases
