"""LoRA benchmark cases: y = x W^T + s * dropout(x) A^T B^T over a dense or NF4 base, training; multi-adapter
batches."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import pyfastpeft
from pyfastpeft.bench.cases._common import HIDDEN, INTERMEDIATE, tensor_bytes
from pyfastpeft.bench.harness import MODES, Case, CaseSkipped, Goal, Implementation, KernelCall, Workload
from pyfastpeft.ops import lora as lora_ops
from pyfastpeft.ops import lora_multi as lora_multi_ops
from pyfastpeft.ops import nf4 as nf4_ops

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


def _lora_rng(dropout_p: float, device) -> torch.Tensor | None:
    if dropout_p > 0:
        return torch.randint(0, lora_ops.SEED_HIGH, (2,), device=device)
    return None


def _lora_kernel(
    rows: int, out_features: int, in_features: int, rank: int, dropout_p: float, dtype, device, backward: bool
) -> KernelCall:
    """The native op: forward reads x, W, A, B and writes y, xa [M, r]; backward reads dY, x, W, A, B, xa and
    writes dX, dA, dB. The GEMMs are torch's, so this is compute-bound: the bandwidth figure is a floor."""
    x, weight, lora_A, lora_B = _lora_tensors(rows, out_features, in_features, rank, dtype, device)
    rng, scaling, bias = _lora_rng(dropout_p, device), LORA_ALPHA / rank, None
    xa = torch.randn(rows, rank, dtype=dtype, device=device)
    if backward:
        dy = torch.randn(rows, out_features, dtype=dtype, device=device)
        call = lambda: lora_ops.lora_backward(
            dy,
            x,
            weight,
            lora_A,
            lora_B,
            xa,
            scaling,
            dropout_p,  # noqa: E731
            rng,
            True,
        )
        return KernelCall(call, tensor_bytes(dy, x, weight, lora_A, lora_B, xa) + tensor_bytes(x, lora_A, lora_B))
    call = lambda: lora_ops.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng)  # noqa: E731
    return KernelCall(call, tensor_bytes(x, weight, lora_A, lora_B, xa) + rows * out_features * x.element_size())


def _lora_workload(
    rows: int,
    out_features: int,
    in_features: int,
    rank: int,
    dropout_p: float,
    dtype: torch.dtype,
    device: torch.device,
) -> Workload:
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
        ours=Implementation(
            lambda: pyfastpeft.functional.lora_linear(
                x, weight, None, lora_A, lora_B, scaling, dropout_p, training=True
            ),
            leaves,
        ),
        reference=Implementation(reference, leaves),
        kernels={"forward": functools.partial(kernel, False), "backward": functools.partial(kernel, True)},
    )


