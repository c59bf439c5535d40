"""prepare_model: one call from a transformers causal LM to fused (Q)LoRA training.

    report = pyfastpeft.prepare_model(model, quant="nf4", lora=pyfastpeft.LoraSettings(r=16, lora_alpha=32))

In order: freeze every parameter; quantize the linear layers but the output layer (quantize_model: NF4 or
LLM.int8); wrap the target linears in LoRALinear (add_lora: only the adapters train); swap RMSNorm, the gated
MLP and RoPE for ours (patch_model); route the causal-LM loss in training through the fused linear cross-entropy,
so the [tokens, vocab] logits and their gradient are never materialized when labels are given.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
from collections.abc import Sequence

import torch
from torch import nn

QUANT_METHODS = (None, "nf4", "int8")
_PREPARED_ATTR = "_pyfastpeft_prepared"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter prepare_model adds, in PEFT's names (LoraConfig) and with PEFT's defaults: r=8,
    lora_alpha=8, no dropout, no rsLoRA. target_modules: PEFT's own default picks q_proj/v_proj from a table per
    architecture; ours is "all-linear" (every linear layer but the output layer, as PEFT's "all-linear" and QLoRA),
    which works for any architecture. Checked when built: a bad value raises TypeError/ValueError naming the field."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | Sequence[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False  # DoRA (PEFT's use_dora): each adapted layer also trains a magnitude per output row
    lora_bias: bool = False  # PEFT's lora_bias: a trained bias on each B (not with use_dora)
    # PEFT's modules_to_save: modules trained whole beside the adapters (a classification head, say), matched as PEFT
    # does (the module's path ends with the name); never quantized, never adapted
    modules_to_save: Sequence[str] | None = None
    # PEFT's bias: "none"; "all" trains every bias the model has beside the adapter (BitFit + LoRA); "lora_only"
    # the biases of the adapted layers
    bias: str = "none"

    def __post_init__(self):
        fn = "LoraSettings"
        if not isinstance(self.r, int) or isinstance(self.r, bool):
            raise TypeError(f"{fn}: r must be an int, got {type(self.r).__name__}")
        if self.r < 1:
            raise ValueError(f"{fn}: r must be >= 1, got {self.r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise TypeError(f"{fn}: lora_alpha must be a number, got {type(self.lora_alpha).__name__}")
        if not isinstance(self.lora_dropout, (int, float)) or isinstance(self.lora_dropout, bool):
            raise TypeError(f"{fn}: lora_dropout must be a number, got {type(self.lora_dropout).__name__}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{fn}: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = self.target_modules
        if not (
            isinstance(targets, str)
            or (isinstance(targets, Sequence) and targets and all(isinstance(name, str) for name in targets))
        ):
            raise TypeError(
                f'{fn}: target_modules must be a str (a regex, or "all-linear") or a non-empty '
                f"sequence of module names, got {targets!r}"
            )
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"{fn}: use_rslora must be a bool, got {type(self.use_rslora).__name__}")
        for flag in ("use_dora", "lora_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{fn}: {flag} must be a bool, got {type(getattr(self, flag)).__name__}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"{fn}: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.modules_to_save is not None:
            from pyfastpeft.nn.modules_to_save import check_module_names

            object.__setattr__(self, "modules_to_save", check_module_names(fn, self.modules_to_save))
        if self.use_dora and self.lora_bias:
            raise ValueError(f"{fn}: lora_bias is not supported with use_dora (PEFT refuses the pair too)")


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """The bottleneck adapters prepare_model adds (pyfastpeft.add_adapters): rank = hidden // reduction_factor,
    after the MLP outputs ("pfeiffer") or after the attention and MLP outputs ("houlsby"), optionally with trained
    norms. Checked by prepare_model before the model changes."""

    reduction_factor: int = 16
    placement: str | Sequence[str] = "pfeiffer"
    activation: str = "relu"
    scaling: float = 1.0
    train_norms: bool = False


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """The prompt-learning method prepare_model adds: "prompt_tuning" (pyfastpeft.add_prompt_tuning: init is
    "random", "sample_vocab" or token ids) or "prefix_tuning" (pyfastpeft.add_prefix_tuning: init is "random" or
    "zero", with prefix_projection's MLP of encoder_hidden_size). Checked by prepare_model before the model changes."""

    method: str = "prompt_tuning"
    num_virtual_tokens: int = 20
    init: str | Sequence[int] = "random"
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None


@dataclasses.dataclass
class PrepareReport:
    """What prepare_model did: modules replaced per kind, what it could not patch and why, the trainable and
    total parameter counts (stored elements: a packed NF4 weight counts its bytes), and the bytes of the
    model's parameters and buffers (quantization states included) before and after."""

    replaced: dict[str, int] = dataclasses.field(default_factory=dict)
    not_patched: list[str] = dataclasses.field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    # trainable elements per method: "lora" (A, B, B's bias), "dora" (magnitudes), "embeddings" (LoRA on them),
    # "modules_to_save" (copies trained whole), "bitfit" (the model's biases), "prompt" (prompt or prefix tuning),
    # "bottleneck adapters", "norms", "other"
    trainable_by_method: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        mib = 1 << 20
        kinds = ", ".join(f"{count} {kind}" for kind, count in self.replaced.items() if count) or "nothing"
        share = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        lines = [
            f"pyfastpeft.prepare_model: replaced {kinds}",
            f"  trainable params {self.trainable_params:,} of {self.total_params:,} ({share:.3f}%)"
            + (
                " = " + " + ".join(f"{count:,} {method}" for method, count in self.trainable_by_method.items() if count)
                if self.trainable_by_method
                else ""
            ),
            f"  parameters and buffers {self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB",
        ]
        lines += [f"  not patched: {reason}" for reason in self.not_patched]
        return "\n".join(lines)


# ---- the fused causal-LM loss -----------------------------------------------------------------------------------


def _dense_output_layer(model: nn.Module):
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_output):
        return None
    layer = get_output()
    return layer if type(layer) is nn.Linear else None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class FusedLossForward:
    """model.forward of a model prepared with the fused loss (install_fused_loss puts it there).

    In training mode with labels, the model's own forward runs with labels=None and no logits (logits_to_keep is an
    empty index), the decoder's last hidden state is taken as it leaves the decoder, and the loss is computed from it
    by fused_linear_cross_entropy, so the [tokens, vocab] logits and their gradient never exist. The loss is
    transformers' ForCausalLMLoss (labels shifted by one, ignore_index -100, mean over the counted tokens or
    sum / num_items_in_batch) of the model's own logits: times `logit_scale` (Cohere's logit_scale, 1 / Granite's
    logits_scaling), soft-capped by `softcap` (Gemma-2's final_logit_softcapping), plus `aux_loss_coef * aux_loss`
    where the model returns a router aux loss (Mixtral, Qwen-MoE). The output is the model's own type with that loss
    and logits None.
    Otherwise (eval mode, so evaluation and compute_metrics get logits; no labels; positional arguments past
    input_ids; return_dict=False; logits_to_keep; shift_labels) the model's own forward runs unchanged.
    A module-level class holding the model, not a bound function, so a prepared model pickles; inspect.signature
    reports the model's own forward (Trainer reads it to keep dataset columns and pass num_items_in_batch).
    """

    def __init__(
        self, model: nn.Module, logit_scale: float = 1.0, softcap: float | None = None, aux_loss_coef: float = 0.0
    ):
        self.model = model
        self.inner = model.__dict__.get("forward")  # a forward set on the instance before us (accelerate's hooks)
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.aux_loss_coef = aux_loss_coef

    def original(self):
        """The model's forward as it was before install_fused_loss."""
        return self.inner if self.inner is not None else types.MethodType(type(self.model).forward, self.model)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.original())

    def __call__(self, input_ids=None, *args, **kwargs):
        logits_to_keep = kwargs.get("logits_to_keep", 0)
        if (
            not self.model.training
            or kwargs.get("labels") is None
            or args
            or kwargs.get("return_dict") is False
            or not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
            or kwargs.get("shift_labels") is not None
        ):
            return self.original()(input_ids, *args, **kwargs)
        kwargs.pop("logits_to_keep", None)
        return self.fused_forward(input_ids, **kwargs)

    def fused_forward(self, input_ids=None, *, labels, num_items_in_batch=None, **kwargs):
        """The forward with the fused loss, whatever the training mode (install_fused_loss's probe calls it)."""
        from pyfastpeft.functional import fused_linear_cross_entropy

        model = self.model
        head = model.get_output_embeddings()
        captured = []
        handle = model.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            no_logits = torch.empty(0, dtype=torch.long, device=head.weight.device)
            outputs = self.original()(input_ids, labels=None, logits_to_keep=no_logits, **kwargs)
        finally:
            handle.remove()
        decoder_output = captured[-1]
        hidden = getattr(decoder_output, "last_hidden_state", None)
        if hidden is None:
            hidden = decoder_output[0]
        hidden = hidden.to(head.weight.device)
        if self.logit_scale != 1.0:  # (h * s) W^T = s * (h W^T): the head has no bias (install_fused_loss checks)
            hidden = hidden * self.logit_scale
        weight, bias = head.weight, head.bias
        if torch.is_autocast_enabled(hidden.device.type):  # lm_head's F.linear would run in the autocast dtype
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = fused_linear_cross_entropy(
            hidden, weight, shift_labels, bias=bias, ignore_index=-100, softcap=self.softcap, reduction=reduction
        )
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None:
            loss = loss + self.aux_loss_coef * aux_loss.to(loss.device)
        return type(outputs)(**{**outputs, "loss": loss, "logits": None})


