"""Benchmark cases, one function per op family, shapes from Llama-2-7B (hidden 4096, intermediate
11008, 32 query heads, head_dim 128; 8 KV heads, as in GQA models).

A family function takes the dtypes and whether the run is quick, and returns one Case per
(dtype, mode). A Case's build(device) makes the inputs, our implementation (the public function or
module) and the reference (the HF module or eager PyTorch), and builders of native "into" kernel
calls. A new family adds one function here and one entry in FAMILIES; the harness does not change.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama

import pyfastpeft
from pyfastpeft.bench.harness import MODES, Case, Implementation, KernelCall, Workload
from pyfastpeft.ops import nf4 as nf4_ops
from pyfastpeft.ops import quantize as quantize_ops
from pyfastpeft.ops import rmsnorm as rmsnorm_ops
from pyfastpeft.ops import rope as rope_ops
from pyfastpeft.ops import swiglu as swiglu_ops
from pyfastpeft.reference.rmsnorm import LLAMA

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM = 4096, 11008, 32, 8, 128
TOKENS = {False: 4096, True: 1024}  # quick -> tokens of the RMSNorm and SwiGLU inputs
SEQ_LEN = {False: 2048, True: 512}  # quick -> RoPE sequence length (batch 1)
RMSNORM_EPS = 1e-6
ROPE_THETA = 10000.0

FamilyCases = Callable[[Sequence[torch.dtype], bool], list[Case]]  # (dtypes, quick) -> cases


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _one_case_per_mode(family: str, shape: str, reference_name: str, dtypes: Sequence[torch.dtype],
                       build: Callable[..., Workload]) -> list[Case]:
    """Cases for every dtype and mode; build(dtype, device) makes the workload."""
    return [Case(family, shape, dtype, mode, reference_name, functools.partial(build, dtype))
            for dtype in dtypes for mode in MODES]


# ---- RMSNorm: x [tokens, hidden] ----------------------------------------------------------------

def _rmsnorm_forward_kernel(tokens: int, dtype, device) -> KernelCall:
    """Reads x, weight; writes y (x's dtype) and rstd (fp32 [tokens]). Llama casting, offset 0."""
    x = torch.randn(tokens, HIDDEN, dtype=dtype, device=device)
    weight = torch.ones(HIDDEN, dtype=dtype, device=device)
    y = torch.empty_like(x)
    rstd = torch.empty(tokens, dtype=torch.float32, device=device)
    return KernelCall(lambda: rmsnorm_ops.forward_into(x, weight, y, rstd, RMSNORM_EPS, 0.0, LLAMA),
                      tensor_bytes(x, weight, y, rstd))


def _rmsnorm_backward_kernel(tokens: int, dtype, device) -> KernelCall:
    """Reads dy, x, weight, rstd; writes dx, and dW (fp32 [hidden], from per-thread partials)."""
    x = torch.randn(tokens, HIDDEN, dtype=dtype, device=device)
    dy = torch.randn_like(x)
    weight = torch.ones(HIDDEN, dtype=dtype, device=device)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + RMSNORM_EPS)
    dx = torch.empty_like(x)
    dw_bytes = HIDDEN * 4
    return KernelCall(lambda: rmsnorm_ops.backward_into(dy, x, weight, rstd, dx, 0.0, LLAMA, True),
                      tensor_bytes(dy, x, weight, rstd, dx) + dw_bytes)


def _rmsnorm_workload(tokens: int, dtype: torch.dtype, device: torch.device) -> Workload:
    x = torch.randn(tokens, HIDDEN, dtype=dtype, device=device, requires_grad=True)
    ours = pyfastpeft.nn.RMSNorm(HIDDEN, eps=RMSNORM_EPS, device=device, dtype=dtype)
    reference = modeling_llama.LlamaRMSNorm(HIDDEN, eps=RMSNORM_EPS).to(device=device, dtype=dtype)
    return Workload(
        ours=Implementation(lambda: ours(x), (x, ours.weight)),
        reference=Implementation(lambda: reference(x), (x, reference.weight)),
        kernels={"forward": functools.partial(_rmsnorm_forward_kernel, tokens, dtype, device),
                 "backward": functools.partial(_rmsnorm_backward_kernel, tokens, dtype, device)})