class _EagerNF4Linear(torch.autograd.Function):
    """The eager QLoRA base as bitsandbytes runs it on CPU: dequantize W in PyTorch, matmul; backward
    dequantizes again for dX (no dW), so no dense W outlives either pass."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, blocksize: int, out_features: int, in_features: int):
        from pyfastpeft.reference import nf4 as nf4_reference

        ctx.save_for_backward(packed, absmax, code)
        ctx.meta = (blocksize, out_features, in_features)
        return nf4_reference.nf4_linear(x, packed, absmax, code, None, blocksize, out_features, in_features)

    @staticmethod
    def backward(ctx, dy):
        from pyfastpeft.reference import nf4 as nf4_reference

        packed, absmax, code = ctx.saved_tensors
        return (
            nf4_reference.nf4_linear_grad_input(dy, packed, absmax, code, *ctx.meta),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _lora_variant_workload(
    variant: str,
    rows: int,
    out_features: int,
    in_features: int,
    rank: int,
    dropout_p: float,
    dtype: torch.dtype,
    device: torch.device,
) -> Workload:
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
    ours = functools.partial(
        pyfastpeft.functional.lora_linear, x, base, None, lora_A, lora_B, scaling, dropout_p, training=True
    )
    if variant == "base":
        reference = functools.partial(F.linear, x, weight)
    elif variant == "dense":
        reference = functools.partial(
            pyfastpeft.functional.lora_linear, x, weight, None, lora_A, lora_B, scaling, dropout_p, training=True
        )
    else:
        absmax, code = state.dequantized_absmax(), state.code.float()

        def reference():
            dropped = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
            y = _EagerNF4Linear.apply(x, packed, absmax, code, 64, out_features, in_features)
            return y + F.linear(F.linear(dropped, lora_A), lora_B) * scaling

    make_kernel = _lora_kernel if variant == "base" else _qlora_kernel  # ours: over the dense or the NF4 base
    kernel = functools.partial(make_kernel, rows, out_features, in_features, rank, dropout_p, dtype, device)
    return Workload(
        ours=Implementation(ours, leaves),
        reference=Implementation(reference, leaves),
        kernels={"forward": functools.partial(kernel, False), "backward": functools.partial(kernel, True)},
    )


def _qlora_kernel(
    rows: int, out_features: int, in_features: int, rank: int, dropout_p: float, dtype, device, backward: bool
) -> KernelCall:
    """The native op over an NF4 base (blocksize 64): forward reads x, the packed W and its absmax, A, B and writes
    y, xa; backward reads dY, x, packed W, absmax, A, B, xa and writes dX, dA, dB. A forward of a few rows is a
    decode step as the LoRA layer runs it without gradients (lora_nf4_no_grad: its test of the arguments, then
    the one kernel of the fused dequant-GEMV and the rank-r branch, no xa kept), bound by the packed weight's bytes."""
    from pyfastpeft.quant import quantize_nf4

    x, weight, lora_A, lora_B = _lora_tensors(rows, out_features, in_features, rank, dtype, device)
    packed, state = quantize_nf4(weight, 64, True)
    absmax, code = state.dequantized_absmax(), state.code.float()
    nf4_base = (packed, absmax, code)
    shape_args = (64, out_features, in_features)
    rng, scaling, bias = _lora_rng(dropout_p, device), LORA_ALPHA / rank, None
    xa = torch.randn(rows, rank, dtype=dtype, device=device)
    if backward:
        dy = torch.randn(rows, out_features, dtype=dtype, device=device)
        args = (dy, x, *nf4_base, lora_A, lora_B, xa, *shape_args, scaling, dropout_p, rng, True)
        call = lambda: lora_ops.lora_nf4_backward(*args)  # noqa: E731
        written = tensor_bytes(x, lora_A, lora_B)
        return KernelCall(call, tensor_bytes(dy, x, *nf4_base, lora_A, lora_B, xa) + written)
    args = (x, *nf4_base, bias, lora_A, lora_B, *shape_args, scaling, dropout_p, rng)
    if rows <= nf4_ops.GEMV_MAX_ROWS:
        call = lambda: lora_ops.lora_nf4_no_grad(*args)  # noqa: E731
        return KernelCall(call, tensor_bytes(x, *nf4_base, lora_A, lora_B) + rows * out_features * x.element_size())
    call = lambda: lora_ops.lora_nf4_forward(*args)  # noqa: E731
    return KernelCall(call, tensor_bytes(x, *nf4_base, lora_A, lora_B, xa) + rows * out_features * x.element_size())


LORA_VARIANTS = (
    ("base", "the frozen base layer alone (F.linear): LoRA's overhead"),
    ("qlora", "eager QLoRA: PyTorch dequantize + matmul (again in backward) + PEFT's LoRA branch"),
    ("dense", "our LoRA layer over the dense weight: the cost of the NF4 base"),
)


def _lora_variant_goals(variant: str, rows: int, dtype: torch.dtype) -> tuple[Goal, ...]:
    """This CPU's targets: LoRA fwd+bwd within 1.05x the base layer's time; the QLoRA layer >= 1.5x eager QLoRA and,
    with bf16 activations, within 1.10x our dense-bf16 LoRA layer (dequantization nearly free); decode QLoRA at
    >= 70% of copy bandwidth on the packed weights."""
    if variant == "qlora":
        return (Goal("copy", 0.7),) if rows == 1 else (Goal("speedup", 1.5),)
    if variant == "base":
        return (Goal("time", 1.05),)
    return (Goal("time", 1.10),) if dtype == torch.bfloat16 else ()


def _qlora_inference_workload(
    rows: int, out_features: int, in_features: int, rank: int, dtype: torch.dtype, device: torch.device
) -> Workload:
    """Ours: pyfastpeft.nn.LoRALinear over Linear4bit at inference (eval, gradients off): a decode step. Reference:
    its Linear4bit base alone, the same way: the ratio is what an adapter left unmerged costs at decode."""
    from pyfastpeft.nn import Linear4bit, LoRALinear

    linear = torch.nn.Linear(in_features, out_features, bias=False, device=device)
    base = Linear4bit.from_linear(linear, compute_dtype=dtype).requires_grad_(False)
    layer = LoRALinear(base, r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.05).eval()
    with torch.no_grad():  # a trained adapter: B is not the zeros PEFT initializes it to
        layer.lora_B["default"].weight.normal_(0.0, 0.01)
    x = torch.randn(rows, in_features, dtype=dtype, device=device)

    def inferred(module):
        with torch.no_grad():
            return module(x)

    return Workload(
        ours=Implementation(functools.partial(inferred, layer), ()),
        reference=Implementation(functools.partial(inferred, base), ()),
        kernels={},
    )


