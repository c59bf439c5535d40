"""NF4 benchmark cases: y = x @ dequant(W)^T for a [N, K] weight in NF4 (blocksize 64, double quant)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

import pyfastpeft
from pyfastpeft.bench.cases._common import HIDDEN, INTERMEDIATE, tensor_bytes
from pyfastpeft.bench.harness import MODES, Case, Goal, Implementation, KernelCall, Workload
from pyfastpeft.ops import nf4 as nf4_ops

NF4_WEIGHTS = {False: ((HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN)), True: ((HIDDEN, HIDDEN),)}
NF4_ROWS = {False: (1, 512), True: (1, 128)}  # decode (fused GEMV) and prefill/training (tiled GEMM)
NF4_BLOCKSIZE = 64


def _nf4_weight(out_features: int, in_features: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, de-nested absmax, code) of a random [out_features, in_features] weight in NF4."""
    from pyfastpeft.quant import quantize_nf4

    packed, state = quantize_nf4(torch.randn(out_features, in_features, device=device) * 0.02, NF4_BLOCKSIZE, True)
    return packed, state.dequantized_absmax(), state.code.float()


def _nf4_kernel(rows: int, out_features: int, in_features: int, dtype, device, backward: bool) -> KernelCall:
    """forward: the fused dequant-GEMV (rows <= 8) or the tiled GEMM into preallocated out; backward:
    dX = dY @ dequant(W). Reads packed W, absmax and the activation; writes the result."""
    packed, absmax, code = _nf4_weight(out_features, in_features, device)
    if backward:
        dy = torch.randn(rows, out_features, dtype=dtype, device=device)
        call = lambda: nf4_ops.nf4_linear_grad_input(
            dy,
            packed,
            absmax,
            code,
            NF4_BLOCKSIZE,  # noqa: E731
            out_features,
            in_features,
        )
        return KernelCall(call, tensor_bytes(packed, absmax, dy) + rows * in_features * dy.element_size())
    x = torch.randn(rows, in_features, dtype=dtype, device=device)
    out = torch.empty(rows, out_features, dtype=dtype, device=device)
    if rows <= nf4_ops.GEMV_MAX_ROWS:
        call = lambda: nf4_ops.gemv_into(x, packed, absmax, code, None, out, NF4_BLOCKSIZE)  # noqa: E731
    else:
        call = lambda: nf4_ops.nf4_linear_op(
            x,
            packed,
            absmax,
            code,
            None,
            NF4_BLOCKSIZE,  # noqa: E731
            out_features,
            in_features,
        )
    return KernelCall(call, tensor_bytes(packed, absmax, x, out))


