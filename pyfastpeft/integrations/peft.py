"""HF PEFT interoperability for LoRALinear models: save_adapter / load_adapter in PEFT's adapter directory
format, and from_peft, which converts a live PeftModel's LoRA layers into ours.

PEFT's LoRA adapter directory:
  adapter_config.json          LoraConfig's fields: peft_type "LORA", r, lora_alpha, lora_dropout, use_rslora,
                               target_modules, rank_pattern / alpha_pattern ({regex: value}, matched against
                               a module path as re.match(rf"(.*\\.)?({key})$", path)), task_type ...
  adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  [r, in]
                               base_model.model.<module path>.lora_B.weight  [out, r]
                               (no adapter name in the keys; older directories hold adapter_model.bin)
<module path> is the path in the transformers model, the one PeftModel wraps as base_model.model.
"""
from __future__ import annotations

import collections
import json
import os
import re

import torch
from torch import nn

from pyfastpeft.nn.lora import LoRALinear, base_kind, linear_modules

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# class-name suffix of a transformers model -> PEFT task_type
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}

# LoraConfig settings that change what the adapter computes or stores beyond plain LoRA: refused when set
_UNSUPPORTED_SETTINGS = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "fan_in_fan_out",
                         "use_qalora", "alora_invocation_tokens", "arrow_config", "layer_replication")

_LORA_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<matrix>[AB])\.weight")


def _check_model(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model).__module__.startswith("peft."):
        raise TypeError(f"{fn}: model is a {type(model).__name__}; convert it with pyfastpeft.from_peft first "
                        "(or use PEFT's own save_pretrained / load_adapter)")


def _check_path(fn: str, path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key whose regex matches the path's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _task_type(model: nn.Module):
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def _target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """The layers' last names when those names pick exactly these layers (PEFT's usual form), else their paths."""
    names = sorted({path.rpartition(".")[2] for path in paths})
    inside_lora = tuple(f"{path}." for path in paths)
    named = {path for path, _ in model.named_modules()
             if path.rpartition(".")[2] in names and not path.startswith(inside_lora)}
    return names if named == set(paths) else sorted(paths)


# ---- save ----------------------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, path, adapter_name: str = "default") -> None:
    """Write adapter `adapter_name` of model's LoRALinear layers as a PEFT LoRA adapter directory at path,
    which peft.PeftModel.from_pretrained(base_model, path) and load_adapter read.

    Ranks or alphas that differ between layers go into rank_pattern / alpha_pattern; dropout and rsLoRA must
    be the same on every layer (PEFT's config has one value for each).
    """
    fn = "save_adapter"
    _check_model(fn, model)
    path = _check_path(fn, path)
    layers = [(module_path, module) for module_path, module in linear_modules(model)
              if isinstance(module, LoRALinear) and adapter_name in module.lora_A]
    if not layers:
        found = sorted({name for _, module in linear_modules(model) if isinstance(module, LoRALinear)
                        for name in module.lora_A})
        raise ValueError(f"{fn}: no LoRALinear layer has adapter {adapter_name!r}; the model's adapters are {found}")
    paths = [module_path for module_path, _ in layers]
    ranks = {module_path: module.r[adapter_name] for module_path, module in layers}
    alphas = {module_path: module.lora_alpha[adapter_name] for module_path, module in layers}
    for setting in ("lora_dropout", "use_rslora"):
        values = {getattr(module, setting)[adapter_name] for _, module in layers}
        if len(values) > 1:
            raise ValueError(f"{fn}: adapter {adapter_name!r} has {setting} values {sorted(values)} on different "
                             "layers; PEFT's config holds one")
    _, first = layers[0]
    r, lora_alpha = _most_common(ranks.values()), _most_common(alphas.values())
    model_config = getattr(model, "config", None)
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(model_config, "name_or_path", None),
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": first.lora_dropout[adapter_name],
        "use_rslora": first.use_rslora[adapter_name],
        "target_modules": _target_modules(model, paths),
        "rank_pattern": {re.escape(p): value for p, value in ranks.items() if value != r},
        "alpha_pattern": {re.escape(p): value for p, value in alphas.items() if value != lora_alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
        "revision": None,
    }
    from safetensors.torch import save_file

    tensors = {}
    for module_path, module in layers:
        for matrix, table in (("A", module.lora_A), ("B", module.lora_B)):
            tensors[f"{KEY_PREFIX}{module_path}.lora_{matrix}.weight"] = \
                table[adapter_name].weight.detach().to("cpu").contiguous()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})


