"""Benchmark cases of the fine-tuning methods beside plain LoRA, training: DoRA's layer against PEFT's DoRA layer,
one training step of a Llama-shaped model per method (prompt and prefix tuning included) against transformers +
PEFT with the same method, and the
bottleneck adapter against the eager adapter (two nn.Linear, the activation, the scale and the residual add).

The layer's reference is PEFT's own peft.tuners.lora.Linear with use_dora=True, as get_peft_model builds it over a
frozen base: adapters and magnitude in fp32 over a bf16 base (PEFT's autocast_adapter_dtype), in the base's dtype
over an fp32 one. Ours is pyfastpeft.nn.LoRALinear(use_dora=True) holding the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
from collections.abc import Sequence

import torch
from torch import nn

from pyfastpeft.bench.cases._common import HIDDEN
from pyfastpeft.bench.cases.model import (
    LORA_VS_DENSE,
    MODEL_LORA,
    MODEL_SEED,
    MODEL_SHAPES,
    TrainingStep,
    model_workload,
    transformers_rope,
)
from pyfastpeft.bench.harness import MODES, Case, CaseSkipped, Goal, Implementation, KernelCall, Workload

DORA_ROWS = {False: 2048, True: 256}
DORA_RANK, DORA_ALPHA = 16, 32


def _layers(rows: int, features: int, dropout_p: float, dtype: torch.dtype, device: torch.device):
    """(x needing grad, PEFT's DoRA layer, ours with the same weights), B and the magnitude away from their start."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError as error:
        raise CaseSkipped(f"needs peft: {error}") from None
    from pyfastpeft.nn import LoRALinear

    base = nn.Linear(features, features, bias=False, dtype=dtype, device=device).requires_grad_(False)
    nn.init.normal_(base.weight, std=features**-0.5)
    settings = dict(r=DORA_RANK, lora_alpha=DORA_ALPHA, lora_dropout=dropout_p, use_dora=True)
    theirs = PeftLinear(base, "default", config=LoraConfig(**settings), **settings)
    adapter_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    theirs.to(adapter_dtype).base_layer.to(dtype)  # get_peft_model's autocast_adapter_dtype: fp32 adapters
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_(std=0.01)
        theirs.lora_magnitude_vector["default"].weight.mul_(1.01)
    ours = LoRALinear(base, r=DORA_RANK, lora_alpha=DORA_ALPHA, lora_dropout=dropout_p, use_dora=True)
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(ours, name)["default"].weight.copy_(getattr(theirs, name)["default"].weight)
    theirs.train(), ours.train()
    x = torch.randn(rows, features, dtype=dtype, device=device, requires_grad=True)
    return x, theirs, ours


def _trained(layer) -> list[torch.Tensor]:
    return [
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_magnitude_vector["default"].weight,
    ]


def _dora_kernel(rows: int, features: int, dtype, device, backward: bool) -> KernelCall:
    """DoRA's own native passes around the GEMMs: forward the norm (reads W, A, B) and the scaling (reads z, writes y);
    backward the fused gradient pass (reads dY, z, writes g dY and the column sums)."""
    from pyfastpeft.ops import dora as dora_ops

    z = torch.randn(rows, features, dtype=dtype, device=device)
    scale = torch.rand(features, device=device)
    if backward:
        dy = torch.randn_like(z)
        return KernelCall(lambda: dora_ops.dora_grad(dy, z, scale), 3 * z.nbytes + 2 * scale.nbytes)
    weight = torch.randn(features, features, dtype=dtype, device=device)
    lora_A = torch.randn(DORA_RANK, features, device=device)
    lora_B = torch.randn(features, DORA_RANK, device=device)

    def call():
        dora_ops.NORM_OPS["dense"](weight, lora_A, lora_B, 2.0)
        dora_ops.dora_scale(z, scale, None)

    return KernelCall(call, weight.nbytes + lora_A.nbytes + lora_B.nbytes + 2 * z.nbytes)


def _dora_workload(
    rows: int, features: int, dropout_p: float, dtype: torch.dtype, device: torch.device, floor: bool = False
) -> Workload:
    """floor: time the frozen base layer alone too (x W^T and dX = dY W, torch's two GEMMs, which any DoRA layer
    runs), the ceiling of the speedup goal."""
    x, theirs, ours = _layers(rows, features, dropout_p, dtype, device)
    kernel = functools.partial(_dora_kernel, rows, features, dtype, device)
    weight = theirs.base_layer.weight
    return Workload(
        ours=Implementation(lambda: ours(x), (x, *_trained(ours))),
        reference=Implementation(lambda: theirs(x), (x, *_trained(theirs))),
        kernels={"forward": functools.partial(kernel, False), "backward": functools.partial(kernel, True)},
        floor=Implementation(lambda: torch.nn.functional.linear(x, weight), (x,)) if floor else None,
        floor_name="the base layer's two GEMMs (F.linear forward and dX)",
    )


def _dora_goals(rows: int, dropout_p: float, dtype: torch.dtype, mode: str) -> tuple[Goal, ...]:
    """The issue's target on this CPU: the bf16 layer's forward + backward >= 2x PEFT's at M=2048, peak memory
    <= 0.6x. With dropout both sides run the base product twice (on x and on dropout(x)), so it is measured only."""
    if (rows, dropout_p, dtype, mode) == (DORA_ROWS[False], 0.0, torch.bfloat16, "both"):
        return (Goal("speedup", 2.0), Goal("peak", 0.6))
    return ()


# The methods a training step is timed with, as LoraSettings on top of the model family's adapter (all-linear, r=16)
_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHOD_SETTINGS = {
    "DoRA": dataclasses.replace(MODEL_LORA, use_dora=True),
    "LoRA+lora_bias": dataclasses.replace(MODEL_LORA, lora_bias=True),
    "LoRA+embeddings": dataclasses.replace(MODEL_LORA, target_modules=(*_LINEAR_NAMES, "embed_tokens")),
    "LoRA+lm_head trained": dataclasses.replace(MODEL_LORA, modules_to_save=("lm_head",)),
}


def _step_workload(method: str, dtype: torch.dtype, quick: bool, device: torch.device) -> Workload:
    """One AdamW step of the model family's Llama-shaped model, ours through prepare_model (dense base) and the
    reference through get_peft_model, both with `method`; one warm-up step each, as the model family does."""
    if importlib.util.find_spec("peft") is None:
        raise CaseSkipped("needs peft (the reference)")
    return model_workload(MODEL_SHAPES[quick], LORA_VS_DENSE, dtype, device, METHOD_SETTINGS[method])


PROMPT_METHODS = {"prompt tuning": "prompt_tuning", "prefix tuning": "prefix_tuning"}
VIRTUAL_TOKENS = 20  # PEFT's examples' count


def _prompt_workload(method: str, dtype: torch.dtype, quick: bool, device: torch.device) -> Workload:
    """One AdamW step of the model family's Llama-shaped model with VIRTUAL_TOKENS of prompt or prefix tuning and
    nothing else trained: ours through prepare_model(lora=False, prompt=...) (dense base, the fused layers and loss),
    the reference through get_peft_model with PEFT's config of the method, starting from our prompt's values. The
    whole frozen network runs backward on both sides: the gradient reaches the prompt through every layer."""
    if importlib.util.find_spec("peft") is None:
        raise CaseSkipped("needs peft (the reference)")
    import peft
    from transformers.models.llama import modeling_llama

    from pyfastpeft import PromptSettings, prepare_model

    shape = MODEL_SHAPES[quick]
    torch.manual_seed(MODEL_SEED)
    ours = modeling_llama.LlamaForCausalLM(shape.config()).to(device=device, dtype=dtype)
    reference = copy.deepcopy(ours)
    settings = PromptSettings(method=PROMPT_METHODS[method], num_virtual_tokens=VIRTUAL_TOKENS)
    prepare_model(ours, quant=None, lora=False, prompt=settings)
    config_class = peft.PromptTuningConfig if settings.method == "prompt_tuning" else peft.PrefixTuningConfig
    reference = peft.get_peft_model(reference, config_class(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS))
    reference.prompt_encoder["default"].load_state_dict(ours.prompt_encoder.state_dict())
    generator = torch.Generator().manual_seed(MODEL_SEED)
    input_ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=generator).to(device)
    ours_step, reference_step = TrainingStep(ours, input_ids), TrainingStep(reference, input_ids, transformers_rope)
    ours_step()  # one warm-up step each: AdamW's state exists before anything is measured
    reference_step()
    return Workload(
        ours=Implementation(ours_step, ours_step.parameters),
        reference=Implementation(reference_step, reference_step.parameters),
        kernels={},
    )


