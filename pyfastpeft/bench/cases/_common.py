"""What every family's cases share: the dtypes, the Llama-2-7B sizes, bytes of tensors, one case per mode."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Callable

import torch

from pyfastpeft.bench.harness import MODES, Case, Goal, Workload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM = 4096, 11008, 32, 8, 128
TOKENS = {False: 4096, True: 1024}  # quick -> tokens of the RMSNorm and SwiGLU inputs
SEQ_LEN = {False: 2048, True: 512}  # quick -> RoPE sequence length (batch 1)
RMSNORM_EPS = 1e-6
ROPE_THETA = 10000.0

FamilyCases = Callable[[Sequence[torch.dtype], bool], list[Case]]  # (dtypes, quick) -> cases


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _one_case_per_mode(
    family: str,
    shape: str,
    reference_name: str,
    dtypes: Sequence[torch.dtype],
    build: Callable[..., Workload],
    quick: bool = True,
    goals: Callable[[str], tuple[Goal, ...]] = lambda mode: (),
) -> list[Case]:
    """Cases for every dtype and mode; build(dtype, device) makes the workload, goals(mode) the targets of that
    mode's cases. The full-size fwd+bwd cases are the family's headline."""
    return [
        Case(
            family,
            shape,
            dtype,
            mode,
            reference_name,
            functools.partial(build, dtype),
            goals=goals(mode),
            headline=not quick and mode == "both",
        )
        for dtype in dtypes
        for mode in MODES
    ]


# Distillation and preference losses on this CPU: at least as fast as the eager formula over full logits, at a
# quarter of its peak memory or less.
LOSS_GOALS = (Goal("speedup", 1.0), Goal("peak", 0.25))


def foundation_goals(both_speedup: float) -> Callable[[str], tuple[Goal, ...]]:
    """RMSNorm, SwiGLU and RoPE on the CPU: fwd+bwd at least `both_speedup` x the reference as a user sees it, and
    every kernel at 60% of copy bandwidth or more."""
    return lambda mode: ((Goal("speedup", both_speedup),) if mode == "both" else ()) + (Goal("copy", 0.6),)