def _loss_probe(forward: FusedLossForward) -> str | None:
    """None if the fused loss equals the model's own forward loss on a small random batch (in eval mode, without
    gradients; with the router aux loss on too where the config has output_router_logits); else why not.
    Tolerance: 1e-4 relative for fp32 heads (a Mixtral aux term is ~4e-4), 2e-2 for 16-bit ones."""
    model = forward.model
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None) or model.get_output_embeddings().out_features
    device = next(embeddings.parameters()).device
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, 12), generator=generator).to(device)
    labels = input_ids.clone()
    labels[0, :3] = -100
    variants = [{}]
    if getattr(model.config, "output_router_logits", None) is not None:
        variants.append({"output_router_logits": True})
    head_dtype = model.get_output_embeddings().weight.dtype
    rtol = 1e-4 if head_dtype in (torch.float32, torch.float64) else 2e-2
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for extra in variants:
                expected = forward.original()(input_ids, labels=labels, use_cache=False, **extra).loss
                got = forward.fused_forward(input_ids, labels=labels, use_cache=False, **extra).loss
                if not torch.isclose(got.float(), expected.float().to(got.device), rtol=rtol, atol=1e-6):
                    setting = f" with {extra}" if extra else ""
                    return (
                        f"fused loss: on a probe batch{setting} it gives {got.item():.6g} where "
                        f"{type(model).__name__}'s own forward gives {expected.item():.6g}; the model's own loss "
                        "is kept"
                    )
    except Exception as exc:  # a forward the probe cannot drive is one we cannot prove equal
        return f"fused loss: the probe forward failed ({type(exc).__name__}: {exc}); the model's own loss is kept"
    finally:
        for module, training in modes:
            module.training = training
    return None


