"""Affine quantize benchmark cases: absmax int8 codes of x [rows, hidden], one scale per row or per tensor."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from pyfastpeft.bench.cases._common import HIDDEN, tensor_bytes
from pyfastpeft.bench.harness import Case, Goal, Implementation, KernelCall, Workload
from pyfastpeft.ops import quantize as quantize_ops

QUANTIZE_ROWS = {False: 4096, True: 1024}
QUANTIZE_GRANULARITIES = {"per row": 0, "per tensor": -1}  # name -> the ops' axis argument


def _quantize_kernel(rows: int, axis: int, dtype, device) -> KernelCall:
    """Reads x; writes int8 codes and fp32 scales (one per row, or one)."""
    x = torch.randn(rows, HIDDEN, dtype=dtype, device=device)
    codes = torch.empty(rows, HIDDEN, dtype=torch.int8, device=device)
    scale = torch.empty(rows if axis == 0 else (), dtype=torch.float32, device=device)
    return KernelCall(
        lambda: quantize_ops.quantize_into(x, codes, scale, None, 8, False, axis, 0), tensor_bytes(x, codes, scale)
    )


def _quantize_workload(rows: int, axis: int, dtype: torch.dtype, device: torch.device) -> Workload:
    """Ours: pyfastpeft.quant.quantize. Reference: the same formulas in eager PyTorch (reference/quantize.py)."""
    from pyfastpeft.quant import quantize
    from pyfastpeft.reference import quantize as quantize_reference

    x = torch.randn(rows, HIDDEN, dtype=dtype, device=device)
    public_axis = None if axis < 0 else axis
    return Workload(
        ours=Implementation(lambda: quantize(x, 8, "absmax", axis=public_axis), ()),
        reference=Implementation(lambda: quantize_reference.quantize_affine(x, 8, False, axis, 0), ()),
        # the native kernel is the CPU module's; on CUDA tensors the op runs the reference (no CUDA kernel yet)
        kernels={"forward": functools.partial(_quantize_kernel, rows, axis, dtype, device)}
        if device.type == "cpu"
        else {},
    )


def quantize_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    rows = QUANTIZE_ROWS[quick]
    return [
        Case(
            "quantize",
            f"{rows}x{HIDDEN} {name}",
            dtype,
            "forward",
            "eager PyTorch reference (same formulas)",
            functools.partial(_quantize_workload, rows, axis, dtype),
            goals=(Goal("copy", 0.6),),
            headline=not quick,
        )
        for name, axis in QUANTIZE_GRANULARITIES.items()
        for dtype in dtypes
    ]