def _nf4_workload(rows: int, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> Workload:
    """Ours: pyfastpeft Linear4bit. Reference: the same quantized weight the way bitsandbytes runs it on
    CPU: dequantized to x's dtype in PyTorch, then F.linear (autograd gives dX = dY @ W)."""
    from pyfastpeft.reference import nf4 as nf4_reference

    linear = torch.nn.Linear(in_features, out_features, bias=False, device=device)
    layer = pyfastpeft.nn.Linear4bit.from_linear(linear, compute_dtype=dtype)
    x = torch.randn(rows, in_features, dtype=dtype, device=device, requires_grad=True)
    state = layer.quant_state

    def reference():
        weight = nf4_reference.dequantize_4bit(
            layer.weight, state.dequantized_absmax(), state.code, state.blocksize, out_features * in_features, dtype
        )
        return torch.nn.functional.linear(x, weight.view(out_features, in_features))

    return Workload(
        ours=Implementation(lambda: layer(x), (x,)),
        reference=Implementation(reference, (x,)),
        kernels={
            "forward": functools.partial(_nf4_kernel, rows, out_features, in_features, dtype, device, False),
            "backward": functools.partial(_nf4_kernel, rows, out_features, in_features, dtype, device, True),
        },
    )


def _nf4_dequantize_kernel(out_features: int, in_features: int, dtype, device) -> KernelCall:
    """Reads packed W and absmax; writes W [out_features * in_features] in dtype."""
    packed, absmax, code = _nf4_weight(out_features, in_features, device)
    out = torch.empty(out_features * in_features, dtype=dtype, device=device)
    return KernelCall(
        lambda: nf4_ops.dequantize_all_into(packed, absmax, code, out, NF4_BLOCKSIZE), tensor_bytes(packed, absmax, out)
    )


def _nf4_dequantize_workload(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> Workload:
    """Dequantize alone (what a GEMM above the fused sizes pays first). Ours: the nf4_dequantize op;
    reference: the PyTorch reference dequantize."""
    from pyfastpeft.reference import nf4 as nf4_reference

    packed, absmax, code = _nf4_weight(out_features, in_features, device)
    numel = out_features * in_features
    return Workload(
        ours=Implementation(lambda: nf4_ops.nf4_dequantize(packed, absmax, code, NF4_BLOCKSIZE, numel, dtype), ()),
        reference=Implementation(
            lambda: nf4_reference.dequantize_4bit(packed, absmax, code, NF4_BLOCKSIZE, numel, dtype), ()
        ),
        kernels={"forward": functools.partial(_nf4_dequantize_kernel, out_features, in_features, dtype, device)},
    )


def _nf4_dense_workload(rows: int, out_features: int, in_features: int, dtype: torch.dtype, device) -> Workload:
    """Ours: Linear4bit computing in `dtype` (forward). Reference: the dense bf16 layer the NF4 one replaces,
    F.linear on bf16 activations and the bf16 weight, the baseline a user weighs quantization against."""
    linear = torch.nn.Linear(in_features, out_features, bias=False, device=device)
    layer = pyfastpeft.nn.Linear4bit.from_linear(linear, compute_dtype=dtype)
    dense = linear.weight.detach().to(torch.bfloat16)
    x = torch.randn(rows, in_features, dtype=dtype, device=device)
    x_dense = x.to(torch.bfloat16)
    return Workload(
        ours=Implementation(lambda: layer(x), ()),
        reference=Implementation(lambda: torch.nn.functional.linear(x_dense, dense), ()),
        kernels={"forward": functools.partial(_nf4_kernel, rows, out_features, in_features, dtype, device, False)},
    )


def nf4_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    """Dequantize alone; the linear against the dequantize + matmul reference; the linear forward against a dense
    bf16 layer. Goals (this CPU): dequantize at >= 60% of copy bandwidth; the GEMV (M=1) at >= 70% of copy and
    >= 2.5x a dense bf16 layer (fp32 or bf16 activations); M=512 with bf16 activations within 1.2x the dense time."""
    headline_weight = (HIDDEN, HIDDEN)
    cases = []
    for out_features, in_features in NF4_WEIGHTS[quick]:
        cases += [
            Case(
                "nf4",
                f"dequantize {out_features}x{in_features}",
                dtype,
                "forward",
                "PyTorch reference dequantize",
                functools.partial(_nf4_dequantize_workload, out_features, in_features, dtype),
                goals=(Goal("copy", 0.6),),
                headline=not quick and (out_features, in_features) == headline_weight,
            )
            for dtype in dtypes
        ]
    for out_features, in_features in NF4_WEIGHTS[quick]:
        for rows in NF4_ROWS[quick]:
            modes = ("forward",) if rows == 1 else MODES  # decode has no backward
            cases += [
                Case(
                    "nf4",
                    f"M={rows} {out_features}x{in_features}",
                    dtype,
                    mode,
                    "dequantize + torch matmul (bitsandbytes' CPU path)",
                    functools.partial(_nf4_workload, rows, out_features, in_features, dtype),
                    goals=(Goal("copy", 0.7),) if rows == 1 else (),
                    # headline: decode at 4096^2 and the README's 11008x4096 training row
                    headline=not quick
                    and (rows == 1 if (out_features, in_features) == headline_weight else mode == "both")
                    and (rows == 1 or dtype == torch.bfloat16),
                )
                for dtype in dtypes
                for mode in modes
            ]
    for out_features, in_features in NF4_WEIGHTS[quick]:
        for rows in NF4_ROWS[quick]:
            cases += [
                Case(
                    "nf4",
                    f"M={rows} {out_features}x{in_features} vs dense bf16",
                    dtype,
                    "forward",
                    "dense bf16 F.linear (bf16 activations and weight)",
                    functools.partial(_nf4_dense_workload, rows, out_features, in_features, dtype),
                    goals=(Goal("speedup", 2.5), Goal("copy", 0.7)) if rows == 1 else (Goal("time", 1.2),),
                    headline=not quick and (out_features, in_features) == headline_weight,
                )
                for dtype in dtypes
                if rows == 1 or dtype == torch.bfloat16
            ]
    return cases
