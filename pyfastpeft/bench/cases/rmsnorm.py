"""RMSNorm benchmark cases: x [tokens, hidden], Llama's RMSNorm."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers.models.llama import modeling_llama

import pyfastpeft
from pyfastpeft.bench.cases._common import (
    HIDDEN,
    RMSNORM_EPS,
    TOKENS,
    _one_case_per_mode,
    foundation_goals,
    tensor_bytes,
)
from pyfastpeft.bench.harness import Case, Implementation, KernelCall, Workload
from pyfastpeft.ops import rmsnorm as rmsnorm_ops
from pyfastpeft.reference.rmsnorm import LLAMA


def _rmsnorm_forward_kernel(tokens: int, dtype, device) -> KernelCall:
    """Reads x, weight; writes y (x's dtype) and rstd (fp32 [tokens]). Llama casting, offset 0."""
    x = torch.randn(tokens, HIDDEN, dtype=dtype, device=device)
    weight = torch.ones(HIDDEN, dtype=dtype, device=device)
    y = torch.empty_like(x)
    rstd = torch.empty(tokens, dtype=torch.float32, device=device)
    return KernelCall(
        lambda: rmsnorm_ops.forward_into(x, weight, y, rstd, RMSNORM_EPS, 0.0, LLAMA), tensor_bytes(x, weight, y, rstd)
    )


def _rmsnorm_backward_kernel(tokens: int, dtype, device) -> KernelCall:
    """Reads dy, x, weight, rstd; writes dx, and dW (fp32 [hidden], from per-thread partials)."""
    x = torch.randn(tokens, HIDDEN, dtype=dtype, device=device)
    dy = torch.randn_like(x)
    weight = torch.ones(HIDDEN, dtype=dtype, device=device)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + RMSNORM_EPS)
    dx = torch.empty_like(x)
    dw_bytes = HIDDEN * 4
    return KernelCall(
        lambda: rmsnorm_ops.backward_into(dy, x, weight, rstd, dx, 0.0, LLAMA, True),
        tensor_bytes(dy, x, weight, rstd, dx) + dw_bytes,
    )


def _rmsnorm_workload(tokens: int, dtype: torch.dtype, device: torch.device) -> Workload:
    x = torch.randn(tokens, HIDDEN, dtype=dtype, device=device, requires_grad=True)
    ours = pyfastpeft.nn.RMSNorm(HIDDEN, eps=RMSNORM_EPS, device=device, dtype=dtype)
    reference = modeling_llama.LlamaRMSNorm(HIDDEN, eps=RMSNORM_EPS).to(device=device, dtype=dtype)
    return Workload(
        ours=Implementation(lambda: ours(x), (x, ours.weight)),
        reference=Implementation(lambda: reference(x), (x, reference.weight)),
        kernels={
            "forward": functools.partial(_rmsnorm_forward_kernel, tokens, dtype, device),
            "backward": functools.partial(_rmsnorm_backward_kernel, tokens, dtype, device),
        },
    )


def rmsnorm_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    tokens = TOKENS[quick]
    return _one_case_per_mode(
        "rmsnorm",
        f"T={tokens} N={HIDDEN}",
        "transformers LlamaRMSNorm",
        dtypes,
        functools.partial(_rmsnorm_workload, tokens),
        quick,
        foundation_goals(5.0),
    )
