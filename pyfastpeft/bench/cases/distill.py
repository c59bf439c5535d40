"""Fused linear distillation benchmark cases: a student lm_head [V, 1024] distilled towards a teacher's [V, 2048]
with the generalized JSD (beta 0.5, the costliest row pass), at Llama-2's and Llama-3's vocabularies, the
student's lm_head frozen (LoRA and QLoRA leave it so; the gradient flows to the hidden states) and, at 32000,
trained."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import pyfastpeft
from pyfastpeft.bench.cases._common import LOSS_GOALS
from pyfastpeft.bench.harness import Case, Implementation, Workload

DISTILL_TOKENS = {False: 1024, True: 256}
STUDENT_HIDDEN, TEACHER_HIDDEN = 1024, 2048
BETA = 0.5


def eager_generalized_jsd(student_logits, teacher_logits, labels, beta: float) -> torch.Tensor:
    """The eager formula users run today (TRL's GKD loss): log-softmax both [T, V] logits in fp32, the mixture's
    log-probabilities by logsumexp, the two KL terms, the mean over counted tokens."""
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    log_q = F.log_softmax(teacher_logits.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log1p(-beta), log_q + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    kl_student = F.kl_div(log_m, log_p, reduction="none", log_target=True)
    jsd = (beta * kl_teacher + (1 - beta) * kl_student)[labels != -100]
    return jsd.sum() / (labels != -100).sum()


def _distill_workload(tokens: int, vocab: int, train_weight: bool, dtype: torch.dtype, device: torch.device):
    """Ours: fused_linear_distillation. Reference: both lm_heads with F.linear, then the eager loss above (the
    [T, V] logits of both models and their fp32 copies exist at once)."""
    h = torch.randn(tokens, STUDENT_HIDDEN, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(vocab, STUDENT_HIDDEN, device=device) * STUDENT_HIDDEN**-0.5).to(dtype)
    w.requires_grad_(train_weight)
    leaves = (h, w) if train_weight else (h,)
    g = torch.randn(tokens, TEACHER_HIDDEN, dtype=dtype, device=device)
    u = (torch.randn(vocab, TEACHER_HIDDEN, device=device) * TEACHER_HIDDEN**-0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[torch.rand(tokens, device=device) < 0.05] = -100

    def reference():
        with torch.no_grad():
            teacher_logits = F.linear(g, u)
        return eager_generalized_jsd(F.linear(h, w), teacher_logits, labels, BETA)

    return Workload(
        ours=Implementation(
            lambda: pyfastpeft.functional.fused_linear_distillation(h, w, g, u, labels, loss="jsd", beta=BETA),
            leaves,
        ),
        reference=Implementation(reference, leaves),
        kernels={},
    )


def distill_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    tokens = DISTILL_TOKENS[quick]
    return [
        Case(
            "distill",
            f"JSD T={tokens} H={STUDENT_HIDDEN}<-{TEACHER_HIDDEN} V={vocab} W {'trained' if train else 'frozen'}",
            dtype,
            "both",
            "TRL GKD's generalized JSD, eager over F.linear logits",
            functools.partial(_distill_workload, tokens, vocab, train, dtype),
            goals=LOSS_GOALS,
            headline=quick and not train and (vocab == 32000 or dtype == torch.bfloat16),  # fp32 at 128256: 4 min
        )
        for vocab, train in ((32000, False), (128256, False), (32000, True))
        for dtype in dtypes
    ]