def rmsnorm_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    tokens = TOKENS[quick]
    return _one_case_per_mode("rmsnorm", f"T={tokens} N={HIDDEN}", "transformers LlamaRMSNorm", dtypes,
                              functools.partial(_rmsnorm_workload, tokens))


# ---- SwiGLU: gate, up [tokens, intermediate] ----------------------------------------------------

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
    return KernelCall(lambda: swiglu_ops.backward_into(dy, gate, up, dgate, dup),
                      tensor_bytes(dy, gate, up, dgate, dup))


def _swiglu_workload(tokens: int, dtype: torch.dtype, device: torch.device) -> Workload:
    gate = torch.randn(tokens, INTERMEDIATE, dtype=dtype, device=device, requires_grad=True)
    up = torch.randn(tokens, INTERMEDIATE, dtype=dtype, device=device, requires_grad=True)
    return Workload(
        ours=Implementation(lambda: pyfastpeft.functional.swiglu(gate, up), (gate, up)),
        reference=Implementation(lambda: F.silu(gate) * up, (gate, up)),
        kernels={"forward": functools.partial(_swiglu_forward_kernel, tokens, dtype, device),
                 "backward": functools.partial(_swiglu_backward_kernel, tokens, dtype, device)})


def swiglu_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    tokens = TOKENS[quick]
    return _one_case_per_mode("swiglu", f"T={tokens} N={INTERMEDIATE}", "eager F.silu(gate) * up", dtypes,
                              functools.partial(_swiglu_workload, tokens))


# ---- RoPE: q [1, 32, S, 128], k [1, 8, S, 128] as HF hands them (transposed views) ----------------
# The forward sees q and k as transposed views of the [1, S, H, D] projection outputs. The grads that
# come back are contiguous [1, H, S, D], as attention's backward makes them: the backward kernels
# see that layout, and both sides pay the strided copy into the projections' layout (in a model, the
# reshape before q_proj/k_proj's backward pays it).

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
    return KernelCall(lambda: rope_ops.rope_into(q, k, q_out, k_out, cos, sin, False, backward),
                      tensor_bytes(q, k, q_out, k_out, cos, sin))


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
        kernels={"forward": functools.partial(_rope_kernel, seq_len, dtype, device, False),
                 "backward": functools.partial(_rope_kernel, seq_len, dtype, device, True)})


def rope_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    seq_len = SEQ_LEN[quick]
    return _one_case_per_mode("rope", f"S={seq_len} H={Q_HEADS}/{KV_HEADS} D={HEAD_DIM}",
                              "transformers apply_rotary_pos_emb", dtypes,
                              functools.partial(_rope_workload, seq_len))


# ---- NF4: y = x @ dequant(W)^T for a [N, K] weight in NF4 (blocksize 64, double quant) ------------

NF4_WEIGHTS = {False: ((HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN)), True: ((HIDDEN, HIDDEN),)}
NF4_ROWS = {False: (1, 512), True: (1, 128)}  # decode (fused GEMV) and prefill/training (tiled GEMM)


