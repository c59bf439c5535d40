"""Benchmark cases, one function per op family, shapes from Llama-2-7B (hidden 4096, intermediate
11008, 32 query heads, head_dim 128; 8 KV heads, as in GQA models).

A family function takes the dtypes and whether the run is quick, and returns one Case per
(dtype, mode). A Case's build(device) makes the inputs, our implementation (the public function or
module) and the reference (the HF module or eager PyTorch), and builders of native "into" kernel
calls (none in the `model` family, whose cases are whole training steps). A new family adds one function here and one entry in FAMILIES; the harness does not change.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

import pyfastpeft
from pyfastpeft import LoraSettings, prepare_model
from pyfastpeft.bench.harness import MODES, Case, Implementation, KernelCall, Workload
from pyfastpeft.ops import flce as flce_ops
from pyfastpeft.ops import int8 as int8_ops
from pyfastpeft.ops import lora as lora_ops
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
NF4_BLOCKSIZE = 64


def _nf4_weight(out_features: int, in_features: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, de-nested absmax, code) of a random [out_features, in_features] weight in NF4."""
    from pyfastpeft.quant import quantize_nf4

    packed, state = quantize_nf4(torch.randn(out_features, in_features, device=device) * 0.02, NF4_BLOCKSIZE, True)
    return packed, state.dequantized_absmax(), state.code.float()