def install_fused_loss(model: nn.Module) -> str | None:
    """Route model's causal-LM loss in training through fused_linear_cross_entropy (model.forward becomes a
    FusedLossForward); returns None, or why not (then the model's forward is left as it was).

    The model's logit transform is read from its config (logits_scaling, logit_scale, final_logit_softcapping)
    and its router aux loss coefficient from the model (router_aux_loss_coef); then a probe compares the fused
    loss with the model's own forward loss, and a model whose loss differs keeps its own forward."""
    if isinstance(model.__dict__.get("forward"), FusedLossForward):
        return None
    forward, reason = fused_loss_forward(model)
    if forward is not None:
        reason = _loss_probe(forward)
    if reason is None:
        model.forward = forward
    return reason


def fused_loss_forward(model: nn.Module) -> tuple[FusedLossForward | None, str | None]:
    """(a FusedLossForward for model, not installed, None) with its logit transform read from the config, or
    (None, why not)."""
    if not callable(getattr(model, "get_decoder", None)):
        return None, f"fused loss: {type(model).__name__} has no get_decoder() (not a transformers causal LM)"
    head = _dense_output_layer(model)
    if head is None:
        return None, f"fused loss: {type(model).__name__}'s output layer is not a plain nn.Linear"
    if "logits_to_keep" not in inspect.signature(type(model).forward).parameters:
        return None, f"fused loss: {type(model).__name__}.forward takes no logits_to_keep (transformers < 4.50)"
    config = getattr(model, "config", None)
    logit_scale = 1.0
    if scaling := _number(getattr(config, "logits_scaling", None)):  # Granite: logits / logits_scaling
        logit_scale /= scaling
    scale = _number(getattr(model, "logit_scale", getattr(config, "logit_scale", None)))  # Cohere: logits * scale
    if scale is not None:
        logit_scale *= scale
    if logit_scale != 1.0 and head.bias is not None:
        return None, f"fused loss: {type(model).__name__} scales the logits of a head with a bias"
    softcap = _number(getattr(config, "final_logit_softcapping", None)) or None
    aux_loss_coef = _number(getattr(model, "router_aux_loss_coef", getattr(config, "router_aux_loss_coef", None)))
    return FusedLossForward(model, logit_scale, softcap, aux_loss_coef or 0.0), None


