"""MoE experts as transformers 5.x stores them (3-D parameters): QuantizedExperts makes them one quantized linear
layer (Linear4bit or Linear8bitLt) per expert and projection; LoRAExperts adds LoRA to each expert's projections
and LoRAParameter to a bare 2-D weight (a router), both in the layout of PEFT's target_parameters
(peft.tuners.lora.ParamWrapper), so adapters save to and load from PEFT directories.

transformers' experts contract (integrations/moe.py, `use_experts_implementation`): forward(hidden_states [T, H],
top_k_index [T, K], top_k_weights [T, K]) -> [T, H], where for each token t and slot k with expert e:
    h = gate_up_proj[e] @ x_t (+ gate_up_proj_bias[e]);  h = act(gate) * up  (gate, up = h.chunk(2))
    y = down_proj[e] @ h (+ down_proj_bias[e]);          out_t = sum_k top_k_weights[t, k] * y
(without a gate: up_proj and act(h)). Weights are [E, out, in], or [E, in, out] when the class says
is_transposed. Ids >= num_experts are expert-parallel sentinels and add nothing. The sum over k runs in the
product's dtype and the result is cast to hidden_states' dtype, as transformers' batched implementation does.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

# the layout flags transformers' experts decorator sets on the instance
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


def up_name(block: nn.Module) -> str:
    """The name of an experts block's first projection: gate_up_proj (gate and up fused) or up_proj (no gate)."""
    return "gate_up_proj" if block.has_gate else "up_proj"