def _nf4_kernel(rows: int, out_features: int, in_features: int, dtype, device, backward: bool) -> KernelCall:
    """forward: the fused dequant-GEMV (rows <= 8) or the tiled GEMM into preallocated out; backward:
    dX = dY @ dequant(W). Reads packed W, absmax and the activation; writes the result."""
    packed, absmax, code = _nf4_weight(out_features, in_features, device)
    if backward:
        dy = torch.randn(rows, out_features, dtype=dtype, device=device)
        call = lambda: nf4_ops.nf4_linear_grad_input(dy, packed, absmax, code, NF4_BLOCKSIZE,  # noqa: E731
                                                     out_features, in_features)
        return KernelCall(call, tensor_bytes(packed, absmax, dy) + rows * in_features * dy.element_size())
    x = torch.randn(rows, in_features, dtype=dtype, device=device)
    out = torch.empty(rows, out_features, dtype=dtype, device=device)
    if rows <= nf4_ops.GEMV_MAX_ROWS:
        call = lambda: nf4_ops.gemv_into(x, packed, absmax, code, None, out, NF4_BLOCKSIZE)  # noqa: E731
    else:
        call = lambda: nf4_ops.nf4_linear_op(x, packed, absmax, code, x.new_empty(0), NF4_BLOCKSIZE,  # noqa: E731
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


def _nf4_dequantize_kernel(out_features: int, in_features: int, dtype, device) -> KernelCall:
    """Reads packed W and absmax; writes W [out_features * in_features] in dtype."""
    packed, absmax, code = _nf4_weight(out_features, in_features, device)
    out = torch.empty(out_features * in_features, dtype=dtype, device=device)
    return KernelCall(lambda: nf4_ops.dequantize_all_into(packed, absmax, code, out, NF4_BLOCKSIZE),
                      tensor_bytes(packed, absmax, out))


def _nf4_dequantize_workload(out_features: int, in_features: int, dtype: torch.dtype,
                             device: torch.device) -> Workload:
    """Dequantize alone (what a GEMM above the fused sizes pays first). Ours: the nf4_dequantize op;
    reference: the PyTorch reference dequantize."""
    from pyfastpeft.reference import nf4 as nf4_reference

    packed, absmax, code = _nf4_weight(out_features, in_features, device)
    numel = out_features * in_features
    return Workload(
        ours=Implementation(lambda: nf4_ops.nf4_dequantize(packed, absmax, code, NF4_BLOCKSIZE, numel, dtype), ()),
        reference=Implementation(
            lambda: nf4_reference.dequantize_4bit(packed, absmax, code, NF4_BLOCKSIZE, numel, dtype), ()),
        kernels={"forward": functools.partial(_nf4_dequantize_kernel, out_features, in_features, dtype, device)})


def nf4_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    cases = []
    for out_features, in_features in NF4_WEIGHTS[quick]:
        cases += [Case("nf4", f"dequantize {out_features}x{in_features}", dtype, "forward",
                       "PyTorch reference dequantize",
                       functools.partial(_nf4_dequantize_workload, out_features, in_features, dtype))
                  for dtype in dtypes]
    for out_features, in_features in NF4_WEIGHTS[quick]:
        for rows in NF4_ROWS[quick]:
            modes = ("forward",) if rows == 1 else MODES  # decode has no backward
            cases += [Case("nf4", f"M={rows} {out_features}x{in_features}", dtype, mode,
                           "dequantize + torch matmul (bitsandbytes' CPU path)",
                           functools.partial(_nf4_workload, rows, out_features, in_features, dtype))
                      for dtype in dtypes for mode in modes]
    return cases


# ---- LLM.int8: x [M, K] @ int8 W [N, K]^T with outlier columns; vector-wise quantization ---------------

INT8_WEIGHTS = {False: ((HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN)), True: ((HIDDEN, HIDDEN),)}
INT8_ROWS = {False: (1, 512), True: (1, 128)}
INT8_OUTLIERS = {False: (0.0, 0.001, 0.01), True: (0.001,)}  # fraction of x's columns holding outliers
INT8_THRESHOLD = 6.0


def _int8_inputs(rows: int, out_features: int, in_features: int, outlier_fraction: float, dtype, device):
    """x with round(fraction * K) outlier columns (each holding |x| >= 8 in row 0, N(0, 8^2) elsewhere),
    the int8 weight codes and SCB of a N(0, 0.02^2) weight."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=generator)
    columns = torch.randperm(in_features, generator=generator)[:round(outlier_fraction * in_features)]
    x[:, columns] *= 8.0
    x[0, columns] = 8.0
    from pyfastpeft.quant import quantize_int8_weight
    codes, scb = quantize_int8_weight(torch.randn(out_features, in_features, generator=generator) * 0.02)
    return x.to(device=device, dtype=dtype), codes.to(device), scb.to(device)


def eager_int8_linear(x, codes, scb, threshold: float):
    """LLM.int8 as a user writes it in eager PyTorch around torch._int_mm (bitsandbytes' default backend
    with its fp32 matmul swapped for the int8 one): quantize, int8 GEMM, dequantize, add the outlier product."""
    xf = x.float()
    outliers = xf.abs() >= threshold
    columns = outliers.any(0).nonzero().view(-1)
    row_stats = xf.abs().masked_fill(outliers, 0).amax(1)
    q = torch.round(xf * (127.0 / row_stats)[:, None])
    q[:, columns] = 0
    out = torch._int_mm(q.to(torch.int8), codes.t()).float() * (row_stats[:, None] * scb[None, :]) * (1 / 16129)
    if columns.numel():
        weight = (codes[:, columns].float() * scb[:, None] / 127).to(x.dtype)
        out += (x[:, columns] @ weight.t()).float()
    return out.to(x.dtype)


def _int8_kernel(rows: int, out_features: int, in_features: int, outlier_fraction: float, dtype, device,
                 backward: bool) -> KernelCall:
    """forward: int8_linear (quantize x, int8 GEMV/GEMM, epilogue, outlier product); backward: dX = dY @ W."""
    x, codes, scb = _int8_inputs(rows, out_features, in_features, outlier_fraction, dtype, device)
    if backward:
        dy = torch.randn(rows, out_features, dtype=dtype, device=device)
        return KernelCall(lambda: int8_ops.int8_linear_grad_input(dy, codes, scb),
                          tensor_bytes(codes, scb, dy, x))
    bias = x.new_empty(0)
    return KernelCall(lambda: int8_ops.int8_linear_op(x, codes, scb, bias, INT8_THRESHOLD),
                      tensor_bytes(x, codes, scb) + rows * out_features * x.element_size())


def _int8_workload(rows: int, out_features: int, in_features: int, outlier_fraction: float, reference: str,
                   dtype: torch.dtype, device: torch.device) -> Workload:
    """Ours: pyfastpeft's int8_linear. Reference "eager": eager_int8_linear above; "dense": F.linear with the
    dequantized weight in x's dtype (what the int8 layer replaces)."""
    x, codes, scb = _int8_inputs(rows, out_features, in_features, outlier_fraction, dtype, device)
    x.requires_grad_(True)
    if reference == "eager":
        reference_fn = functools.partial(eager_int8_linear, x, codes, scb, INT8_THRESHOLD)
    else:
        dense = (codes.float() * scb[:, None] / 127).to(dtype)
        reference_fn = functools.partial(F.linear, x, dense)
    return Workload(
        ours=Implementation(lambda: pyfastpeft.functional.int8_linear(x, codes, scb, threshold=INT8_THRESHOLD), (x,)),
        reference=Implementation(reference_fn, (x,)),
        kernels={"forward": functools.partial(_int8_kernel, rows, out_features, in_features, outlier_fraction, dtype,
                                              device, False),
                 "backward": functools.partial(_int8_kernel, rows, out_features, in_features, outlier_fraction,
                                               dtype, device, True)})


def _int8_quant_kernel(rows: int, in_features: int, dtype, device) -> KernelCall:
    x, _, _ = _int8_inputs(rows, 1, in_features, 0.001, dtype, device)
    q = torch.empty(x.shape, dtype=torch.int8, device=device)
    stats = torch.empty(rows, dtype=torch.float32, device=device)
    return KernelCall(lambda: int8_ops.quantize_into(x, q, stats, 0, INT8_THRESHOLD), tensor_bytes(x, q, stats))


def _int8_quant_workload(rows: int, in_features: int, dtype: torch.dtype, device: torch.device) -> Workload:
    """Ours: int8_vectorwise_quant (row-wise, outliers at 6.0). Reference: the same function on the
    reference backend (bitsandbytes' pure-PyTorch formula)."""
    from pyfastpeft.quant import int8_vectorwise_quant

    x, _, _ = _int8_inputs(rows, 1, in_features, 0.001, dtype, device)
    quantize = functools.partial(int8_vectorwise_quant, x, INT8_THRESHOLD)

    def reference():
        with pyfastpeft.use_backend("reference"):  # the harness runs the reference side on the auto backend
            return quantize()
    return Workload(ours=Implementation(quantize, ()), reference=Implementation(reference, ()),
                    kernels={"forward": functools.partial(_int8_quant_kernel, rows, in_features, dtype, device)})


def int8_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    cases = []
    for out_features, in_features in INT8_WEIGHTS[quick]:
        for rows in INT8_ROWS[quick]:
            for fraction in INT8_OUTLIERS[quick]:
                shape = f"M={rows} {out_features}x{in_features} outliers={fraction:.1%}"
                for reference, name in (("eager", "eager LLM.int8 around torch._int_mm"),
                                        ("dense", "dense F.linear, same dtype")):
                    modes = ("forward", "both") if reference == "dense" and rows > 1 and fraction else ("forward",)
                    cases += [Case("int8", shape, dtype, mode, name,
                                   functools.partial(_int8_workload, rows, out_features, in_features, fraction,
                                                     reference, dtype))
                              for dtype in dtypes for mode in modes]
    rows = INT8_ROWS[quick][-1] * (2 if quick else 8)
    cases += [Case("int8", f"quantize M={rows} K={HIDDEN}", dtype, "forward", "PyTorch formula (bitsandbytes' default)",
                   functools.partial(_int8_quant_workload, rows, HIDDEN, dtype)) for dtype in dtypes]
    return cases


# ---- LoRA: y = x W^T + s * dropout(x) A^T B^T over a dense [N, K] base, training (x and A, B need grads) ----

LORA_ROWS = {False: 2048, True: 256}
LORA_WEIGHTS = {False: ((HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN)), True: ((HIDDEN, HIDDEN),)}
LORA_RANKS = {False: (16, 64), True: (16,)}
LORA_DROPOUT = {False: (0.0, 0.05), True: (0.05,)}
LORA_ALPHA = 16


def _lora_tensors(rows: int, out_features: int, in_features: int, rank: int, dtype, device, requires_grad=False):
    """x [rows, K], frozen W [N, K], A [r, K], B [N, r] at the scales of a trained adapter."""
    x = torch.randn(rows, in_features, dtype=dtype, device=device, requires_grad=requires_grad)
    weight = torch.randn(out_features, in_features, dtype=dtype, device=device) * in_features**-0.5
    lora_A = (torch.randn(rank, in_features, device=device) * in_features**-0.5).to(dtype).requires_grad_(requires_grad)
    lora_B = (torch.randn(out_features, rank, device=device) * 0.01).to(dtype).requires_grad_(requires_grad)
    return x, weight, lora_A, lora_B


def _lora_rng(dropout_p: float, device) -> torch.Tensor:
    if dropout_p > 0:
        return torch.randint(0, lora_ops.SEED_HIGH, (2,), device=device)
    return torch.empty(0, dtype=torch.int64, device=device)


def _lora_kernel(rows: int, out_features: int, in_features: int, rank: int, dropout_p: float, dtype, device,
                 backward: bool) -> KernelCall:
    """The native op: forward reads x, W, A, B and writes y, xa [M, r]; backward reads dY, x, W, A, B, xa and
    writes dX, dA, dB. The GEMMs are torch's, so this is compute-bound: the bandwidth figure is a floor."""
    x, weight, lora_A, lora_B = _lora_tensors(rows, out_features, in_features, rank, dtype, device)
    rng, scaling, bias = _lora_rng(dropout_p, device), LORA_ALPHA / rank, x.new_empty(0)
    xa = torch.randn(rows, rank, dtype=dtype, device=device)
    if backward:
        dy = torch.randn(rows, out_features, dtype=dtype, device=device)
        call = lambda: lora_ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p,  # noqa: E731
                                              rng, True)
        return KernelCall(call, tensor_bytes(dy, x, weight, lora_A, lora_B, xa) + tensor_bytes(x, lora_A, lora_B))
    call = lambda: lora_ops.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng)  # noqa: E731
    return KernelCall(call, tensor_bytes(x, weight, lora_A, lora_B, xa) + rows * out_features * x.element_size())