def remove_fused_loss(model: nn.Module) -> None:
    """Undo install_fused_loss."""
    forward = model.__dict__.get("forward")
    if isinstance(forward, FusedLossForward):
        if forward.inner is None:
            del model.forward
        else:
            model.forward = forward.inner


# ---- saving -----------------------------------------------------------------------------------------------------

RESUME_WEIGHTS_NAME = "model.safetensors"


class AdapterSavePretrained:
    """model.save_pretrained of a model prepared with adapters (Trainer.save_model and every Trainer checkpoint call
    it): writes what PEFT's PeftModel.save_pretrained writes, a PEFT adapter directory (adapter_config.json and
    adapter_model.safetensors, through pyfastpeft.save_adapter; peft.PeftModel.from_pretrained(base, directory)
    reads it), not the frozen base, and no config.json (a bare from_pretrained(directory) then fails rather than
    load a base with random weights). The "default" adapter goes to the directory, others to a subdirectory each
    (PEFT's layout). Beside it, model.safetensors holds only the trainable parameters under model.state_dict()'s
    names: what Trainer's resume_from_checkpoint loads into a model that is not a PeftModel (load_state_dict with
    strict=False). Only the main process writes. A module-level class holding the model, so the model pickles."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None, **kwargs):
        import os

        from safetensors.torch import save_file

        from pyfastpeft.integrations.peft import save_adapter
        from pyfastpeft.nn import LoRALinear
        from pyfastpeft.nn.prompt_learning import prompt_learning_module

        if not is_main_process:
            return
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        adapters = {name for module in self.model.modules() if isinstance(module, LoRALinear) for name in module.lora_A}
        if prompt_learning_module(self.model) is not None:  # PEFT's prompt-learning directory: one adapter
            adapters = {"default"}
        for name in sorted(adapters):
            save_adapter(
                self.model,
                save_directory if name == "default" else os.path.join(save_directory, name),
                adapter_name=name,
            )
        trainable = {key for key, parameter in self.model.named_parameters() if parameter.requires_grad}
        source = state_dict if state_dict is not None else self.model.state_dict()
        tensors = {key: value.detach().contiguous() for key, value in source.items() if key in trainable}
        save_file(tensors, os.path.join(save_directory, RESUME_WEIGHTS_NAME), metadata={"format": "pt"})


# ---- prepare_model ---------------------------------------------------------------------------------------------


def _settings(fn: str, name: str, value, settings_class: type):
    """A method argument of prepare_model: True means settings_class()'s defaults, False none, else an instance."""
    if value is True:
        return settings_class()
    if value is not False and not isinstance(value, settings_class):
        raise TypeError(
            f"{fn}: {name} must be a pyfastpeft.{settings_class.__name__}, True ({settings_class.__name__}()) or "
            f"False (none), got {type(value).__name__}"
        )
    return value


def _add_prompt(model: nn.Module, prompt: PromptSettings, freeze_others: bool = False):
    from pyfastpeft.nn.prompt_learning import add_prefix_tuning, add_prompt_tuning

    if prompt.method == "prompt_tuning":
        if prompt.prefix_projection or prompt.encoder_hidden_size is not None:
            raise ValueError("prepare_model: prompt.prefix_projection / encoder_hidden_size are prefix tuning's")
        return add_prompt_tuning(model, prompt.num_virtual_tokens, prompt.init, freeze_others=freeze_others)
    return add_prefix_tuning(
        model,
        prompt.num_virtual_tokens,
        prompt.prefix_projection,
        prompt.encoder_hidden_size,
        prompt.init,
        freeze_others=freeze_others,
    )