def lora_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    rows = LORA_ROWS[quick]
    cases = [
        Case(
            "lora",
            f"M={rows} {out_features}x{in_features} r={rank} p={dropout_p}",
            dtype,
            mode,
            "eager PEFT: F.linear + dropout + two linears",
            functools.partial(_lora_workload, rows, out_features, in_features, rank, dropout_p, dtype),
            # headline: the README's row (its fp32 twin takes 90 s on 2 cores)
            headline=not quick
            and (out_features, rank, dropout_p, mode, dtype) == (INTERMEDIATE, 16, 0.05, "both", torch.bfloat16),
        )
        for out_features, in_features in LORA_WEIGHTS[quick]
        for rank in LORA_RANKS[quick]
        for dropout_p in LORA_DROPOUT[quick]
        for dtype in dtypes
        for mode in MODES
    ]
    for variant, name in LORA_VARIANTS:
        for variant_rows in (rows, 1) if variant == "qlora" else (rows,):  # decode: QLoRA at one row
            modes = ("forward",) if variant_rows == 1 else ("both",)
            cases += [
                Case(
                    "lora",
                    f"{variant} M={variant_rows} {HIDDEN}x{HIDDEN} r=16 p=0.05",
                    dtype,
                    mode,
                    name,
                    functools.partial(_lora_variant_workload, variant, variant_rows, HIDDEN, HIDDEN, 16, 0.05, dtype),
                    goals=_lora_variant_goals(variant, variant_rows, dtype),
                    headline=not quick and (variant_rows == 1 or dtype == torch.bfloat16),
                )
                for dtype in dtypes
                for mode in modes
            ]
    cases += [
        Case(
            "lora",
            f"qlora layer inference M=1 {HIDDEN}x{HIDDEN} r=16",
            dtype,
            "forward",
            "the Linear4bit base alone: what an unmerged adapter costs at decode",
            functools.partial(_qlora_inference_workload, 1, HIDDEN, HIDDEN, 16, dtype),
            headline=not quick,
        )
        for dtype in dtypes
    ]
    return cases + lora_multi_cases(dtypes, quick) + lora_experts_cases(dtypes, quick)


# ---- multi-adapter LoRA: 8 adapters in one batch, each on two of the 16 sequences -------------------------

LORA_MULTI_SEQUENCES, LORA_MULTI_ADAPTERS, LORA_MULTI_RANK, LORA_MULTI_DROPOUT = 16, 8, 16, 0.05
LORA_MULTI_SEQ_LEN = {False: 128, True: 16}  # 2048 tokens (256 quick)


def _lora_multi_inputs(seq_len: int, dtype, device):
    """x [16, seq_len, K] and 8 adapters (A, B) needing grads, frozen W [N, K] (N = K = hidden), and the
    adapter of each sequence: every adapter on two sequences, in shuffled order."""
    rows = LORA_MULTI_SEQUENCES * seq_len
    x, weight, _, _ = _lora_tensors(rows, HIDDEN, HIDDEN, LORA_MULTI_RANK, dtype, device)
    x = x.view(LORA_MULTI_SEQUENCES, seq_len, HIDDEN).requires_grad_()
    adapters = [
        _lora_tensors(1, HIDDEN, HIDDEN, LORA_MULTI_RANK, dtype, device, True)[2:] for _ in range(LORA_MULTI_ADAPTERS)
    ]
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
    rng, bias = _lora_rng(LORA_MULTI_DROPOUT, device), None
    forward_op, backward_op = lora_multi_ops.MULTI_BASE_OPS["dense"]
    forward_args = (
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        rank_offsets,
        scalings,
        row_adapter,
        LORA_MULTI_RANK,
        LORA_MULTI_DROPOUT,
        rng,
    )
    y, xa, row_order, segment_offsets = forward_op(*forward_args)
    if backward:
        dy = torch.randn_like(y)
        call = lambda: backward_op(
            dy,
            x,
            weight,
            lora_A,
            lora_B,
            rank_offsets,
            scalings,
            xa,
            row_order,  # noqa: E731
            segment_offsets,
            LORA_MULTI_DROPOUT,
            rng,
            True,
        )
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
        ours=Implementation(
            lambda: pyfastpeft.functional.lora_linear_multi(
                x, weight, None, packed, adapter_ids, LORA_MULTI_DROPOUT, training=True
            ),
            leaves,
        ),
        reference=Implementation(reference, leaves),
        kernels={"forward": functools.partial(kernel, False), "backward": functools.partial(kernel, True)},
    )


def lora_multi_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    """fwd + bwd only: a multi-adapter batch is a training step here."""
    seq_len = LORA_MULTI_SEQ_LEN[quick]
    shape = (
        f"8 adapters mixed M={LORA_MULTI_SEQUENCES * seq_len} ({LORA_MULTI_SEQUENCES}x{seq_len}) "
        f"{HIDDEN}x{HIDDEN} r={LORA_MULTI_RANK} p={LORA_MULTI_DROPOUT}"
    )
    return [
        Case(
            "lora",
            shape,
            dtype,
            "both",
            "eager PEFT mixed batch: per adapter, its rows through dropout + two linears",
            functools.partial(_lora_multi_workload, seq_len, dtype),
        )
        for dtype in dtypes
    ]