# ---- load ----------------------------------------------------------------------------------------------------

def _read_config(fn: str, path: str) -> dict:
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{fn}: no {CONFIG_NAME} in {path!r}")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{fn}: {config_path} has peft_type {config.get('peft_type')!r}, only 'LORA' adapters load")
    unsupported = [name for name in _UNSUPPORTED_SETTINGS if config.get(name)]
    if unsupported:
        raise ValueError(f"{fn}: {config_path} sets {unsupported}, which LoRALinear does not implement")
    missing = [name for name in ("r", "lora_alpha") if name not in config]
    if missing:
        raise ValueError(f"{fn}: {config_path} lacks {missing}")
    return config


def _read_weights(fn: str, path: str) -> dict:
    safetensors_path, bin_path = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file

        return load_file(safetensors_path)
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{fn}: neither {SAFETENSORS_NAME} nor {BIN_NAME} in {path!r}")


def _group_by_module(fn: str, state: dict) -> dict:
    """{module path: {"A": tensor, "B": tensor}} from the adapter's keys."""
    grouped, unsupported = {}, []
    for key, tensor in state.items():
        match = _LORA_KEY.fullmatch(key.removeprefix(KEY_PREFIX))
        if match is None:
            unsupported.append(key)
            continue
        grouped.setdefault(match["path"], {})[match["matrix"]] = tensor
    if unsupported:
        raise ValueError(f"{fn}: the adapter holds entries that are not LoRA A/B matrices of linear layers: "
                         f"{unsupported[:4]}")
    incomplete = [module_path for module_path, pair in grouped.items() if len(pair) != 2]
    if incomplete:
        raise ValueError(f"{fn}: the adapter lacks lora_A or lora_B for {incomplete[:4]}")
    return grouped


def load_adapter(model: nn.Module, path, adapter_name: str = "default") -> list[str]:
    """Load a PEFT LoRA adapter directory (PEFT's save_pretrained or save_adapter) into model, in place, as
    adapter `adapter_name`; returns the module paths it went to.

    Each layer named in the weights is wrapped in LoRALinear (r, lora_alpha, lora_dropout, use_rslora from
    the config, rank_pattern / alpha_pattern per layer), where the adapter is active; a layer already
    wrapped gets it added, not activated (LoRALinear.set_adapter switches). Nothing changes if any check
    fails: a missing file, a non-LoRA peft_type, settings beyond plain LoRA, keys that match no module,
    shapes that disagree with the config.
    """
    fn = "load_adapter"
    _check_model(fn, model)
    path = _check_path(fn, path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{fn}: {path!r} is not a directory")
    config = _read_config(fn, path)
    grouped = _group_by_module(fn, _read_weights(fn, path))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    known = dict(model.named_modules())
    unmatched = [module_path for module_path in grouped if module_path not in known]
    if unmatched:
        linear_names = [module_path for module_path, _ in linear_modules(model)][:6]
        raise ValueError(f"{fn}: adapter keys match no module of the model: {unmatched[:4]} (its linear layers "
                         f"include {linear_names})")
    plan = []
    for module_path, pair in grouped.items():
        module = known[module_path]
        if not isinstance(module, LoRALinear) and base_kind(module) is None:
            raise TypeError(f"{fn}: {module_path} is a {type(module).__name__}, LoRALinear wraps nn.Linear, "
                            "pyfastpeft.nn.Linear4bit and pyfastpeft.nn.Linear8bitLt")
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            raise ValueError(f"{fn}: {module_path} already has an adapter named {adapter_name!r}")
        r = _pattern_value(rank_pattern, module_path, config["r"])
        lora_alpha = _pattern_value(alpha_pattern, module_path, config["lora_alpha"])
        expected = {"A": (r, module.in_features), "B": (module.out_features, r)}
        for matrix, shape in expected.items():
            if tuple(pair[matrix].shape) != shape:
                raise ValueError(f"{fn}: {module_path}.lora_{matrix}.weight is {tuple(pair[matrix].shape)}, the "
                                 f"config's r={r} and the layer give {shape}")
        plan.append((module_path, module, r, lora_alpha, pair))

    settings = dict(lora_dropout=float(config.get("lora_dropout", 0.0)),
                    use_rslora=bool(config.get("use_rslora", False)), init_lora_weights=False)
    for module_path, module, r, lora_alpha, pair in plan:
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r, lora_alpha, **settings)
        else:
            module = LoRALinear(module, r, lora_alpha, adapter_name=adapter_name, **settings)
            parent_path, _, name = module_path.rpartition(".")
            setattr(model.get_submodule(parent_path), name, module)
        with torch.no_grad():
            module.lora_A[adapter_name].weight.copy_(pair["A"])
            module.lora_B[adapter_name].weight.copy_(pair["B"])
    return [module_path for module_path, *_ in plan]


