"""Fused linear cross-entropy benchmark cases: lm_head + loss, hidden [tokens, 4096], weight [32000, 4096]."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import pyfastpeft
from pyfastpeft.bench.cases._common import HIDDEN, tensor_bytes
from pyfastpeft.bench.harness import Case, Implementation, KernelCall, Workload
from pyfastpeft.ops import flce as flce_ops

FLCE_TOKENS = {False: 4096, True: 1024}
VOCAB = 32000


def _flce_tensors(tokens: int, dtype, device, train_weight: bool):
    """hidden [T, H] (requires grad), weight [V, H] at an lm_head's scale, labels with 5% ignored (padding)."""
    hidden = torch.randn(tokens, HIDDEN, dtype=dtype, device=device, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN, device=device) * HIDDEN**-0.5).to(dtype).requires_grad_(train_weight)
    labels = torch.randint(0, VOCAB, (tokens,), device=device)
    labels[torch.rand(tokens, device=device) < 0.05] = -100
    return hidden, weight, labels


def _flce_kernel(tokens: int, dtype, device, train_weight: bool, backward: bool) -> KernelCall:
    """forward: the fused op (logits chunk by chunk, row pass, dh and dW matmuls) reads h, W, labels and writes
    dh (and dW); backward scales them by the loss grad. Compute-bound (three GEMMs): the GB/s are a floor."""
    hidden, weight, labels = (t.detach() for t in _flce_tensors(tokens, dtype, device, train_weight))
    bias = None
    if backward:
        grad_hidden = torch.randn_like(hidden)
        grad_weight = torch.randn_like(weight) if train_weight else weight.new_empty(0)
        grad_loss = torch.ones((), device=device)
        return KernelCall(
            lambda: (grad_hidden * grad_loss, grad_weight * grad_loss), 2 * tensor_bytes(grad_hidden, grad_weight)
        )
    call = lambda: flce_ops.flce_forward(
        hidden,
        weight,
        labels,
        bias,
        None,
        -100,
        0.0,
        0.0,
        0.0,
        "mean",
        False,
        True,  # noqa: E731
        train_weight,
        False,
        0,
    )
    grads_written = tensor_bytes(hidden) + (tensor_bytes(weight) if train_weight else 0)
    return KernelCall(call, tensor_bytes(hidden, weight, labels) + grads_written)


def _flce_workload(tokens: int, train_weight: bool, dtype: torch.dtype, device: torch.device) -> Workload:
    """Ours: fused_linear_cross_entropy. Reference: what transformers does, F.linear then F.cross_entropy on
    the logits upcast to fp32 (the full [T, V] logits and their grad exist at once)."""
    hidden, weight, labels = _flce_tensors(tokens, dtype, device, train_weight)
    leaves = (hidden, weight) if train_weight else (hidden,)
    kernel = functools.partial(_flce_kernel, tokens, dtype, device, train_weight)
    return Workload(
        ours=Implementation(lambda: pyfastpeft.functional.fused_linear_cross_entropy(hidden, weight, labels), leaves),
        reference=Implementation(lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels), leaves),
        kernels={"forward": functools.partial(kernel, False), "backward": functools.partial(kernel, True)},
    )


def flce_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    tokens = FLCE_TOKENS[quick]
    return [
        Case(
            "flce",
            f"T={tokens} H={HIDDEN} V={VOCAB} W {'trained' if train else 'frozen'}",
            dtype,
            "both",
            "transformers: F.linear, then F.cross_entropy in fp32",
            functools.partial(_flce_workload, tokens, train, dtype),
            # the full size (T=4096) takes minutes a case on 2 cores, fp32 at T=1024 two
            headline=quick and dtype == torch.bfloat16,
        )
        for train in (False, True)
        for dtype in dtypes
    ]
