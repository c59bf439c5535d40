"""BitFit (Ben Zaken, Ravfogel and Goldberg, 2022): fine-tune the bias terms only, or a chosen subset of them.

add_bitfit marks the biases of a model's layers trainable (freezing the rest unless told not to). Every fused layer
computes its bias gradient when the bias requires grad, in the same pass as dX: LoRALinear (dense, NF4, int8 bases,
DoRA too), Linear4bit, Linear8bitLt; layer norms and other torch modules do as torch does. The paper's models (BERT)
have a bias in every linear layer; Llama-family models have none, so add_missing_biases=True gives each matched
linear layer (not the output layer) a zero bias, which leaves the model's outputs unchanged until it trains. The
report names every bias added.

Saving: with adapters, save_adapter writes the trained biases as PEFT's LoRA bias="all" does (every bias of the
model under its own name), which PeftModel.from_pretrained and load_adapter read back; a bias added here is not in
the base model PEFT loads into, so such a model is saved with its state dict instead (model.state_dict() keys of
the parameters that require grad), and add_bitfit(..., add_missing_biases=True) on a fresh model recreates them
before load_state_dict(strict=False).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

# set on a bias parameter add_bitfit created: save_adapter refuses to write it into a PEFT directory
ADDED_BIAS_ATTR = "_pyfastpeft_added_bias"


@dataclasses.dataclass
class BitFitReport:
    """What add_bitfit made trainable (bias parameter names) and added (module paths), with the model's trainable and
    total parameter counts (stored elements)."""

    trained: list[str] = dataclasses.field(default_factory=list)
    added: list[str] = dataclasses.field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        lines = [
            f"pyfastpeft.add_bitfit: {len(self.trained)} biases train ({len(self.added)} added as zeros); "
            f"trainable params {self.trainable_params:,} of {self.total_params:,} ({share:.4f}%)"
        ]
        return "\n".join(lines + [f"  added: {path}.bias" for path in self.added])


def _linear_like(module: nn.Module) -> bool:
    from pyfastpeft.nn.linear4bit import Linear4bit
    from pyfastpeft.nn.linear8bitlt import Linear8bitLt

    return isinstance(module, (nn.Linear, Linear4bit, Linear8bitLt))


def _bias_owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path as the user names it, the module holding the bias) of every module that has or could have a bias: a
    LoRALinear answers for its base layer; adapter matrices and ModulesToSave copies are not candidates."""
    from pyfastpeft.nn.lora import LoRALinear
    from pyfastpeft.nn.lora_embedding import LoRAEmbedding
    from pyfastpeft.nn.modules_to_save import ModulesToSave

    found, inside = [], ()
    for path, module in model.named_modules():
        if path.startswith(inside):
            continue
        if isinstance(module, (LoRALinear, LoRAEmbedding, ModulesToSave)):
            inside += (path + ".",)
            if isinstance(module, LoRALinear):
                found.append((path, module.base_layer))
            continue
        if _linear_like(module) or isinstance(module._parameters.get("bias"), torch.Tensor):
            found.append((path, module))
    return found


def add_bitfit(
    model: nn.Module, target_modules="all", add_missing_biases: bool = False, freeze_others: bool = True
) -> BitFitReport:
    """Train the biases of model's layers, in place; returns a BitFitReport.

    target_modules: "all" (every bias of the model) or the layers whose biases train, named as add_lora's
    target_modules are (a sequence of names matched against the path's end, or a regex the whole path must match).
    add_missing_biases: give each matched linear layer without a bias a zero one (never the output layer under "all").
    freeze_others: freeze every other parameter first (BitFit alone); False keeps what trains already (adapters, for
    PEFT's LoRA with bias="all").
    """
    from pyfastpeft.nn.lora import _check_bool, _check_target_modules, _output_layer, matches_target

    fn = "add_bitfit"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if target_modules != "all":
        target_modules = _check_target_modules(fn, target_modules)
    _check_bool(fn, "add_missing_biases", add_missing_biases)
    _check_bool(fn, "freeze_others", freeze_others)
    output_layer = _output_layer(model)
    owners = [
        (path, module)
        for path, module in _bias_owners(model)
        if (target_modules == "all" and module is not output_layer)
        or (target_modules != "all" and matches_target(path, target_modules))
    ]
    if target_modules == "all":  # an output layer's own bias trains too; it never gets one added
        owners += [(path, m) for path, m in _bias_owners(model) if m is output_layer and m.bias is not None]
    with_bias = [(path, module) for path, module in owners if isinstance(module.bias, torch.Tensor)]
    missing = [(path, module) for path, module in owners if module.bias is None and _linear_like(module)]
    if not with_bias and not (add_missing_biases and missing):
        raise ValueError(
            f"{fn}: no matched layer has a bias (target_modules={target_modules!r}); pass add_missing_biases=True "
            "to give the linear layers zero ones"
        )
    if freeze_others:
        model.requires_grad_(False)
    report = BitFitReport()
    for _, module in with_bias:
        module.bias.requires_grad_(True)
    if add_missing_biases:
        for path, module in missing:
            weight = module.weight
            dtype = weight.dtype if weight.is_floating_point() else torch.float32  # a quantized weight: fp32
            bias = nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=weight.device))
            setattr(bias, ADDED_BIAS_ATTR, True)
            module.bias = bias
            report.added.append(path)
    names = {id(p): name for name, p in model.named_parameters()}
    report.trained = [
        names[id(module.bias)]
        for _, module in owners
        if isinstance(module.bias, torch.Tensor) and id(module.bias) in names
    ]
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_params = sum(p.numel() for p in model.parameters())
    return report