def _nf4_kernel(rows: int, out_features: int, in_features: int, dtype, device, backward: bool) -> KernelCall:
    """forward: the fused dequant-GEMV (rows <= 8) or the tiled GEMM into preallocated out; backward:
    dX = dY @ dequant(W). Reads packed W, absmax and the activation; writes the result."""
    from pyfastpeft.quant import quantize_nf4

    packed, state = quantize_nf4(torch.randn(out_features, in_features, device=device) * 0.02, 64, True)
    absmax, code = state.dequantized_absmax(), state.code.float()
    if backward:
        dy = torch.randn(rows, out_features, dtype=dtype, device=device)
        call = lambda: nf4_ops.nf4_linear_grad_input(dy, packed, absmax, code, 64, out_features,  # noqa: E731
                                                     in_features)
        return KernelCall(call, tensor_bytes(packed, absmax, dy) + rows * in_features * dy.element_size())
    x = torch.randn(rows, in_features, dtype=dtype, device=device)
    out = torch.empty(rows, out_features, dtype=dtype, device=device)
    if rows <= nf4_ops.GEMV_MAX_ROWS:
        call = lambda: nf4_ops.gemv_into(x, packed, absmax, code, None, out, 64)  # noqa: E731
    else:
        call = lambda: nf4_ops.nf4_linear_op(x, packed, absmax, code, x.new_empty(0), 64,  # noqa: E731
                                              out_features, in_features)
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
        weight = nf4_reference.dequantize_4bit(layer.weight, state.dequantized_absmax(), state.code, state.blocksize,
                                               out_features * in_features, dtype)
        return torch.nn.functional.linear(x, weight.view(out_features, in_features))
    return Workload(
        ours=Implementation(lambda: layer(x), (x,)),
        reference=Implementation(reference, (x,)),
        kernels={"forward": functools.partial(_nf4_kernel, rows, out_features, in_features, dtype, device, False),
                 "backward": functools.partial(_nf4_kernel, rows, out_features, in_features, dtype, device, True)})


def nf4_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    cases = []
    for out_features, in_features in NF4_WEIGHTS[quick]:
        for rows in NF4_ROWS[quick]:
            modes = ("forward",) if rows == 1 else MODES  # decode has no backward
            cases += [Case("nf4", f"M={rows} {out_features}x{in_features}", dtype, mode,
                           "dequantize + torch matmul (bitsandbytes' CPU path)",
                           functools.partial(_nf4_workload, rows, out_features, in_features, dtype))
                      for dtype in dtypes for mode in modes]
    return cases


# ---- quantize: absmax int8 codes of x [rows, hidden], one scale per row or per tensor ------------------

QUANTIZE_ROWS = {False: 4096, True: 1024}
QUANTIZE_GRANULARITIES = {"per row": 0, "per tensor": -1}  # name -> the ops' axis argument


def _quantize_kernel(rows: int, axis: int, dtype, device) -> KernelCall:
    """Reads x; writes int8 codes and fp32 scales (one per row, or one)."""
    x = torch.randn(rows, HIDDEN, dtype=dtype, device=device)
    codes = torch.empty(rows, HIDDEN, dtype=torch.int8, device=device)
    scale = torch.empty(rows if axis == 0 else (), dtype=torch.float32, device=device)
    return KernelCall(lambda: quantize_ops.quantize_into(x, codes, scale, None, 8, False, axis, 0),
                      tensor_bytes(x, codes, scale))


def _quantize_workload(rows: int, axis: int, dtype: torch.dtype, device: torch.device) -> Workload:
    """Ours: pyfastpeft.quant.quantize. Reference: the same formulas in eager PyTorch (reference/quantize.py)."""
    from pyfastpeft.quant import quantize
    from pyfastpeft.reference import quantize as quantize_reference

    x = torch.randn(rows, HIDDEN, dtype=dtype, device=device)
    public_axis = None if axis < 0 else axis
    return Workload(
        ours=Implementation(lambda: quantize(x, 8, "absmax", axis=public_axis), ()),
        reference=Implementation(lambda: quantize_reference.quantize_affine(x, 8, False, axis, 0), ()),
        kernels={"forward": functools.partial(_quantize_kernel, rows, axis, dtype, device)})


def quantize_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    rows = QUANTIZE_ROWS[quick]
    return [Case("quantize", f"{rows}x{HIDDEN} {name}", dtype, "forward", "eager PyTorch reference (same formulas)",
                 functools.partial(_quantize_workload, rows, axis, dtype))
            for name, axis in QUANTIZE_GRANULARITIES.items() for dtype in dtypes]


FAMILIES: dict[str, FamilyCases] = {"rmsnorm": rmsnorm_cases, "swiglu": swiglu_cases, "rope": rope_cases,
                                    "nf4": nf4_cases, "quantize": quantize_cases}


def select_cases(families: Sequence[str], dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    return [case for family in families for case in FAMILIES[family](dtypes, quick)]