# ---- LoRA on MoE experts (transformers 5.x 3-D expert weights, PEFT's target_parameters) ---------------------------

EXPERTS = 8
EXPERTS_TOP_K = 2
EXPERTS_HIDDEN = {False: 1024, True: 512}  # Mixtral's shape scaled down (4096 / 14336 per expert) to fit a CPU run
EXPERTS_INNER = {False: 3584, True: 1792}
EXPERTS_TOKENS = {False: 512, True: 128}
EXPERTS_RANK = 16


def _experts_block(hidden: int, inner: int, dtype, device):
    """A transformers 5.x experts block (use_experts_implementation, Mixtral's layout [E, out, in]); None where
    transformers has no such blocks."""
    try:
        from transformers import PretrainedConfig
        from transformers.integrations.moe import grouped_mm_experts_forward, use_experts_implementation
    except ImportError:
        return None

    @use_experts_implementation
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = EXPERTS
            self.gate_up_proj = torch.nn.Parameter(torch.randn(EXPERTS, 2 * inner, hidden) * hidden**-0.5)
            self.down_proj = torch.nn.Parameter(torch.randn(EXPERTS, hidden, inner) * inner**-0.5)
            self.act_fn = torch.nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):  # transformers 5.x default: grouped_mm
            return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    return Experts(PretrainedConfig()).to(device=device, dtype=dtype).requires_grad_(False)


def _lora_experts_workload(tokens: int, hidden: int, inner: int, dtype, device) -> Workload:
    """Ours: pyfastpeft.nn.LoRAExperts (each expert's low-rank path on its routed tokens). Reference: what PEFT's
    ParamWrapper computes for the same adapters: W_e + s B_e A_e folded into every expert's weight each forward
    (one batched product per projection, as PEFT's _LoraFactorsProxy), then the block's own transformers
    forward."""
    from pyfastpeft.nn.experts import LoRAExperts, experts_layout_problem

    block = _experts_block(hidden, inner, dtype, device)
    problem = experts_layout_problem(block)
    if problem is not None:  # a transformers 5.x before the layout flags: LoRAExperts refuses its block
        import transformers

        raise CaseSkipped(f"transformers {transformers.__version__}: {problem}")
    ranks = {"gate_up_proj": 2 * EXPERTS_RANK, "down_proj": EXPERTS_RANK}
    ours = LoRAExperts(block, ranks, {name: 2.0 * rank for name, rank in ranks.items()})
    with torch.no_grad():
        for name in ours.projections:
            ours.lora_B[name].normal_(std=0.01)
    x = torch.randn(tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    router = torch.randn(tokens, EXPERTS, device=device)
    top_k_weights, top_k_index = torch.topk(router.softmax(-1), EXPERTS_TOP_K, dim=-1)
    top_k_weights = top_k_weights.to(dtype)
    leaves = (x, *[ours.lora_A[name] for name in ours.projections], *[ours.lora_B[name] for name in ours.projections])

    def reference():
        merged = {}
        for name in ours.projections:
            lora_A = ours.lora_A[name].view(EXPERTS, ours.r[name], -1).to(dtype)  # (E, r, in)
            lora_B = ours.lora_B[name].view(-1, ours.r[name], EXPERTS).permute(2, 0, 1).to(dtype)  # (E, out, r)
            merged[name] = torch.baddbmm(getattr(block, name), lora_B, lora_A, alpha=ours.scaling[name])
        return torch.func.functional_call(block, merged, (x, top_k_index, top_k_weights))

    return Workload(
        ours=Implementation(lambda: ours(x, top_k_index, top_k_weights), leaves),
        reference=Implementation(reference, leaves),
        kernels={},
    )


def lora_experts_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    """A training step (fwd + bwd) of one MoE experts block with LoRA on gate_up_proj and down_proj."""
    if _experts_block(8, 8, torch.float32, "cpu") is None:
        return []
    tokens, hidden, inner = EXPERTS_TOKENS[quick], EXPERTS_HIDDEN[quick], EXPERTS_INNER[quick]
    return [
        Case(
            "lora",
            f"experts E={EXPERTS} top{EXPERTS_TOP_K} T={tokens} {hidden}x{inner} r={EXPERTS_RANK}",
            dtype,
            "both",
            "PEFT ParamWrapper's math: W + s B A for every expert each forward, then the transformers block",
            functools.partial(_lora_experts_workload, tokens, hidden, inner, dtype),
        )
        for dtype in dtypes
    ]