def experts_layout_problem(module: nn.Module) -> str | None:
    """None if module is a transformers experts block QuantizedExperts reproduces, else why not."""
    if not all(hasattr(module, flag) for flag in _LAYOUT_FLAGS):
        return "not a transformers experts block (no use_experts_implementation layout flags)"
    if module.has_post_expert_norm:
        return "a post-expert norm is not supported"
    if not module.is_concatenated:
        return "interleaved gate/up weights are not supported"
    if module.has_gate:
        try:
            from transformers.integrations.moe import _default_apply_gate
        except ImportError:
            return "transformers has no default expert gate"
        if getattr(type(module), "_apply_gate", None) is not _default_apply_gate:
            return f"a custom expert gate ({type(module).__name__}._apply_gate) is not supported"
    if not isinstance(getattr(module, "act_fn", None), nn.Module):
        return "no act_fn module"
    for name in (up_name(module), "down_proj"):
        weight = getattr(module, name, None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 3 or not weight.is_floating_point():
            return f"{name} is not a 3-D floating-point parameter"
        if module.has_bias:
            bias = getattr(module, name + "_bias", None)
            if not isinstance(bias, torch.Tensor) or bias.shape != (
                weight.shape[0],
                weight.shape[2 if module.is_transposed else 1],
            ):
                return f"{name}_bias does not match {name}"
    experts = getattr(module, up_name(module)).shape[0]
    if getattr(module, "num_experts", experts) != experts or module.down_proj.shape[0] != experts:
        return "num_experts does not match the weights"
    return None


def _check_routing(fn: str, hidden_states, top_k_index, top_k_weights) -> None:
    if (
        hidden_states.dim() != 2
        or top_k_index.shape != top_k_weights.shape
        or top_k_index.dim() != 2
        or top_k_index.shape[0] != hidden_states.shape[0]
    ):
        raise ValueError(
            f"{fn}: expected hidden_states [T, H], top_k_index and top_k_weights [T, K]; got "
            f"{tuple(hidden_states.shape)}, {tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}"
        )


def route_experts(
    block: nn.Module,
    project: Callable[[str, int, torch.Tensor], torch.Tensor],
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts contract above with expert e's projections given as project(name, e, x [n, in]) -> [n, out],
    name being block.up_name or "down_proj"; block supplies num_experts, has_gate, up_name and act_fn.
    Each expert sees only the (token, slot) pairs routed to it."""
    _check_routing(type(block).__name__, hidden_states, top_k_index, top_k_weights)
    tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)  # (token, slot) pairs grouped by expert, sentinels last
    counts = torch.bincount(expert_ids, minlength=block.num_experts)[: block.num_experts].tolist()
    # each expert's output lands at its pairs' places; sentinel pairs (expert parallelism) stay zero
    out = None
    start = 0
    for e, count in enumerate(counts):
        if count:
            pairs = order[start : start + count]
            h = project(block.up_name, e, hidden_states[pairs // top_k])
            if block.has_gate:
                gate, up = h.chunk(2, dim=-1)
                h = block.act_fn(gate) * up
            else:
                h = block.act_fn(h)
            y = project("down_proj", e, h)
            out = y.new_zeros(tokens * top_k, y.shape[-1]) if out is None else out
            out.index_copy_(0, pairs, y)
        start += count
    if out is None:
        out = hidden_states.new_zeros(tokens * top_k, hidden_states.shape[-1])
    hidden = out.shape[-1]
    weighted = out * top_k_weights.reshape(-1, 1)
    return weighted.view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


class QuantizedExperts(nn.Module):
    """transformers' experts block with each expert's projections as quantized linear layers (frozen).

    gate_up_proj (or up_proj) and down_proj are ModuleLists of num_experts layers, expert e's
    [out, in] weight quantized by `quantize(nn.Linear) -> module` (e.g. Linear4bit.from_linear). forward keeps
    the experts contract above; routing weights and hidden states get gradients, the experts none.
    """

    def __init__(self, experts: nn.Module, quantize: Callable[[nn.Linear], nn.Module]):
        super().__init__()
        problem = experts_layout_problem(experts)
        if problem is not None:
            raise ValueError(f"QuantizedExperts: {type(experts).__name__}: {problem}")
        self.num_experts = experts.down_proj.shape[0]
        self.has_gate = bool(experts.has_gate)
        self.act_fn = experts.act_fn
        self.source_class = type(experts).__name__
        self.up_name = up_name(experts)
        # the source's registration order of its two weights: PEFT nests its target_parameters wrappers in it
        self.parameter_order = [
            name for name, _ in experts.named_parameters(recurse=False) if name in (self.up_name, "down_proj")
        ]
        for name in (self.up_name, "down_proj"):
            weights = getattr(experts, name)
            biases = getattr(experts, name + "_bias") if experts.has_bias else None
            layers = []
            for e in range(self.num_experts):
                weight = weights[e].t() if experts.is_transposed else weights[e]
                linear = nn.Linear(
                    weight.shape[1], weight.shape[0], bias=biases is not None, device="meta", dtype=weight.dtype
                )
                linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
                if biases is not None:
                    linear.bias = nn.Parameter(biases[e].detach(), requires_grad=False)
                layers.append(quantize(linear))
            self.add_module(name, nn.ModuleList(layers))

    def project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's projection `name` (up_name or "down_proj") of x [n, in]."""
        return getattr(self, name)[e](x)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return route_experts(self, self.project, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"{self.source_class}, num_experts={self.num_experts}, gated={self.has_gate}"


# ---- LoRA on experts and on bare weights (PEFT's target_parameters) --------------------------------------------


def _lora_pair(experts: int, r: int, in_features: int, out_features: int, like: torch.Tensor):
    """PEFT ParamWrapper's matrices: A [r * experts, in] (expert e's rows e*r .. e*r+r-1), B [out, r * experts]
    (expert e's columns e, e + experts, ...: B.view(out, r, experts)[:, :, e]). fp32 over half-precision bases, as
    LoRALinear keeps adapters; A is drawn kaiming-uniform (a = sqrt(5), over the whole [r * experts, in] matrix,
    as PEFT does) and B is zero, so a new adapter starts as the identity."""
    dtype = torch.float32 if like.element_size() < 4 else like.dtype
    lora_A = torch.empty(r * experts, in_features, device=like.device, dtype=dtype)
    lora_B = torch.zeros(out_features, r * experts, device=like.device, dtype=dtype)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    return nn.Parameter(lora_A), nn.Parameter(lora_B)


def expert_features(block: nn.Module, name: str) -> tuple[int, int]:
    """(out, in) of each expert's projection `name` of a QuantizedExperts or a transformers experts block."""
    if isinstance(block, QuantizedExperts):
        layer = getattr(block, name)[0]
        return layer.out_features, layer.in_features
    shape = getattr(block, name).shape[1:]
    return (shape[1], shape[0]) if block.is_transposed else (shape[0], shape[1])


def expert_count(block: nn.Module) -> int:
    return block.num_experts if isinstance(block, QuantizedExperts) else block.down_proj.shape[0]


class _ForwardsAttributes:
    """Attributes the wrapper lacks are read from base_layer, as the model's code reads them from the block it
    built (router.top_k, experts.num_experts, ...)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules["base_layer"], name)


class LoRAExperts(_ForwardsAttributes, nn.Module):
    """A frozen experts block (a transformers 5.x experts block with a layout experts_layout_problem accepts, or a
    QuantizedExperts) plus one LoRA adapter on each projection, the way PEFT's target_parameters adapts the 3-D
    parameters gate_up_proj (or up_proj) and down_proj:

        expert e:  y = x W_e^T (+ b_e) + s * (x A_e^T) B_e^T,   A_e = A.view(E, r, in)[e],
                                                                B_e = B.view(out, r, E)[:, :, e]

    lora_A[name] [r * E, in] and lora_B[name] [out, r * E] per projection name; s = alpha / r (rsLoRA alpha /
    sqrt(r)). PEFT folds s * B_e A_e into the weight of every expert each forward; here only the routed tokens
    pass through each expert's low-rank path, and the product is never formed. No dropout (PEFT's ParamWrapper has
    none either) and one adapter per block.
    """

    def __init__(
        self,
        base: nn.Module,
        r: dict[str, int],
        lora_alpha: dict[str, float],
        use_rslora: bool = False,
        adapter_name: str = "default",
    ):
        super().__init__()
        if isinstance(base, LoRAExperts):
            raise TypeError("LoRAExperts: base already holds an adapter; an experts block holds one")
        if not isinstance(base, QuantizedExperts):
            problem = experts_layout_problem(base)
            if problem is not None:
                raise TypeError(f"LoRAExperts: base {type(base).__name__}: {problem}")
        self.base_layer = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.adapter_name = adapter_name
        self.use_rslora = bool(use_rslora)
        self.up_name = up_name(base)
        self.projections = (self.up_name, "down_proj")
        if set(r) != set(self.projections) or set(lora_alpha) != set(self.projections):
            raise ValueError(f"LoRAExperts: r and lora_alpha must give a value for each of {self.projections}")
        self.r, self.lora_alpha, self.scaling = dict(r), dict(lora_alpha), {}
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        experts = expert_count(base)
        for name in self.projections:
            out_features, in_features = self.features(name)
            rank = self.r[name]
            like = next(base.parameters())
            self.lora_A[name], self.lora_B[name] = _lora_pair(experts, rank, in_features, out_features, like)
            self.scaling[name] = self.lora_alpha[name] / (math.sqrt(rank) if use_rslora else rank)
        self.adapters_enabled = True

    @property
    def num_experts(self) -> int:
        return self.lora_A[self.up_name].shape[0] // self.r[self.up_name]

    @property
    def has_gate(self) -> bool:
        return self.up_name == "gate_up_proj"

    @property
    def act_fn(self) -> nn.Module:
        return self.base_layer.act_fn

    @property
    def parameter_order(self) -> list[str]:
        """The projections in the base block's registration order, the order PEFT nests its ParamWrappers in
        (the first innermost)."""
        base = self.base_layer
        if isinstance(base, QuantizedExperts):
            return list(base.parameter_order)
        return [name for name, _ in base.named_parameters(recurse=False) if name in self.projections]

    def features(self, name: str) -> tuple[int, int]:
        """(out, in) of each expert's projection `name`."""
        return expert_features(self.base_layer, name)

    def _base_project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, QuantizedExperts):
            return base.project(name, e, x)
        weight = getattr(base, name)[e]
        bias = getattr(base, name + "_bias")[e] if base.has_bias else None
        return nn.functional.linear(x, weight.t() if base.is_transposed else weight, bias)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if not self.adapters_enabled:
            return route_experts(self, self._base_project, hidden_states, top_k_index, top_k_weights)
        experts = self.num_experts
        # per-expert views, made once per forward: their backward stacks each matrix's gradient once
        factors = {
            name: (
                self.lora_A[name].view(experts, self.r[name], -1).unbind(0),
                self.lora_B[name].view(self.lora_B[name].shape[0], self.r[name], experts).unbind(2),
            )
            for name in self.projections
        }

        def project(name: str, e: int, x: torch.Tensor) -> torch.Tensor:
            y = self._base_project(name, e, x)  # [n, out], in the base's (or autocast's) dtype
            lora_A, lora_B = factors[name][0][e], factors[name][1][e]
            dtype = y.dtype
            xa = nn.functional.linear(x.to(dtype), lora_A.to(dtype))
            return torch.addmm(y, xa, lora_B.to(dtype).t(), alpha=self.scaling[name])  # y + s * xa B^T, one pass

        return route_experts(self, project, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}: r={self.r[name]}, alpha={self.lora_alpha[name]}" for name in self.projections)
        return f"adapter={self.adapter_name!r}, {ranks}, enabled={self.adapters_enabled}"


class LoRAParameter(_ForwardsAttributes, nn.Module):
    """A module whose 2-D weight [out, in] is used as a bare parameter rather than through nn.Linear (a MoE router:
    logits = x W^T), with LoRA on that weight as PEFT's target_parameters puts it: forward runs the module with
    W + s * B A in place of W (computed in W's dtype, as PEFT does), A [r, in], B [out, r]."""

    def __init__(
        self,
        base: nn.Module,
        parameter_name: str = "weight",
        r: int = 8,
        lora_alpha: float = 8,
        use_rslora: bool = False,
        adapter_name: str = "default",
    ):
        super().__init__()
        weight = base._parameters.get(parameter_name) if isinstance(base, nn.Module) else None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(
                f"LoRAParameter: base must be a module with a 2-D floating-point parameter {parameter_name!r}"
            )
        self.base_layer = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.parameter_name = parameter_name
        self.adapter_name = adapter_name
        self.use_rslora = bool(use_rslora)
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A, self.lora_B = _lora_pair(1, r, weight.shape[1], weight.shape[0], weight)
        self.adapters_enabled = True

    def forward(self, *args, **kwargs):
        if not self.adapters_enabled:
            return self.base_layer(*args, **kwargs)
        weight = getattr(self.base_layer, self.parameter_name)
        delta = (self.lora_B.to(weight.dtype) @ self.lora_A.to(weight.dtype)) * self.scaling
        return torch.func.functional_call(self.base_layer, {self.parameter_name: weight + delta}, args, kwargs)

    def extra_repr(self) -> str:
        return (
            f"{self.parameter_name}, adapter={self.adapter_name!r}, r={self.r}, alpha={self.lora_alpha}, "
            f"enabled={self.adapters_enabled}"
        )
