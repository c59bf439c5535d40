"""Preference-loss benchmark cases: DPO over a policy lm_head [V, 1024] (frozen, as LoRA leaves it) with the
reference model's lm_head in the same call, at Llama-2's and Llama-3's vocabularies."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import pyfastpeft
from pyfastpeft.bench.cases._common import LOSS_GOALS
from pyfastpeft.bench.harness import Case, Implementation, Workload

PAIRS = {False: 4, True: 2}
SEQ_LEN = {False: 256, True: 128}
HIDDEN = 1024
BETA = 0.1


def eager_dpo(hidden, weight, ref_hidden, ref_weight, labels, beta: float) -> torch.Tensor:
    """What TRL's DPOTrainer computes without a fused lm_head: both models' [2B, S, V] logits, log-softmax in fp32,
    the labels' log-probabilities summed per sequence, the sigmoid loss of the pairs' log-ratio margins."""

    def logps(h, w):
        per_token = F.log_softmax(F.linear(h, w).float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (per_token * (labels != -100)).sum(-1)

    with torch.no_grad():
        ref = logps(ref_hidden, ref_weight)
    policy = logps(hidden, weight)
    pairs = labels.shape[0] // 2
    margin = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
    return -F.logsigmoid(beta * margin).mean()


def _dpo_workload(pairs: int, seq_len: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Workload:
    h = torch.randn(2 * pairs, seq_len, HIDDEN, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(vocab, HIDDEN, device=device) * HIDDEN**-0.5).to(dtype)
    ref_h = torch.randn(2 * pairs, seq_len, HIDDEN, dtype=dtype, device=device)
    ref_w = (torch.randn(vocab, HIDDEN, device=device) * HIDDEN**-0.5).to(dtype)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), device=device)
    labels[:, : seq_len // 4] = -100  # the prompt

    def ours():
        out = pyfastpeft.functional.fused_linear_preference(
            h, w, labels, loss="dpo", beta=BETA, ref_hidden=ref_h, ref_weight=ref_w
        )
        return out.loss

    return Workload(
        ours=Implementation(ours, (h,)),
        reference=Implementation(lambda: eager_dpo(h, w, ref_h, ref_w, labels, BETA), (h,)),
        kernels={},
    )


def preference_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    pairs, seq_len = PAIRS[quick], SEQ_LEN[quick]
    return [
        Case(
            "preference",
            f"DPO B={pairs}x2 S={seq_len} H={HIDDEN} V={vocab} W frozen",
            dtype,
            "both",
            "TRL DPO's sigmoid loss, eager over F.linear logits of policy and reference",
            functools.partial(_dpo_workload, pairs, seq_len, vocab, dtype),
            goals=LOSS_GOALS,
            headline=quick and (vocab == 32000 or dtype == torch.bfloat16),  # fp32 at 128256: 2 min
        )
        for vocab in (32000, 128256)
        for dtype in dtypes
    ]