ADAPTER_REDUCTION = 16


class _EagerAdapter(nn.Module):
    """The adapter as the papers' code writes it: x + s * up(act(down(x)))."""

    def __init__(self, features: int, rank: int, dtype, device):
        super().__init__()
        self.down = nn.Linear(features, rank, dtype=dtype, device=device)
        self.up = nn.Linear(rank, features, dtype=dtype, device=device)

    def forward(self, x):
        return x + self.up(torch.relu(self.down(x))) * 1.0


def _adapter_workload(rows: int, features: int, dtype: torch.dtype, device: torch.device) -> Workload:
    from pyfastpeft.nn import BottleneckAdapter

    rank = features // ADAPTER_REDUCTION
    theirs = _EagerAdapter(features, rank, dtype, device)
    ours = BottleneckAdapter(features, rank, "relu", 1.0, dtype, device)
    with torch.no_grad():
        theirs.up.weight.normal_(std=0.01)
        ours.adapter_down[0].weight.copy_(theirs.down.weight)
        ours.adapter_down[0].bias.copy_(theirs.down.bias)
        ours.adapter_up.weight.copy_(theirs.up.weight)
        ours.adapter_up.bias.copy_(theirs.up.bias)
    x = torch.randn(rows, features, dtype=dtype, device=device, requires_grad=True)

    def kernel(backward: bool) -> KernelCall:
        from pyfastpeft.ops import bottleneck as ops

        params = [p.detach() for p in (ours.adapter_down[0].weight, ours.adapter_down[0].bias)]
        params += [p.detach() for p in (ours.adapter_up.weight, ours.adapter_up.bias)]
        inputs = x.detach().clone()
        y, h = ops.bottleneck_forward(inputs, *params, 1.0, 0)
        if backward:
            dy = torch.randn_like(y)
            call = lambda: ops.bottleneck_backward(dy, inputs, params[0], params[2], h, 1.0, 0, True)  # noqa: E731
            return KernelCall(call, 3 * inputs.nbytes + 2 * sum(p.nbytes for p in params) + 2 * h.nbytes)
        call = lambda: ops.bottleneck_forward(inputs, *params, 1.0, 0)  # noqa: E731
        return KernelCall(call, 2 * inputs.nbytes + sum(p.nbytes for p in params) + h.nbytes)

    return Workload(
        ours=Implementation(lambda: ours(x), (x, *ours.parameters())),
        reference=Implementation(lambda: theirs(x), (x, *theirs.parameters())),
        kernels={"forward": functools.partial(kernel, False), "backward": functools.partial(kernel, True)},
    )