def _check_prompt(fn: str, model: nn.Module, prompt: PromptSettings) -> None:
    """Every check of _add_prompt, run on a skeleton that shares model's config and input embeddings (the model itself
    does not change)."""
    from pyfastpeft.nn.prompt_learning import check_model

    check_model(fn, model)

    class _Skeleton(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = model.config

        def get_input_embeddings(self):
            return model.get_input_embeddings()

        def forward(self, input_ids=None, **kwargs):  # pragma: no cover - never called
            raise AssertionError

    _add_prompt(_Skeleton(), prompt)


def _method_of(name: str) -> str:
    """The method a trainable parameter belongs to, from its state-dict name."""
    if ".lora_magnitude_vector." in name:
        return "dora"
    if ".lora_embedding_" in name:
        return "embeddings"
    if ".lora_A." in name or ".lora_B." in name:
        return "lora"
    if ".modules_to_save." in name:
        return "modules_to_save"
    if ".adapters." in name:
        return "bottleneck adapters"
    if name.startswith("prompt_encoder."):
        return "prompt"
    if "norm" in name.rpartition(".")[0].rpartition(".")[2]:
        return "norms"
    return "bitfit" if name.endswith(".bias") else "other"


def _trainable_by_method(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            method = _method_of(name)
            counts[method] = counts.get(method, 0) + parameter.numel()
    return counts


def _count(model: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class _InputsRequireGradWhileCheckpointing:
    """Forward hook on the input embeddings: their output requires grad while gradient checkpointing is on in the
    model, where reentrant checkpointing needs its block inputs to require grad to reach the adapters inside (the
    embeddings are frozen). Without checkpointing it leaves the output alone: autograd then skips the first layer's
    input gradient (its q, k and v dX products and the norm's backward), which nothing trains on.
    flagged: the modules with a `gradient_checkpointing` attribute at prepare time (transformers' decoder layers and
    models set it in gradient_checkpointing_enable); where the model has none, whoever checkpoints it cannot be
    seen, and the output always requires grad. A module-level class, so the model still pickles."""

    def __init__(self, model: nn.Module):
        self.flagged = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]

    def __call__(self, module, args, output):
        if not self.flagged or any(m.gradient_checkpointing for m in self.flagged):
            output.requires_grad_(True)


def _enable_input_require_grads(model: nn.Module) -> None:
    """transformers' enable_input_require_grads while gradient checkpointing is on (see
    _InputsRequireGradWhileCheckpointing); kept where theirs is, so model.disable_input_require_grads() removes it."""
    get_input = getattr(model, "get_input_embeddings", None)
    embeddings = get_input() if callable(get_input) else None
    if isinstance(embeddings, nn.Module):
        handle = embeddings.register_forward_hook(_InputsRequireGradWhileCheckpointing(model))
        model._require_grads_hooks = [handle]
        model._require_grads_hook = handle


def _check_model_state(fn: str, model: nn.Module, quant, lora, patch: bool, fused_loss: bool) -> None:
    """Raise, before anything changes, on a model prepare_model cannot take as it is."""
    from pyfastpeft.integrations.transformers import _STATE_ATTR
    from pyfastpeft.nn import Linear4bit, Linear8bitLt, LoRALinear

    if getattr(model, _PREPARED_ATTR, False):
        raise ValueError(
            f"{fn}: model was already prepared by prepare_model; prepare the original model once (a "
            "second call would quantize and adapt it again)"
        )
    if type(model).__module__.startswith("peft.") or any(
        type(module).__module__.startswith("peft.tuners") for module in model.modules()
    ):
        raise ValueError(
            f"{fn}: model is (or holds) a PEFT model; convert it with "
            f"model = pyfastpeft.from_peft(peft_model) and call {fn}(model, lora=False) to keep its "
            "adapters"
        )
    if lora is not False and any(isinstance(module, LoRALinear) for module in model.modules()):
        raise ValueError(
            f"{fn}: model already holds LoRA adapters (LoRALinear); pass lora=False to keep them, or "
            "prepare a model without adapters"
        )
    if quant is not None and any(isinstance(module, (Linear4bit, Linear8bitLt)) for module in model.modules()):
        raise ValueError(f"{fn}: model already holds quantized layers; pass quant=None")
    if patch and hasattr(model, _STATE_ATTR):
        raise ValueError(
            f"{fn}: model is already patched by patch_model; pass patch=False or call "
            "pyfastpeft.unpatch_model(model) first"
        )
    if fused_loss and isinstance(model.__dict__.get("forward"), FusedLossForward):
        raise ValueError(f"{fn}: model already computes the fused loss; pass fused_loss=False")


def _check_lora_targets(fn: str, model: nn.Module, lora: LoraSettings) -> None:
    """add_lora's target check, run before quantization (which keeps every linear layer's path)."""
    from pyfastpeft.integrations.bitsandbytes import bitsandbytes_linears
    from pyfastpeft.nn.lora import linear_modules, matches_target

    candidates = linear_modules(model) + bitsandbytes_linears(model)  # converted before adapters are added
    if lora.target_modules == "all-linear":
        output_layer = _dense_output_layer(model)
        chosen = [
            path for path, module in candidates if path.rpartition(".")[2] != "lm_head" and module is not output_layer
        ]
    else:
        chosen = [path for path, _ in candidates if matches_target(path, lora.target_modules)]
    if not chosen:
        names = sorted({path.rpartition(".")[2] for path, _ in candidates})
        raise ValueError(
            f"{fn}: no linear layer matches lora.target_modules={lora.target_modules!r}; the model's "
            f"linear layers are named {names[:12]}{' ...' if len(names) > 12 else ''}"
        )


def _expert_lines(model: nn.Module, quant: str | None, lora_report) -> list[str]:
    """One line per MoE part LoRA left frozen: an experts block transformers 5.x keeps as 3-D parameters [experts,
    out, in] (Mixtral, Qwen-MoE, ...; older transformers build one nn.Linear per expert, covered like any linear)
    or a bare router weight beside one, with why. lora_report: add_lora's report, None when no adapter was added."""
    from pyfastpeft.nn.experts import LoRAExperts, LoRAParameter
    from pyfastpeft.nn.lora import moe_targets

    blocks, routers, layout_left = moe_targets(model)
    if lora_report is None:
        default = "lora=False"
    else:
        default = "target_modules names linear layers; 'all-linear' adapts experts and routers"
    why = dict(lora_report.not_adapted) if lora_report is not None else {}
    lines = []
    for path, module in blocks + routers:
        if not isinstance(module, (LoRAExperts, LoRAParameter)):
            kind = "router weight" if (path, module) in routers else "experts"
            lines.append(f"{path} ({type(module).__name__}): {kind} frozen, not adapted ({why.get(path, default)})")
    for path, problem in layout_left.items():
        dense = "" if quant is None else "left dense and "
        lines.append(f"{path} ({problem}): expert weights {dense}not adapted")
    return lines


def prepare_model(
    model: nn.Module,
    quant: str | None = "nf4",
    lora: LoraSettings | bool = True,
    patch: bool = True,
    fused_loss: bool = True,
    bitfit: bool = False,
    adapters: AdapterSettings | bool = False,
    prompt: PromptSettings | bool = False,
) -> PrepareReport:
    """Make a transformers causal LM ready for fused (Q)LoRA training, in place; returns a PrepareReport.

    quant: "nf4" (QLoRA: NF4 with double quantization, compute in the model's dtype), "int8" (LLM.int8) or None
    (the frozen base stays dense). lora: the adapter to add: True (the default) adds LoraSettings(), PEFT's
    defaults (r=8, lora_alpha=8, every linear layer but the output layer, and, as PEFT's all-linear on
    transformers 5.x, MoE experts and routers: see add_lora); a LoraSettings adds that one; False adds
    none (keeping the adapters a model already holds, e.g. from pyfastpeft.from_peft; the LoRA matrices are never
    quantized). patch: swap RMSNorm / gated MLP / RoPE for pyfastpeft's. fused_loss: in training mode with labels,
    compute the loss from hidden states with fused_linear_cross_entropy and return logits=None (the memory win);
    in eval mode (model.eval(), as Trainer.evaluate sets it) the model's own forward runs and returns logits. A
    model whose own loss the fused one does not reproduce on a probe batch keeps its own (see install_fused_loss);
    the report says which. Works with gradient checkpointing (model.gradient_checkpointing_enable(...)),
    model.generate, bf16 and fp32, torch.compile, and pickle / torch.save of the whole model.

    bitfit: BitFit, alone (lora=False) or beside the adapter: every linear layer but the output layer trains a bias,
    a zero one where it had none (pyfastpeft.add_bitfit; the report lists them). lora.bias="all" / "lora_only" instead
    trains only the biases the model has (PEFT's bias option). adapters: bottleneck adapters (True: AdapterSettings(),
    Pfeiffer's placement at reduction factor 16), beside LoRA or alone. prompt: prompt or prefix tuning (True:
    PromptSettings(), 20 virtual tokens of prompt tuning), alone (lora=False: save_pretrained then writes PEFT's
    PROMPT_TUNING / PREFIX_TUNING directory, which holds that method alone). report.trainable_by_method splits the
    trainable count per method.

    A model with adapters saves like a PeftModel: model.save_pretrained(directory), Trainer.save_model and Trainer
    checkpoints write a PEFT adapter directory (not the frozen base) plus the trainable parameters Trainer's
    resume_from_checkpoint reads back (see AdapterSavePretrained).

    A model loaded through bitsandbytes (transformers' BitsAndBytesConfig, load_in_4bit / load_in_8bit) has its
    Linear4bit / Linear8bitLt layers converted to pyfastpeft's over the same bytes, never requantized (see
    pyfastpeft.integrations.bitsandbytes; report.replaced["bitsandbytes"] counts them), then adapted.

    Everything is checked before the model changes: a bad argument, a model already prepared (a second call raises
    ValueError and changes nothing), a PeftModel (convert it with from_peft first) or target_modules that match no
    linear layer raise TypeError/ValueError naming the argument, and leave the model as it was.
    """
    from pyfastpeft.integrations.bitsandbytes import check_bitsandbytes_modules, convert_bitsandbytes_modules
    from pyfastpeft.integrations.quantize import model_bytes, quantize_model
    from pyfastpeft.integrations.transformers import patch_model
    from pyfastpeft.nn import LoRALinear
    from pyfastpeft.nn.experts import LoRAExperts, LoRAParameter
    from pyfastpeft.nn.lora import add_lora

    fn = "prepare_model"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if quant not in QUANT_METHODS:
        raise ValueError(f"{fn}: quant must be one of {QUANT_METHODS}, got {quant!r}")
    lora = _settings(fn, "lora", lora, LoraSettings)
    adapters = _settings(fn, "adapters", adapters, AdapterSettings)
    prompt = _settings(fn, "prompt", prompt, PromptSettings)
    if prompt is not False and prompt.method not in ("prompt_tuning", "prefix_tuning"):
        raise ValueError(f"{fn}: prompt.method must be 'prompt_tuning' or 'prefix_tuning', got {prompt.method!r}")
    if prompt is not False and (lora is not False or adapters is not False or bitfit):
        raise ValueError(
            f"{fn}: prompt learning saves as PEFT's PROMPT_TUNING / PREFIX_TUNING directory, which holds that method "
            "alone; pass lora=False (and no adapters or bitfit) with prompt"
        )
    for name, value in (("patch", patch), ("fused_loss", fused_loss), ("bitfit", bitfit)):
        if not isinstance(value, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    _check_model_state(fn, model, quant, lora, patch, fused_loss)
    if adapters is not False:
        from pyfastpeft.nn.bottleneck import plan_adapters

        adapter_args = (adapters.reduction_factor, adapters.placement, adapters.activation, adapters.scaling)
        plan_adapters(fn, model, *adapter_args, "default", adapters.train_norms)
    if prompt is not False:  # the checks of add_prompt_tuning / add_prefix_tuning, on a throwaway twin of the method
        _check_prompt(fn, model, prompt)
    check_bitsandbytes_modules(model)  # a bitsandbytes layer that cannot convert raises before anything changes
    if lora is not False:
        _check_lora_targets(fn, model, lora)

    report = PrepareReport(bytes_before=model_bytes(model))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # layers loaded through bitsandbytes (BitsAndBytesConfig) become ours over the same bytes, never requantized
    report.replaced["bitsandbytes"] = len(convert_bitsandbytes_modules(model))
    if quant is not None:
        output_layer = _dense_output_layer(model)
        skip = ["lm_head"] + [path for path, module in model.named_modules() if module is output_layer]
        # adapters a model already holds (lora=False) stay dense and trainable
        skip += [
            sub_path
            for path, module in model.named_modules()
            if isinstance(module, LoRALinear)
            for sub_path, _ in module.named_modules(prefix=path)
            if ".lora_A." in sub_path or ".lora_B." in sub_path
        ]
        if lora is not False and lora.modules_to_save is not None:  # trained whole: they stay dense
            from pyfastpeft.nn.modules_to_save import modules_to_save_targets

            skip += [
                sub_path
                for path, module in modules_to_save_targets(model, lora.modules_to_save)
                for sub_path, _ in module.named_modules(prefix=path)
            ]
        quant_report = quantize_model(model, quant, skip=tuple(skip))
        report.replaced[quant] = len(quant_report.replaced)
        report.replaced[f"{quant} experts"] = len(quant_report.experts)
    lora_report = None
    if lora is not False:
        lora_report = add_lora(
            model,
            target_modules=lora.target_modules,
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
            lora_bias=lora.lora_bias,
            modules_to_save=lora.modules_to_save,
        )
        report.replaced["lora"] = len(lora_report.wrapped)
        report.replaced["lora experts"] = len(lora_report.experts)
        report.replaced["lora routers"] = len(lora_report.routers)
    else:
        for module in model.modules():
            if isinstance(module, LoRALinear) and module.active_adapter is not None:
                for matrices in (module.lora_A, module.lora_B):
                    matrices[module.active_adapter].requires_grad_(True)
            elif isinstance(module, (LoRAExperts, LoRAParameter)):
                for matrices in (module.lora_A, module.lora_B):
                    matrices.requires_grad_(True)
    if lora is not False and lora.bias != "none":  # PEFT's bias option: the model's own biases train beside it
        from pyfastpeft.nn.bitfit import add_bitfit

        targets = "all" if lora.bias == "all" else [f"^{re.escape(path)}$" for path in lora_report.wrapped]
        try:
            add_bitfit(model, "all" if targets == "all" else "|".join(targets), freeze_others=False)
        except ValueError as error:
            report.not_patched.append(f"lora.bias={lora.bias!r}: {error}")
    if adapters is not False:
        from pyfastpeft.nn.bottleneck import add_adapters

        # everything but the adapters froze above
        adapter_report = add_adapters(model, *adapter_args, train_norms=adapters.train_norms, freeze_others=False)
        report.replaced["bottleneck adapters"] = len(adapter_report.wrapped)
    if bitfit:
        from pyfastpeft.nn.bitfit import add_bitfit

        bitfit_report = add_bitfit(model, add_missing_biases=True, freeze_others=False)  # all else froze above
        report.replaced["bitfit biases added"] = len(bitfit_report.added)
    if prompt is not False:
        _add_prompt(model, prompt)
        report.replaced[prompt.method] = 1
    if patch:
        patch_report = patch_model(model)
        report.replaced.update(
            {"rmsnorm": len(patch_report.rms_norm), "swiglu": len(patch_report.swiglu), "rope": len(patch_report.rope)}
        )
        report.not_patched += patch_report.not_patched
    if fused_loss:
        reason = install_fused_loss(model)
        if reason is None:
            report.replaced["fused loss"] = 1
        else:
            report.not_patched.append(reason)
    report.not_patched += _expert_lines(model, quant, lora_report)
    report.trainable_params, report.total_params = _count(model)
    report.trainable_by_method = _trainable_by_method(model)
    if report.trainable_params:
        # the embeddings are frozen: reentrant gradient checkpointing needs its block inputs to require grad
        # to reach the adapters inside (PEFT does the same when the model checkpoints)
        _enable_input_require_grads(model)
    if callable(getattr(model, "save_pretrained", None)) and (
        prompt is not False or any(isinstance(m, LoRALinear) for m in model.modules())
    ):
        model.save_pretrained = AdapterSavePretrained(model)
    report.bytes_after = model_bytes(model)
    object.__setattr__(model, _PREPARED_ATTR, True)
    return report
