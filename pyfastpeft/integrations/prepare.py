"""prepare_model: one call from a transformers causal LM to fused (Q)LoRA training.

    report = pyfastpeft.prepare_model(model, quant="nf4", lora=pyfastpeft.LoraSettings(r=16, lora_alpha=32))

In order: freeze every parameter; quantize the linear layers but the output layer (quantize_model: NF4 or
LLM.int8); wrap the target linears in LoRALinear (add_lora: only the adapters train); swap RMSNorm, the gated
MLP and RoPE for ours (patch_model); route the causal-LM loss through the fused linear cross-entropy, so the
[tokens, vocab] logits and their gradient are never materialized when labels are given.
"""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence

from torch import nn

QUANT_METHODS = (None, "nf4", "int8")


@dataclasses.dataclass
class LoraSettings:
    """The LoRA adapter prepare_model adds, in PEFT's names (LoraConfig)."""

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: str | Sequence[str] = "all-linear"
    use_rslora: bool = False


@dataclasses.dataclass
class PrepareReport:
    """What prepare_model did: modules replaced per kind, what it could not patch and why, the trainable and
    total parameter counts (stored elements: a packed NF4 weight counts its bytes), and the bytes of the
    model's parameters and buffers (quantization states included) before and after."""

    replaced: dict[str, int] = dataclasses.field(default_factory=dict)
    not_patched: list[str] = dataclasses.field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        mib = 1 << 20
        kinds = ", ".join(f"{count} {kind}" for kind, count in self.replaced.items() if count) or "nothing"
        share = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        lines = [f"pyfastpeft.prepare_model: replaced {kinds}",
                 f"  trainable params {self.trainable_params:,} of {self.total_params:,} ({share:.3f}%)",
                 f"  parameters and buffers {self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB"]
        lines += [f"  not patched: {reason}" for reason in self.not_patched]
        return "\n".join(lines)


# ---- the fused causal-LM loss -----------------------------------------------------------------------------------

def _dense_output_layer(model: nn.Module):
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_output):
        return None
    layer = get_output()
    return layer if type(layer) is nn.Linear else None


def _fused_loss_forward(self, input_ids=None, *args, labels=None, num_items_in_batch=None, logits_to_keep=0,
                        **kwargs):
    """The model's forward with the causal-LM loss computed by fused_linear_cross_entropy from the decoder's
    hidden states: the same loss as transformers' ForCausalLMLoss (labels shifted by one, ignore_index -100,
    mean over the counted tokens or sum / num_items_in_batch), logits left out (None) when labels are given.
    Without labels (generation, plain inference) the original forward runs unchanged."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from pyfastpeft.functional import fused_linear_cross_entropy

    if labels is None or args or kwargs.get("return_dict") is False:
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return self._pyfastpeft_original_forward(input_ids, *args, labels=labels, logits_to_keep=logits_to_keep,
                                                 **kwargs)
    outputs = self.get_decoder()(input_ids=input_ids, **kwargs)
    hidden = outputs.last_hidden_state
    head = self.get_output_embeddings()
    shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
    softcap = getattr(self.config, "final_logit_softcapping", None)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fused_linear_cross_entropy(hidden, head.weight, shift_labels, bias=head.bias, ignore_index=-100,
                                      softcap=softcap, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    # the cache field is `cache` in recent transformers, `past_key_values` before
    cache = {name: getattr(outputs, name, None) for name in ("cache", "past_key_values")
             if name in CausalLMOutputWithPast.__dataclass_fields__}
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None), **cache)


def install_fused_loss(model: nn.Module) -> str | None:
    """Route model's causal-LM loss through fused_linear_cross_entropy; returns None, or why it could not."""
    if getattr(model, "_pyfastpeft_original_forward", None) is not None:
        return None
    if not callable(getattr(model, "get_decoder", None)):
        return f"fused loss: {type(model).__name__} has no get_decoder() (not a transformers causal LM)"
    if _dense_output_layer(model) is None:
        return f"fused loss: {type(model).__name__}'s output layer is not a plain nn.Linear"
    model._pyfastpeft_original_forward = model.forward
    model.forward = types.MethodType(_fused_loss_forward, model)
    return None


def remove_fused_loss(model: nn.Module) -> None:
    """Undo install_fused_loss."""
    original = getattr(model, "_pyfastpeft_original_forward", None)
    if original is not None:
        model.forward = original
        del model._pyfastpeft_original_forward


# ---- prepare_model ---------------------------------------------------------------------------------------------

def _count(model: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def prepare_model(model: nn.Module, quant: str | None = "nf4", lora: LoraSettings | None = None, patch: bool = True,
                  fused_loss: bool = True) -> PrepareReport:
    """Make a transformers causal LM ready for fused (Q)LoRA training, in place; returns a PrepareReport.

    quant: "nf4" (QLoRA: NF4 with double quantization, compute in the model's dtype), "int8" (LLM.int8) or None
    (the frozen base stays dense). lora: the adapter (LoraSettings(); None adds none and trains nothing).
    patch: swap RMSNorm / gated MLP / RoPE for pyfastpeft's. fused_loss: compute the loss from hidden states
    with fused_linear_cross_entropy when labels are given. Works with gradient checkpointing
    (model.gradient_checkpointing_enable(...)), model.generate, bf16 and fp32, and torch.compile.
    """
    from pyfastpeft.integrations.quantize import model_bytes, quantize_model
    from pyfastpeft.integrations.transformers import patch_model
    from pyfastpeft.nn.lora import add_lora

    fn = "prepare_model"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if quant not in QUANT_METHODS:
        raise ValueError(f"{fn}: quant must be one of {QUANT_METHODS}, got {quant!r}")
    if lora is not None and not isinstance(lora, LoraSettings):
        raise TypeError(f"{fn}: lora must be a pyfastpeft.LoraSettings or None, got {type(lora).__name__}")
    report = PrepareReport(bytes_before=model_bytes(model))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if quant is not None:
        output_layer = _dense_output_layer(model)
        skip = ("lm_head",) + tuple(path for path, module in model.named_modules() if module is output_layer)
        report.replaced[quant] = len(quantize_model(model, quant, skip=skip).replaced)
    if lora is not None:
        lora_report = add_lora(model, target_modules=lora.target_modules, r=lora.r, lora_alpha=lora.lora_alpha,
                               lora_dropout=lora.lora_dropout, use_rslora=lora.use_rslora)
        report.replaced["lora"] = len(lora_report.wrapped)
    if patch:
        patch_report = patch_model(model)
        report.replaced.update({"rmsnorm": len(patch_report.rms_norm), "swiglu": len(patch_report.swiglu),
                                "rope": len(patch_report.rope)})
        report.not_patched += patch_report.not_patched
    if fused_loss:
        reason = install_fused_loss(model)
        if reason is None:
            report.replaced["fused loss"] = 1
        else:
            report.not_patched.append(reason)
    if lora is not None and callable(getattr(model, "enable_input_require_grads", None)):
        # the embeddings are frozen: reentrant gradient checkpointing needs its block inputs to require grad
        # to reach the adapters inside (PEFT's prepare_model_for_kbit_training does the same)
        model.enable_input_require_grads()
    report.trainable_params, report.total_params = _count(model)
    report.bytes_after = model_bytes(model)
    return report
