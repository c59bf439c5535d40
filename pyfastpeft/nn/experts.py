"""QuantizedExperts: a MoE block's experts, stored as transformers 5.x stores them (3-D parameters), made one
quantized linear layer (Linear4bit or Linear8bitLt) per expert and projection.

transformers' experts contract (integrations/moe.py, `use_experts_implementation`): forward(hidden_states [T, H],
top_k_index [T, K], top_k_weights [T, K]) -> [T, H], where for each token t and slot k with expert e:
    h = gate_up_proj[e] @ x_t (+ gate_up_proj_bias[e]);  h = act(gate) * up  (gate, up = h.chunk(2))
    y = down_proj[e] @ h (+ down_proj_bias[e]);          out_t = sum_k top_k_weights[t, k] * y
(without a gate: up_proj and act(h)). Weights are [E, out, in], or [E, in, out] when the class says
is_transposed. Ids >= num_experts are expert-parallel sentinels and add nothing. The sum over k runs in the
product's dtype and the result is cast to hidden_states' dtype, as transformers' batched implementation does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# the layout flags transformers' experts decorator sets on the instance
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


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
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    for name in (up_name, "down_proj"):
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
    experts = getattr(module, up_name).shape[0]
    if getattr(module, "num_experts", experts) != experts or module.down_proj.shape[0] != experts:
        return "num_experts does not match the weights"
    return None


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
        up_name = "gate_up_proj" if self.has_gate else "up_proj"
        self.up_name = up_name
        for name in (up_name, "down_proj"):
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

    def _up(self, e: int) -> nn.Module:
        return getattr(self, self.up_name)[e]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if (
            hidden_states.dim() != 2
            or top_k_index.shape != top_k_weights.shape
            or top_k_index.dim() != 2
            or top_k_index.shape[0] != hidden_states.shape[0]
        ):
            raise ValueError(
                f"QuantizedExperts: expected hidden_states [T, H], top_k_index and top_k_weights [T, K]; "
                f"got {tuple(hidden_states.shape)}, {tuple(top_k_index.shape)}, "
                f"{tuple(top_k_weights.shape)}"
            )
        tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)  # (token, slot) pairs grouped by expert, sentinels last
        counts = torch.bincount(expert_ids, minlength=self.num_experts)[: self.num_experts].tolist()
        # each expert's output lands at its pairs' places; sentinel pairs (expert parallelism) stay zero
        out = None
        start = 0
        for e, count in enumerate(counts):
            if count:
                pairs = order[start : start + count]
                h = self._up(e)(hidden_states[pairs // top_k])
                if self.has_gate:
                    gate, up = h.chunk(2, dim=-1)
                    h = self.act_fn(gate) * up
                else:
                    h = self.act_fn(h)
                y = self.down_proj[e](h)
                out = y.new_zeros(tokens * top_k, y.shape[-1]) if out is None else out
                out.index_copy_(0, pairs, y)
            start += count
        if out is None:
            out = hidden_states.new_zeros(tokens * top_k, hidden_states.shape[-1])
        hidden = out.shape[-1]
        weighted = out * top_k_weights.reshape(-1, 1)
        return weighted.view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{self.source_class}, num_experts={self.num_experts}, gated={self.has_gate}"