# ---- from a live PeftModel -----------------------------------------------------------------------------------

def _converted(fn: str, module_path: str, layer) -> LoRALinear:
    """A LoRALinear holding layer's base and its very adapter modules (same parameters, same trainability)."""
    names = list(layer.lora_A)
    if layer.lora_variant or any(layer.lora_bias.values()) or layer.fan_in_fan_out:
        raise ValueError(f"{fn}: {module_path} uses DoRA, lora_bias or fan_in_fan_out, which LoRALinear does not "
                         "implement")
    if len(layer.active_adapters) > 1:
        raise ValueError(f"{fn}: {module_path} has several active adapters {layer.active_adapters}; LoRALinear "
                         "applies one at a time")
    if base_kind(layer.base_layer) is None:
        raise TypeError(f"{fn}: {module_path}'s base is a {type(layer.base_layer).__name__}, LoRALinear wraps "
                        "nn.Linear, pyfastpeft.nn.Linear4bit and pyfastpeft.nn.Linear8bitLt")
    active = layer.active_adapters[0] if layer.active_adapters else names[0]

    def settings(name):
        dropout = layer.lora_dropout[name]
        return dict(r=layer.r[name], lora_alpha=layer.lora_alpha[name],
                    lora_dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
                    use_rslora=layer.use_rslora.get(name, False), init_lora_weights=False)

    requires_grad = [p.requires_grad for p in layer.base_layer.parameters()]
    ours = LoRALinear(layer.base_layer, adapter_name=names[0], **settings(names[0]))
    for parameter, flag in zip(layer.base_layer.parameters(), requires_grad):
        parameter.requires_grad_(flag)  # PEFT's choice stands: the base is shared, not ours to retrain
    for name in names[1:]:
        ours.add_adapter(name, **settings(name))
    ours.set_adapter(active)
    for name in names:  # PEFT's own modules replace the fresh ones, trainability included
        ours.lora_A[name], ours.lora_B[name] = layer.lora_A[name], layer.lora_B[name]
        ours.scaling[name] = layer.scaling[name]  # as PEFT holds it (set_scale may have changed it)
    ours.merged_adapters = list(layer.merged_adapters)
    if layer.disable_adapters:
        ours.disable_adapters()
    return ours


def from_peft(peft_model) -> nn.Module:
    """Replace, in place, every peft.tuners.lora.Linear of a live PeftModel with a LoRALinear that holds the
    same base layer and the same adapter modules (weights, scaling, active adapter, merged state), and return
    the underlying transformers model (peft_model.base_model.model)."""
    fn = "from_peft"
    try:
        from peft import PeftModel
        from peft.tuners.lora import Linear as PeftLoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as error:
        raise ImportError(f"{fn}: needs the peft package") from error
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"{fn}: peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    model = peft_model.base_model.model
    lora_layers, others = [], []
    for module_path, module in model.named_modules():
        if type(module) is PeftLoraLinear:
            lora_layers.append((module_path, module))
        elif isinstance(module, BaseTunerLayer) or type(module).__module__.startswith("peft."):
            others.append(f"{module_path} ({type(module).__name__})")
    if others:
        raise ValueError(f"{fn}: the model holds PEFT modules other than LoRA linear layers: {others[:4]}")
    if not lora_layers:
        raise ValueError(f"{fn}: the model holds no peft.tuners.lora.Linear layer")
    converted = [(module_path, _converted(fn, module_path, layer)) for module_path, layer in lora_layers]
    for module_path, ours in converted:
        parent_path, _, name = module_path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, ours)
    return model