def methods_cases(dtypes: Sequence[torch.dtype], quick: bool) -> list[Case]:
    rows = DORA_ROWS[quick]
    shape = MODEL_SHAPES[quick]
    # (method, its workload, what its label adds): the LoRA options, then the prompt-learning methods
    kinds = [(method, _step_workload, "") for method in METHOD_SETTINGS]
    kinds += [(method, _prompt_workload, f" n={VIRTUAL_TOKENS}") for method in PROMPT_METHODS]
    steps = [
        Case(
            "methods",
            f"train step {method} vs PEFT {method} {shape.label}{suffix}",
            dtype,
            "forward",
            f"transformers LlamaForCausalLM + PEFT {method} (dense base)",
            functools.partial(workload, method, dtype, quick),
            tokens=shape.tokens,
            headline=quick and dtype == torch.bfloat16,
        )
        for method, workload, suffix in kinds
        for dtype in dtypes
    ]
    adapters = [
        Case(
            "methods",
            f"adapter M={rows} d={HIDDEN} r={HIDDEN // ADAPTER_REDUCTION} relu",
            dtype,
            mode,
            "eager bottleneck adapter (two nn.Linear, activation, scale, residual add)",
            functools.partial(_adapter_workload, rows, HIDDEN, dtype),
            headline=not quick and dtype == torch.bfloat16 and mode == "both",
        )
        for dtype in dtypes
        for mode in MODES
    ]
    return (
        steps
        + adapters
        + [
            Case(
                "methods",
                f"dora M={rows} {HIDDEN}x{HIDDEN} r={DORA_RANK} p={dropout_p}",
                dtype,
                mode,
                "PEFT's DoRA layer (lora.Linear, use_dora=True)",
                functools.partial(
                    _dora_workload,
                    rows,
                    HIDDEN,
                    dropout_p,
                    dtype,
                    floor=bool(_dora_goals(rows, dropout_p, dtype, mode)),
                ),
                goals=_dora_goals(rows, dropout_p, dtype, mode),
                # headline: the goals' case (with dropout, the default run's 10 minutes would not hold it too)
                headline=not quick and dtype == torch.bfloat16 and mode == "both" and dropout_p == 0.0,
            )
            for dropout_p in (0.0, 0.05)
            for dtype in dtypes
            for mode in MODES
        ]
    )
