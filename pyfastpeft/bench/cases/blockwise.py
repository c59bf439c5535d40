"""8-bit blockwise benchmark cases: one optimizer step of pyfastpeft.optim.AdamW8bit against torch's AdamW (fused,
as transformers' Trainer builds it) and bitsandbytes' AdamW8bit, over a 4096x4096 weight and over the LoRA adapters of
Llama-2-7B; and the blockwise quantizer against its eager formula."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from pyfastpeft.bench.cases._common import HIDDEN, INTERMEDIATE, tensor_bytes
from pyfastpeft.bench.harness import Case, CaseSkipped, Goal, Implementation, KernelCall, Workload
from pyfastpeft.ops import blockwise as blockwise_ops
from pyfastpeft.reference import blockwise as blockwise_reference

LORA_RANK = 16
LORA_LAYERS = {False: 32, True: 2}  # quick -> decoder layers whose adapters one step updates
FULL_WEIGHT = {False: (HIDDEN, HIDDEN), True: (1024, HIDDEN)}
# The reference is the AdamW a Trainer user steps with by default (optim="adamw_torch_fused" from torch 2.8): one fused
# pass, fp32 states. The target: no slower than it on fp32 parameters (the 8-bit step moves 16 bytes an element against
# its 28, so a step bound by memory would be 1.75x faster). On bf16 parameters torch keeps bf16 states (half the bytes
# of fp32 ones): those cases are measured, not held to it.
OPTIMIZER_GOALS = {torch.float32: (Goal("speedup", 1.0),)}
TORCH_ADAMW = "torch.optim.AdamW (fused, as Trainer's default; states in the parameter dtype)"


def lora_shapes(layers: int) -> list[tuple[int, int]]:
    """A [r, in] and B [out, r] of q, k, v, o, gate, up, down in each of `layers` Llama-2-7B decoder layers."""
    projections = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTERMEDIATE)] * 2 + [(INTERMEDIATE, HIDDEN)]
    return [shape for _ in range(layers) for i, o in projections for shape in ((LORA_RANK, i), (o, LORA_RANK))]


def _parameters(shapes, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def _bitsandbytes_adamw8bit(device: torch.device):
    try:
        import bitsandbytes

        probe = _parameters([(64, 64)], torch.float32, device)
        bitsandbytes.optim.AdamW8bit(probe, min_8bit_size=0).step()
    except Exception as error:  # noqa: BLE001 - any failure means the reference cannot run here
        raise CaseSkipped(f"bitsandbytes' AdamW8bit does not run on {device.type}: {type(error).__name__}") from None
    return bitsandbytes.optim.AdamW8bit


def _step_kernel(n: int, dtype, device) -> KernelCall:
    """One adam8bit_step over n parameters: reads p, g, both states and absmax; writes p, states, absmax."""
    p = torch.randn(n, device=device).to(dtype)
    g = (torch.randn(n, device=device) * 1e-3).to(dtype)
    states = [torch.zeros(n, dtype=torch.uint8, device=device) for _ in range(2)]
    absmax = [torch.zeros(-(-n // 256), device=device) for _ in range(2)]
    maps = (blockwise_reference.SIGNED_MAP.to(device), blockwise_reference.UNSIGNED_MAP.to(device))
    return KernelCall(
        lambda: blockwise_ops.adam8bit_step(
            p, g, states[0], states[1], absmax[0], absmax[1], *maps, -1e-3, 1e-8, 0.9, 0.999, 1.0 - 1e-5
        ),
        tensor_bytes(p, g, *states, *absmax),
    )


def _optimizer_workload(shapes, reference: str, dtype, device) -> Workload:
    """Ours: AdamW8bit.step() over parameters whose .grad is set. Reference: torch.optim.AdamW(fused=True) with
    states in the parameters' dtype, or bitsandbytes' AdamW8bit, over their own copies of the same parameters and
    gradients."""
    from pyfastpeft.optim import AdamW8bit

    ours_params = _parameters(shapes, dtype, device)
    reference_params = _parameters(shapes, dtype, device)
    ours = AdamW8bit(ours_params, lr=1e-4, min_8bit_size=0)
    if reference == "torch":
        theirs = torch.optim.AdamW(reference_params, lr=1e-4, fused=True)
    else:
        theirs = _bitsandbytes_adamw8bit(device)(reference_params, lr=1e-4, min_8bit_size=0)
    largest = max(shapes, key=lambda shape: shape[0] * shape[1])
    return Workload(
        ours=Implementation(ours.step, ()),
        reference=Implementation(theirs.step, ()),
        kernels={"forward": functools.partial(_step_kernel, largest[0] * largest[1], dtype, device)}
        if device.type == "cpu"
        else {},
    )


def _quantize_kernel(shape, dtype, device) -> KernelCall:
    x = torch.randn(shape, device=device).to(dtype)
    codes = torch.empty(shape, dtype=torch.uint8, device=device)
    return KernelCall(
        lambda: blockwise_ops.blockwise_quantize(x, blockwise_reference.SIGNED_MAP, 4096),
        tensor_bytes(x, codes),
    )


def _quantize_workload(shape, dtype, device) -> Workload:
    """Ours: pyfastpeft.quant.quantize_blockwise (signed dynamic map, blocksize 4096). Reference: its formula in
    eager PyTorch (bitsandbytes' pure-PyTorch backend computes the same)."""
    from pyfastpeft.quant import quantize_blockwise

    x = torch.randn(shape, device=device).to(dtype)
    code = blockwise_reference.SIGNED_MAP.to(device)
    return Workload(
        ours=Implementation(lambda: quantize_blockwise(x, code, 4096), ()),
        reference=Implementation(lambda: blockwise_reference.quantize(x, code, 4096), ()),
        kernels={"forward": functools.partial(_quantize_kernel, shape, dtype, device)} if device.type == "cpu" else {},
    )


def blockwise_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    rows, cols = FULL_WEIGHT[quick]
    layers = LORA_LAYERS[quick]
    adapters = lora_shapes(layers)
    cases = []
    for dtype in dtypes:
        cases += [
            Case(
                "blockwise",
                f"AdamW8bit step {rows}x{cols}",
                dtype,
                "forward",
                TORCH_ADAMW,
                functools.partial(_optimizer_workload, [(rows, cols)], "torch", dtype),
                goals=OPTIMIZER_GOALS.get(dtype, ()),
                headline=not quick,
            ),
            Case(
                "blockwise",
                f"AdamW8bit step LoRA r={LORA_RANK} {layers} layers ({len(adapters)} tensors)",
                dtype,
                "forward",
                TORCH_ADAMW,
                functools.partial(_optimizer_workload, adapters, "torch", dtype),
                goals=OPTIMIZER_GOALS.get(dtype, ()),
                headline=not quick,
            ),
            Case(
                "blockwise",
                f"AdamW8bit step {rows}x{cols} vs bnb",
                dtype,
                "forward",
                "bitsandbytes AdamW8bit",
                functools.partial(_optimizer_workload, [(rows, cols)], "bitsandbytes", dtype),
            ),
            Case(
                "blockwise",
                f"quantize_blockwise {rows}x{cols}",
                dtype,
                "forward",
                "eager PyTorch (the formula of bnb's pure-PyTorch backend)",
                functools.partial(_quantize_workload, (rows, cols), dtype),
            ),
        ]
    return cases
