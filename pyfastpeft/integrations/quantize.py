"""quantize_model: every nn.Linear of a model (but the skipped ones) to a pyfastpeft quantized layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pyfastpeft.nn import Linear4bit, Linear8bitLt
from pyfastpeft.nn.experts import QuantizedExperts, experts_layout_problem
from pyfastpeft.ops._dtensor import is_dtensor

METHODS = ("nf4", "fp4", "int8")


@dataclass
class QuantizeReport:
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)  # MoE experts blocks made QuantizedExperts
    experts_left: dict[str, str] = field(default_factory=dict)  # path -> "class: why" it stayed dense
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        mib = 1 << 20
        lines = [
            f"pyfastpeft.quantize_model: {len(self.replaced)} linear layers and {len(self.experts)} MoE experts "
            f"blocks quantized, {len(self.skipped)} skipped; parameters and buffers "
            f"{self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB"
        ]
        lines += [f"  experts left dense: {path} ({why})" for path, why in self.experts_left.items()]
        return "\n".join(lines)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (each tensor once), plus the quantization states of NF4 layers."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
    extra = sum(
        sum(t.numel() * t.element_size() for t in m.quant_state.as_dict(packed=True).values())
        for m in model.modules()
        if isinstance(m, Linear4bit)
    )
    return sum(t.numel() * t.element_size() for t in tensors) + extra


def quantize_model(
    model: nn.Module,
    method: str = "nf4",
    skip=("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    threshold: float = 6.0,
) -> QuantizeReport:
    """Replace, in place, every nn.Linear whose name (last path component or full path) is not in `skip`
    with a Linear4bit of `method` "nf4" or "fp4" (blocksize, double_quant, compute_dtype apply) or a
    Linear8bitLt for "int8" (threshold applies); returns what was replaced and the memory before/after.

    MoE experts that transformers 5.x keeps as 3-D parameters (Mixtral, Qwen-MoE, OLMoE, ...: a block made by
    its `use_experts_implementation`) become QuantizedExperts, one quantized layer per expert and projection;
    a block whose layout it does not reproduce stays dense and the report says why (`experts_left`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"quantize_model: method must be one of {METHODS}, got {method!r}")
    sharded = [path for path, m in model.named_modules() if type(m) is nn.Linear and is_dtensor(m.weight)]
    if sharded:  # before any replacement: the model is left as it was
        raise ValueError(
            f"quantize_model: {sharded[0]} is tensor parallel (its weight is a DTensor); tensor parallelism shards "
            f"dense bases only: keep them dense (prepare_model(..., quant=None)) or leave the layers to quantize "
            f"out of the tensor-parallel plan (a quantized layer runs whole on each rank)"
        )
    report = QuantizeReport(bytes_before=model_bytes(model))

    def quantize(linear: nn.Linear) -> nn.Module:
        if method == "int8":
            return Linear8bitLt.from_linear(linear, threshold)
        return Linear4bit.from_linear(linear, blocksize, double_quant, compute_dtype, quant_type=method)

    for path, module in list(model.named_modules()):
        if not any(p.dim() == 3 and p.is_floating_point() for p in module.parameters(recurse=False)):
            continue
        if path in skip or path.rpartition(".")[2] in skip:
            report.skipped.append(path)
            continue
        problem = experts_layout_problem(module)
        if problem is not None:
            report.experts_left[path] = f"{type(module).__name__}: {problem}"
            continue
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, QuantizedExperts(module, quantize))
        report.experts.append(path)
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if path in skip or path.rpartition(".")[2] in skip:
            report.skipped.append(path)
            continue
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, quantize(module))
        report.replaced.append(path)
    report.bytes_after = model_bytes(model)
    return report
