"""Attention benchmark cases: causal grouped-query attention, q [1, 32, S, 128], k and v [1, 8, S, 128] as HF hands
them (transposed views of the [1, S, H, D] projections), against what transformers' sdpa attention runs on the CPU
for a batch without padding: torch's scaled_dot_product_attention with is_causal and enable_gqa."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import pyfastpeft
from pyfastpeft.bench.cases._common import HEAD_DIM, KV_HEADS, Q_HEADS, _one_case_per_mode
from pyfastpeft.bench.harness import Case, Goal, Implementation, Workload

ATTENTION_SEQ_LEN = {False: 1024, True: 256}  # quick -> sequence length (batch 1)


def _projected(seq_len: int, heads: int, dtype, device) -> torch.Tensor:
    return torch.randn(1, seq_len, heads, HEAD_DIM, dtype=dtype, device=device, requires_grad=True)


def _attention_workload(seq_len: int, dtype: torch.dtype, device: torch.device) -> Workload:
    q, k, v = (_projected(seq_len, heads, dtype, device) for heads in (Q_HEADS, KV_HEADS, KV_HEADS))

    def ours():
        return pyfastpeft.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )

    def reference():
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )

    # Compute-bound (2 S^2 D H FLOP forward with the causal half, 2.5 times that backward): no bandwidth figure.
    return Workload(ours=Implementation(ours, (q, k, v)), reference=Implementation(reference, (q, k, v)), kernels={})


def attention_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    seq_len = ATTENTION_SEQ_LEN[quick]
    cases = _one_case_per_mode(
        "attention",
        f"causal S={seq_len} H={Q_HEADS}/{KV_HEADS} D={HEAD_DIM}",
        "torch scaled_dot_product_attention (is_causal, enable_gqa): transformers' sdpa",
        dtypes,
        functools.partial(_attention_workload, seq_len),
        quick,
        # torch's CPU SDPA is a blocked flash kernel too, which for bf16 data rounds P to bf16 before P v; ours keeps
        # the products with P and dS in fp32, so its edge at this size is its tiles, not a cheaper precision.
        lambda mode: (Goal("speedup", 1.25),) if mode == "both" else (),
    )
    # headline: bf16, the dtype of the model steps in the default run (fp32's case took 7 s more of its ten minutes)
    return [dataclasses.replace(case, headline=case.headline and case.dtype == torch.bfloat16) for case in cases]