def _lora_workload(rows: int, out_features: int, in_features: int, rank: int, dropout_p: float, dtype: torch.dtype,
                   device: torch.device) -> Workload:
    """Ours: pyfastpeft.functional.lora_linear. Reference: PEFT's eager graph, F.linear for the base plus
    dropout and the two adapter linears."""
    x, weight, lora_A, lora_B = _lora_tensors(rows, out_features, in_features, rank, dtype, device, True)
    scaling = LORA_ALPHA / rank

    def reference():
        dropped = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
        return F.linear(x, weight) + F.linear(F.linear(dropped, lora_A), lora_B) * scaling
    kernel = functools.partial(_lora_kernel, rows, out_features, in_features, rank, dropout_p, dtype, device)
    leaves = (x, lora_A, lora_B)
    return Workload(
        ours=Implementation(lambda: pyfastpeft.functional.lora_linear(x, weight, None, lora_A, lora_B, scaling,
                                                                      dropout_p, training=True), leaves),
        reference=Implementation(reference, leaves),
        kernels={"forward": functools.partial(kernel, False), "backward": functools.partial(kernel, True)})


class _EagerNF4Linear(torch.autograd.Function):
    """The eager QLoRA base as bitsandbytes runs it on CPU: dequantize W in PyTorch, matmul; backward
    dequantizes again for dX (no dW), so no dense W outlives either pass."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, blocksize: int, out_features: int, in_features: int):
        from pyfastpeft.reference import nf4 as nf4_reference

        ctx.save_for_backward(packed, absmax, code)
        ctx.meta = (blocksize, out_features, in_features)
        return nf4_reference.nf4_linear(x, packed, absmax, code, x.new_empty(0), blocksize, out_features, in_features)

    @staticmethod
    def backward(ctx, dy):
        from pyfastpeft.reference import nf4 as nf4_reference

        packed, absmax, code = ctx.saved_tensors
        return nf4_reference.nf4_linear_grad_input(dy, packed, absmax, code, *ctx.meta), None, None, None, None, None, \
            None


def _lora_variant_workload(variant: str, rows: int, out_features: int, in_features: int, rank: int, dropout_p: float,
                           dtype: torch.dtype, device: torch.device) -> Workload:
    """Comparisons around one LoRA layer (x and the adapter train, W frozen):
      "base":   ours = lora_linear over dense W; ref = the frozen base layer alone (F.linear): the LoRA overhead
      "qlora":  ours = lora_linear over NF4 W; ref = eager QLoRA (PyTorch dequantize -> matmul, again in
                backward, + PEFT's dropout and two linears)
      "dense":  ours = lora_linear over NF4 W; ref = our lora_linear over the dense W: the cost of the 4-bit base"""
    from pyfastpeft.quant import quantize_nf4

    x, weight, lora_A, lora_B = _lora_tensors(rows, out_features, in_features, rank, dtype, device, True)
    scaling = LORA_ALPHA / rank
    leaves = (x, lora_A, lora_B)
    packed, state = quantize_nf4(weight, 64, True)
    base = weight if variant == "base" else (packed, state)
    ours = functools.partial(pyfastpeft.functional.lora_linear, x, base, None, lora_A, lora_B, scaling, dropout_p,
                             training=True)
    if variant == "base":
        reference = functools.partial(F.linear, x, weight)
    elif variant == "dense":
        reference = functools.partial(pyfastpeft.functional.lora_linear, x, weight, None, lora_A, lora_B, scaling,
                                      dropout_p, training=True)
    else:
        absmax, code = state.dequantized_absmax(), state.code.float()

        def reference():
            dropped = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
            y = _EagerNF4Linear.apply(x, packed, absmax, code, 64, out_features, in_features)
            return y + F.linear(F.linear(dropped, lora_A), lora_B) * scaling
    kernel = functools.partial(_lora_kernel, rows, out_features, in_features, rank, dropout_p, dtype, device)
    return Workload(ours=Implementation(ours, leaves), reference=Implementation(reference, leaves),
                    kernels={"forward": functools.partial(kernel, False), "backward": functools.partial(kernel, True)})


LORA_VARIANTS = (("base", "the frozen base layer alone (F.linear): LoRA's overhead"),
                 ("qlora", "eager QLoRA: PyTorch dequantize + matmul (again in backward) + PEFT's LoRA branch"),
                 ("dense", "our LoRA layer over the dense weight: the cost of the NF4 base"))


def lora_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    rows = LORA_ROWS[quick]
    cases = [Case("lora", f"M={rows} {out_features}x{in_features} r={rank} p={dropout_p}", dtype, mode,
                  "eager PEFT: F.linear + dropout + two linears",
                  functools.partial(_lora_workload, rows, out_features, in_features, rank, dropout_p, dtype))
             for out_features, in_features in LORA_WEIGHTS[quick] for rank in LORA_RANKS[quick]
             for dropout_p in LORA_DROPOUT[quick] for dtype in dtypes for mode in MODES]
    for variant, name in LORA_VARIANTS:
        for variant_rows in ((rows, 1) if variant == "qlora" else (rows,)):  # decode: QLoRA at one row
            modes = ("forward",) if variant_rows == 1 else ("both",)
            cases += [Case("lora", f"{variant} M={variant_rows} {HIDDEN}x{HIDDEN} r=16 p=0.05", dtype, mode, name,
                           functools.partial(_lora_variant_workload, variant, variant_rows, HIDDEN, HIDDEN, 16, 0.05,
                                             dtype))
                      for dtype in dtypes for mode in modes]
    return cases + lora_multi_cases(dtypes, quick)


# ---- multi-adapter LoRA: 8 adapters in one batch, each on two of the 16 sequences -------------------------

LORA_MULTI_SEQUENCES, LORA_MULTI_ADAPTERS, LORA_MULTI_RANK, LORA_MULTI_DROPOUT = 16, 8, 16, 0.05
LORA_MULTI_SEQ_LEN = {False: 128, True: 16}  # 2048 tokens (256 quick)


def _lora_multi_inputs(seq_len: int, dtype, device):
    """x [16, seq_len, K] and 8 adapters (A, B) needing grads, frozen W [N, K] (N = K = hidden), and the
    adapter of each sequence: every adapter on two sequences, in shuffled order."""
    rows = LORA_MULTI_SEQUENCES * seq_len
    x, weight, _, _ = _lora_tensors(rows, HIDDEN, HIDDEN, LORA_MULTI_RANK, dtype, device)
    x = x.view(LORA_MULTI_SEQUENCES, seq_len, HIDDEN).requires_grad_()
    adapters = [_lora_tensors(1, HIDDEN, HIDDEN, LORA_MULTI_RANK, dtype, device, True)[2:]
                for _ in range(LORA_MULTI_ADAPTERS)]
    order = torch.randperm(LORA_MULTI_SEQUENCES, generator=torch.Generator().manual_seed(0))
    return x, weight, adapters, (order % LORA_MULTI_ADAPTERS).to(device)


def _lora_multi_kernel(seq_len: int, dtype, device, backward: bool) -> KernelCall:
    """The native multi-adapter ops on the packed adapters: forward reads x, W, A_cat, B_cat and writes y, xa;
    backward reads dY, x, W, A_cat, B_cat, xa and writes dX, dA_cat, dB_cat."""
    x, weight, adapters, adapter_ids = _lora_multi_inputs(seq_len, dtype, device)
    x = x.detach()
    lora_A = torch.cat([lora_A.detach() for lora_A, _ in adapters])
    lora_B = torch.cat([lora_B.detach() for _, lora_B in adapters], dim=1)
    rank_offsets = torch.arange(LORA_MULTI_ADAPTERS + 1, device=device) * LORA_MULTI_RANK
    scalings = torch.full((LORA_MULTI_ADAPTERS,), LORA_ALPHA / LORA_MULTI_RANK, device=device)
    row_adapter = adapter_ids[:, None].expand(LORA_MULTI_SEQUENCES, seq_len).reshape(-1).contiguous()
    rng, bias = _lora_rng(LORA_MULTI_DROPOUT, device), x.new_empty(0)
    forward_op, backward_op = lora_ops.MULTI_BASE_OPS["dense"]
    forward_args = (x, weight, bias, lora_A, lora_B, rank_offsets, scalings, row_adapter, LORA_MULTI_RANK,
                    LORA_MULTI_DROPOUT, rng)
    y, xa, row_order, segment_offsets = forward_op(*forward_args)
    if backward:
        dy = torch.randn_like(y)
        call = lambda: backward_op(dy, x, weight, lora_A, lora_B, rank_offsets, scalings, xa, row_order,  # noqa: E731
                                   segment_offsets, LORA_MULTI_DROPOUT, rng, True)
        return KernelCall(call, tensor_bytes(dy, x, weight, lora_A, lora_B, xa) + tensor_bytes(x, lora_A, lora_B))
    return KernelCall(lambda: forward_op(*forward_args), tensor_bytes(x, weight, lora_A, lora_B, xa, y))


def _lora_multi_workload(seq_len: int, dtype: torch.dtype, device: torch.device) -> Workload:
    """Ours: pyfastpeft.functional.lora_linear_multi. Reference: PEFT's mixed-batch forward (LoraLayer.
    _mixed_batch_forward): F.linear for the base, then per adapter its sequences through dropout, lora_A and
    lora_B in eager PyTorch, added into the base output at those sequences."""
    x, weight, adapters, adapter_ids = _lora_multi_inputs(seq_len, dtype, device)
    scaling = LORA_ALPHA / LORA_MULTI_RANK
    sequences = [(adapter_ids == adapter).nonzero().view(-1) for adapter in range(LORA_MULTI_ADAPTERS)]

    def reference():
        result = F.linear(x, weight)
        for (lora_A, lora_B), rows in zip(adapters, sequences):
            dropped = F.dropout(x[rows], LORA_MULTI_DROPOUT, training=True)
            result[rows] += F.linear(F.linear(dropped, lora_A), lora_B) * scaling
        return result
    packed = [(lora_A, lora_B, scaling) for lora_A, lora_B in adapters]
    leaves = (x, *[t for adapter in adapters for t in adapter])
    kernel = functools.partial(_lora_multi_kernel, seq_len, dtype, device)
    return Workload(
        ours=Implementation(lambda: pyfastpeft.functional.lora_linear_multi(x, weight, None, packed, adapter_ids,
                                                                            LORA_MULTI_DROPOUT, training=True), leaves),
        reference=Implementation(reference, leaves),
        kernels={"forward": functools.partial(kernel, False), "backward": functools.partial(kernel, True)})


def lora_multi_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    """fwd + bwd only: a multi-adapter batch is a training step here."""
    seq_len = LORA_MULTI_SEQ_LEN[quick]
    shape = (f"8 adapters mixed M={LORA_MULTI_SEQUENCES * seq_len} ({LORA_MULTI_SEQUENCES}x{seq_len}) "
             f"{HIDDEN}x{HIDDEN} r={LORA_MULTI_RANK} p={LORA_MULTI_DROPOUT}")
    return [Case("lora", shape, dtype, "both", "eager PEFT mixed batch: per adapter, its rows through dropout + "
                 "two linears", functools.partial(_lora_multi_workload, seq_len, dtype)) for dtype in dtypes]


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


# ---- Fused linear cross-entropy: lm_head + loss, hidden [tokens, 4096], weight [32000, 4096] (Llama-2's vocab) ----

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
    bias = hidden.new_empty(0)
    if backward:
        grad_hidden = torch.randn_like(hidden)
        grad_weight = torch.randn_like(weight) if train_weight else weight.new_empty(0)
        grad_loss = torch.ones((), device=device)
        return KernelCall(lambda: (grad_hidden * grad_loss, grad_weight * grad_loss),
                          2 * tensor_bytes(grad_hidden, grad_weight))
    call = lambda: flce_ops.flce_forward(hidden, weight, labels, bias, -100, 0.0, 0.0, 1, True,  # noqa: E731
                                         train_weight, False, 0)
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
        kernels={"forward": functools.partial(kernel, False), "backward": functools.partial(kernel, True)})


def flce_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    tokens = FLCE_TOKENS[quick]
    return [Case("flce", f"T={tokens} H={HIDDEN} V={VOCAB} W {'trained' if train else 'frozen'}", dtype, "both",
                 "transformers: F.linear, then F.cross_entropy in fp32",
                 functools.partial(_flce_workload, tokens, train, dtype))
            for train in (False, True) for dtype in dtypes]


# ---- model: one training step of a Llama-shaped LlamaForCausalLM, pyfastpeft vs transformers + PEFT ------------
# A step is: forward with labels -> loss, backward, AdamW on the trainable (adapter) parameters, zero_grad. Both
# sides start from the same random weights and adapters and train on the same token batch. Ours is
# pyfastpeft.prepare_model (NF4 or dense frozen base, fused LoRA, our RMSNorm/SwiGLU/RoPE, the loss through
# fused_linear_cross_entropy); the reference is PEFT's LoRA over the transformers model, its base either dense or
# bitsandbytes Linear4bit (NF4, double quantization), as a QLoRA user builds it.

@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A LlamaForCausalLM's sizes (heads: query / key-value) and the batch of token ids one step trains on."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    batch: int = 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        return (f"L={self.layers} H={self.hidden} I={self.intermediate} heads={self.heads}/{self.kv_heads} "
                f"V={self.vocab} B={self.batch} S={self.seq_len}")

    def config(self) -> LlamaConfig:
        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                           max_position_embeddings=self.seq_len, rms_norm_eps=RMSNORM_EPS)


@dataclasses.dataclass(frozen=True)
class ModelComparison:
    """Which pair a case times; the names are the ones its shape label shows."""
    ours: str  # "QLoRA" or "LoRA": what prepare_model makes
    reference: str  # "bnb QLoRA" (bitsandbytes NF4 base) or "dense LoRA"

    @property
    def quant(self) -> str | None:
        return "nf4" if self.ours == "QLoRA" else None

    @property
    def reference_quantized(self) -> bool:
        return self.reference == "bnb QLoRA"


MODEL_SHAPES = {False: ModelShape(1024, 2816, 4, 16, 4, VOCAB, 512), True: ModelShape(1024, 2816, 2, 16, 4, VOCAB, 256)}
# One decoder layer of Llama-2-7B's shape with its embeddings and output layer.
MODEL_7B_LAYER = {False: ModelShape(HIDDEN, INTERMEDIATE, 1, Q_HEADS, KV_HEADS, VOCAB, 512),
                  True: ModelShape(HIDDEN, INTERMEDIATE, 1, Q_HEADS, KV_HEADS, VOCAB, 128)}
QLORA_VS_BNB = ModelComparison("QLoRA", "bnb QLoRA")
QLORA_VS_DENSE = ModelComparison("QLoRA", "dense LoRA")
LORA_VS_DENSE = ModelComparison("LoRA", "dense LoRA")
MODEL_LORA = LoraSettings(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
MODEL_LEARNING_RATE = 2e-4
MODEL_REFERENCE = "transformers LlamaForCausalLM + PEFT LoRA, base dense or bitsandbytes NF4 as the case says"
MODEL_SEED = 0
# prepare_model's RoPE patch swaps modeling_llama.apply_rotary_pos_emb module-wide, for every Llama in the
# process, the reference included: the reference's steps put transformers' own back while they run.
TRANSFORMERS_APPLY_ROTARY_POS_EMB = modeling_llama.apply_rotary_pos_emb


@contextlib.contextmanager
def transformers_rope():
    """modeling_llama.apply_rotary_pos_emb is transformers' own inside, whatever patch_model did around it."""
    original = TRANSFORMERS_APPLY_ROTARY_POS_EMB
    if original.__module__ != modeling_llama.__name__:
        raise RuntimeError("pyfastpeft.bench.cases was imported after a Llama model was patched: it cannot tell "
                           "transformers' apply_rotary_pos_emb from pyfastpeft's")
    current = modeling_llama.apply_rotary_pos_emb
    modeling_llama.apply_rotary_pos_emb = original
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = current


