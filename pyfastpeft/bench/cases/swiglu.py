"""SwiGLU benchmark cases: gate, up [tokens, intermediate]."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import pyfastpeft
from pyfastpeft.bench.cases._common import INTERMEDIATE, TOKENS, _one_case_per_mode, foundation_goals, tensor_bytes
from pyfastpeft.bench.harness import Case, Implementation, KernelCall, Workload
from pyfastpeft.ops import swiglu as swiglu_ops


def _swiglu_forward_kernel(tokens: int, dtype, device) -> KernelCall:
    """Reads gate, up; writes out."""
    gate = torch.randn(tokens, INTERMEDIATE, dtype=dtype, device=device)
    up, out = torch.randn_like(gate), torch.empty_like(gate)
    return KernelCall(lambda: swiglu_ops.forward_into(gate, up, out), tensor_bytes(gate, up, out))


def _swiglu_backward_kernel(tokens: int, dtype, device) -> KernelCall:
    """Reads dy, gate, up; writes dgate, dup."""
    gate = torch.randn(tokens, INTERMEDIATE, dtype=dtype, device=device)
    up, dy = torch.randn_like(gate), torch.randn_like(gate)
    dgate, dup = torch.empty_like(gate), torch.empty_like(gate)
    return KernelCall(
        lambda: swiglu_ops.backward_into(dy, gate, up, dgate, dup), tensor_bytes(dy, gate, up, dgate, dup)
    )


def _swiglu_workload(tokens: int, dtype: torch.dtype, device: torch.device) -> Workload:
    gate = torch.randn(tokens, INTERMEDIATE, dtype=dtype, device=device, requires_grad=True)
    up = torch.randn(tokens, INTERMEDIATE, dtype=dtype, device=device, requires_grad=True)
    return Workload(
        ours=Implementation(lambda: pyfastpeft.functional.swiglu(gate, up), (gate, up)),
        reference=Implementation(lambda: F.silu(gate) * up, (gate, up)),
        kernels={
            "forward": functools.partial(_swiglu_forward_kernel, tokens, dtype, device),
            "backward": functools.partial(_swiglu_backward_kernel, tokens, dtype, device),
        },
    )


def swiglu_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    tokens = TOKENS[quick]
    return _one_case_per_mode(
        "swiglu",
        f"T={tokens} N={INTERMEDIATE}",
        "eager F.silu(gate) * up",
        dtypes,
        functools.partial(_swiglu_workload, tokens),
        quick,
        foundation_goals(2.0),
    )
