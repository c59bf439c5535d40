"""RoPE benchmark cases: q [1, 32, S, 128], k [1, 8, S, 128] as HF hands them (transposed views)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers.models.llama import modeling_llama

import pyfastpeft
from pyfastpeft.bench.cases._common import (
    HEAD_DIM,
    KV_HEADS,
    Q_HEADS,
    ROPE_THETA,
    SEQ_LEN,
    _one_case_per_mode,
    foundation_goals,
    tensor_bytes,
)
from pyfastpeft.bench.harness import Case, Implementation, KernelCall, Workload
from pyfastpeft.ops import rope as rope_ops

# The forward sees q and k as transposed views of the [1, S, H, D] projection outputs. The grads that
# come back are contiguous [1, H, S, D], as eager attention's backward makes them (torch's SDPA returns
# q's transposed layout instead). Ours makes the gradient in the projections' layout; HF's elementwise
# backward keeps the grads' layout, and autograd copies it into the projections' (in a model, the
# reshape before q_proj/k_proj's backward pays that copy).


def _rope_tables(seq_len: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, S, D] in HF's rotate_half layout: angle[s, j] = s * theta^(-2j/D), repeated twice."""
    inverse_frequencies = ROPE_THETA ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inverse_frequencies)
    table = torch.cat((angles, angles), dim=-1)[None].to(device)
    return table.cos().to(dtype), table.sin().to(dtype)


def _projected(seq_len: int, heads: int, dtype, device, requires_grad: bool = False) -> torch.Tensor:
    """A [1, S, H, D] projection output; functions and forward kernels see it as .transpose(1, 2)."""
    return torch.randn(1, seq_len, heads, HEAD_DIM, dtype=dtype, device=device, requires_grad=requires_grad)


def _rope_kernel(seq_len: int, dtype, device, backward: bool) -> KernelCall:
    """Reads q, k, cos, sin; writes q_out, k_out in q/k's layout: the forward on transposed views of
    the projections, the backward (the transposed rotation) on contiguous [1, H, S, D] grads."""
    if backward:
        q = torch.randn(1, Q_HEADS, seq_len, HEAD_DIM, dtype=dtype, device=device)
        k = torch.randn(1, KV_HEADS, seq_len, HEAD_DIM, dtype=dtype, device=device)
    else:
        q = _projected(seq_len, Q_HEADS, dtype, device).transpose(1, 2)
        k = _projected(seq_len, KV_HEADS, dtype, device).transpose(1, 2)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    cos, sin = _rope_tables(seq_len, dtype, device)
    return KernelCall(
        lambda: rope_ops.rope_into(q, k, q_out, k_out, cos, sin, False, backward),
        tensor_bytes(q, k, q_out, k_out, cos, sin),
    )


def _rope_workload(seq_len: int, dtype: torch.dtype, device: torch.device) -> Workload:
    q_projected = _projected(seq_len, Q_HEADS, dtype, device, requires_grad=True)
    k_projected = _projected(seq_len, KV_HEADS, dtype, device, requires_grad=True)
    cos, sin = _rope_tables(seq_len, dtype, device)

    def run(apply_rotary_pos_emb):
        return lambda: apply_rotary_pos_emb(q_projected.transpose(1, 2), k_projected.transpose(1, 2), cos, sin)

    leaves = (q_projected, k_projected)
    return Workload(
        ours=Implementation(run(pyfastpeft.functional.apply_rotary_pos_emb), leaves),
        reference=Implementation(run(modeling_llama.apply_rotary_pos_emb), leaves),
        kernels={
            "forward": functools.partial(_rope_kernel, seq_len, dtype, device, False),
            "backward": functools.partial(_rope_kernel, seq_len, dtype, device, True),
        },
    )


def rope_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    seq_len = SEQ_LEN[quick]
    return _one_case_per_mode(
        "rope",
        f"S={seq_len} H={Q_HEADS}/{KV_HEADS} D={HEAD_DIM}",
        "transformers apply_rotary_pos_emb",
        dtypes,
        functools.partial(_rope_workload, seq_len),
        quick,
        foundation_goals(4.0),
    )