class TrainingStep:
    """One training step of a causal LM on a fixed batch (labels = the inputs): forward -> loss, backward,
    AdamW on the parameters that require grad, zero_grad, all inside `context()`. A call returns the loss,
    detached; first_loss keeps the loss of the first call (the untrained model's)."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model = model.train()
        self.input_ids = input_ids
        self.context = context
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=MODEL_LEARNING_RATE)
        self.first_loss: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        with self.context():
            loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if self.first_loss is None:
            self.first_loss = loss
        return loss


def _bench_device() -> torch.device:
    """The device python -m pyfastpeft.bench runs on: the GPU when one is visible."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bitsandbytes_4bit_unusable(device: torch.device) -> str | None:
    """None if bitsandbytes imports and a tiny Linear4bit (NF4) runs forward and backward on device; else why not."""
    try:
        import bitsandbytes

        layer = bitsandbytes.nn.Linear4bit(64, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        if not bool(torch.isfinite(x.grad).all()):
            return "bitsandbytes' Linear4bit gave a non-finite gradient"
    except Exception as error:  # noqa: BLE001 - any failure means the reference cannot run here
        return f"bitsandbytes' Linear4bit does not run on {device.type}: {type(error).__name__}: {error}"
    return None


def _bitsandbytes_4bit(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace, in place, every nn.Linear but the output layer by bitsandbytes' Linear4bit (NF4, double
    quantization, compute in the model's dtype), as transformers' BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype) loads it."""
    import bitsandbytes

    output_layer = model.get_output_embeddings()
    linears = [(path, module) for path, module in model.named_modules()
               if type(module) is torch.nn.Linear and module is not output_layer]
    for path, linear in linears:
        quantized = bitsandbytes.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                               compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        quantized.weight = bitsandbytes.nn.Params4bit(linear.weight.data, requires_grad=False,
                                                      compress_statistics=True, quant_type="nf4")
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, quantized.to(linear.weight.device))
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps the layers in its bnb LoRA layer


def model_training_steps(shape: ModelShape, comparison: ModelComparison, dtype: torch.dtype,
                         device: torch.device) -> tuple[TrainingStep, TrainingStep]:
    """(ours, reference): the same random LlamaForCausalLM twice, one through prepare_model, one through PEFT
    (after bitsandbytes 4-bit quantization where the comparison says so), the reference's adapters set to ours'
    initial values, each with its AdamW over the same token batch. Neither has stepped yet. The reference steps
    with transformers' RoPE (transformers_rope); pyfastpeft.unpatch_model(ours.model) undoes ours' patches."""
    import peft

    torch.manual_seed(MODEL_SEED)
    ours = modeling_llama.LlamaForCausalLM(shape.config()).to(device=device, dtype=dtype)
    reference = copy.deepcopy(ours)
    prepare_model(ours, quant=comparison.quant, lora=MODEL_LORA)
    if comparison.reference_quantized:
        _bitsandbytes_4bit(reference, dtype)
    config = peft.LoraConfig(r=MODEL_LORA.r, lora_alpha=MODEL_LORA.lora_alpha, lora_dropout=MODEL_LORA.lora_dropout,
                             target_modules=MODEL_LORA.target_modules, use_rslora=MODEL_LORA.use_rslora)
    reference = peft.get_peft_model(reference, config)
    our_adapters = {name: tensor for name, tensor in ours.state_dict().items() if ".lora_" in name}
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            if ".lora_" in name:
                tensor.copy_(our_adapters[name.removeprefix("base_model.model.")])
    generator = torch.Generator().manual_seed(MODEL_SEED)
    input_ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=generator).to(device)
    return TrainingStep(ours, input_ids), TrainingStep(reference, input_ids, transformers_rope)


def _model_workload(shape: ModelShape, comparison: ModelComparison, dtype: torch.dtype,
                    device: torch.device) -> Workload:
    """Both sides take one warm-up step here, so AdamW's state exists before anything is timed or measured:
    peak memory is then that of a steady-state step on both sides. No single kernel stands for a step."""
    ours, reference = model_training_steps(shape, comparison, dtype, device)
    ours()
    reference()
    return Workload(ours=Implementation(ours, ours.parameters), reference=Implementation(reference, reference.parameters),
                    kernels={})


def model_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    """Mode "forward": the closure timed is the whole training step. On the Llama-shaped model: ours QLoRA vs
    PEFT over bitsandbytes NF4 (only where bitsandbytes' Linear4bit works on the bench device; a printed note
    says why it is left out), ours QLoRA vs PEFT over the dense base, ours LoRA vs PEFT LoRA (both dense); on
    the 7B-shaped layer (bf16 only): ours QLoRA vs PEFT over the dense base."""
    if importlib.util.find_spec("peft") is None:
        print("model: cases left out: PEFT (the reference) is not installed")
        return []
    comparisons = [QLORA_VS_BNB, QLORA_VS_DENSE, LORA_VS_DENSE]
    unusable = bitsandbytes_4bit_unusable(_bench_device())
    if unusable:
        print(f"model: case {QLORA_VS_BNB.ours} vs PEFT {QLORA_VS_BNB.reference} left out: {unusable}")
        comparisons.remove(QLORA_VS_BNB)
    runs = [(MODEL_SHAPES[quick], comparison, dtype) for comparison in comparisons for dtype in dtypes]
    # The 7B-shaped layer in bf16 only (what QLoRA trains in): its fp32 step measured two to five times slower
    # than the bf16 one on 2 CPU cores, and a run takes a dozen steps per side (at seq 512 in the full run).
    runs += [(MODEL_7B_LAYER[quick], QLORA_VS_DENSE, dtype) for dtype in dtypes if dtype == torch.bfloat16]
    return [Case("model", f"train step {comparison.ours} vs PEFT {comparison.reference} {shape.label}", dtype,
                 "forward", MODEL_REFERENCE, functools.partial(_model_workload, shape, comparison, dtype),
                 tokens=shape.tokens)
            for shape, comparison, dtype in runs]


FAMILIES: dict[str, FamilyCases] = {"rmsnorm": rmsnorm_cases, "swiglu": swiglu_cases, "rope": rope_cases,
                                    "nf4": nf4_cases, "int8": int8_cases, "quantize": quantize_cases,
                                    "lora": lora_cases, "flce": flce_cases, "model": model_cases}


def select_cases(families: Sequence[str], dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    return [case for family in families for case in FAMILIES[family](dtypes, quick)]
