"""HF PEFT interoperability for LoRALinear models: save_adapter / load_adapter in PEFT's adapter directory
format, and from_peft, which converts a live PeftModel's LoRA layers into ours and keeps the PeftModel working.

PEFT's LoRA adapter directory:
  adapter_config.json          LoraConfig's fields: peft_type "LORA", r, lora_alpha, lora_dropout, use_rslora,
                               target_modules, rank_pattern / alpha_pattern ({regex: value}, matched against
                               a module path as re.match(rf"(.*\\.)?({key})$", path)), task_type, and
                               target_parameters (bare parameters: MoE experts' 3-D weights, router weights;
                               the patterns match <module path>.<parameter name>) ...
  adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  [r, in]
                               base_model.model.<module path>.lora_B.weight  [out, r]
                               (no adapter name in the keys; older directories hold adapter_model.bin)
                               a targeted parameter's matrices: <module path>(.base_layer)*d.lora_A.weight
                               [r * experts, in] and ...lora_B.weight [out, r * experts], one nesting level d
                               per parameter of the module, in registration order, the first deepest
<module path> is the path in the transformers model, the one PeftModel wraps as base_model.model.

Adapter directories come from the internet: load_adapter checks every file, key, value, shape and dtype before
it touches the model, matches pattern keys in linear time (safe_regex), and names the file and key in every
error. save_adapter never leaves a half-written adapter behind.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import numbers
import os
import re
import shutil
import tempfile
from typing import Callable

import torch
from torch import nn

from pyfastpeft.integrations.bitsandbytes import (
    from_bitsandbytes,
    is_bitsandbytes_linear,
    peft_bitsandbytes_lora_classes,
)
from pyfastpeft.integrations.safe_regex import SafePattern, compile_pattern
from pyfastpeft.nn.experts import (
    LoRAExperts,
    LoRAParameter,
    QuantizedExperts,
    expert_count,
    expert_features,
    experts_layout_problem,
    up_name,
)
from pyfastpeft.nn.lora import LoRALinear, _check_adapter_name, base_kind, embedding_modules, linear_modules
from pyfastpeft.nn.lora_embedding import LoRAEmbedding
from pyfastpeft.nn.modules_to_save import ModulesToSave, modules_to_save_targets, trainable_copies
from pyfastpeft.nn.prompt_learning import prompt_learning_module
from pyfastpeft.ops._dtensor import copy_whole, is_dtensor

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# class-name suffix of a transformers model -> PEFT task_type
_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}

# LoraConfig settings that change what the adapter computes or stores beyond plain LoRA, refused when on:
# flags (a bool, on when True) and options (on when neither null nor empty)
_UNSUPPORTED_FLAGS = ("fan_in_fan_out", "use_qalora")
_UNSUPPORTED_OPTIONS = (
    "trainable_token_indices",
    "alora_invocation_tokens",
    "arrow_config",
    "layer_replication",
    "target_parameters",
)

# an adapter file's keys: the A and B matrices, DoRA's magnitude [out] (PEFT writes it without ".weight") and
# lora_bias' bias of B [out]
_LORA_KEY = re.compile(
    r"(?P<path>.+)\.(?:lora_(?P<matrix>[AB])\.weight|lora_(?P<magnitude>magnitude)_vector|lora_B\.(?P<bias>bias)"
    r"|lora_embedding_(?P<embedding>[AB]))"
)
# the 1-D entries among them
_VECTOR_KEYS = ("lora_magnitude_vector", "lora_B.bias")


def _check_model(fn: str, model) -> nn.Module:
    """model itself, or the transformers model inside a PeftModel that from_peft converted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, _ConvertedPeftModel):
        return model.base_model.model
    if type(model).__module__.startswith("peft."):
        raise TypeError(
            f"{fn}: model is a {type(model).__name__}; convert it with pyfastpeft.from_peft first "
            "(or use PEFT's own save_pretrained / load_adapter)"
        )
    return model


def _check_path(fn: str, path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(path, module) for path, module in linear_modules(model) if isinstance(module, LoRALinear)]


def _embedding_layers(model: nn.Module) -> list[tuple[str, LoRAEmbedding]]:
    return [(path, module) for path, module in embedding_modules(model) if isinstance(module, LoRAEmbedding)]


def _saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(path, module) for path, module in model.named_modules() if isinstance(module, ModulesToSave)]


def _moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """LoRA on bare parameters: LoRAExperts and LoRAParameter (one adapter each)."""
    return [
        (path, module) for path, module in model.named_modules() if isinstance(module, (LoRAExperts, LoRAParameter))
    ]


def _refuse_moe(fn: str, model: nn.Module, adapter_name=None) -> None:
    """Merging into MoE experts or routers, or switching them to an adapter they lack, is not built: raise."""
    held = [
        path
        for path, module in _moe_layers(model)
        if adapter_name is None or (module.adapter_name != adapter_name and module.adapters_enabled)
    ]
    if held:
        raise _unsupported(
            fn,
            f"{held[:3]} hold LoRA on MoE experts or routers (LoRAExperts / LoRAParameter), one adapter each, "
            "which cannot merge or switch to another adapter; do this on the PeftModel before from_peft",
        )


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _task_type(model: nn.Module):
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def _target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """The layers' last names when those names pick exactly these layers (PEFT's usual form), else their paths."""
    names = sorted({path.rpartition(".")[2] for path in paths})
    inside_lora = tuple(f"{path}." for path in paths)
    named = {
        path
        for path, _ in model.named_modules()
        if path.rpartition(".")[2] in names and not path.startswith(inside_lora)
    }
    return names if named == set(paths) else sorted(paths)


# ---- save ----------------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, path, adapter_name: str = "default") -> None:
    """Write adapter `adapter_name` of model's LoRALinear layers as a PEFT LoRA adapter directory at path,
    which peft.PeftModel.from_pretrained(base_model, path) and load_adapter read.

    Ranks or alphas that differ between layers go into rank_pattern / alpha_pattern; dropout and rsLoRA must
    be the same on every layer (PEFT's config has one value for each). The files are written into a temporary
    sibling directory and renamed into place: an existing adapter at path stays whole if anything fails, and
    other files there are left alone.

    A model sharded by FSDP2 (adapter weights that are DTensors) is saved whole: every rank calls save_adapter, the
    shards are gathered, rank 0 writes the directory and the others wait for it.

    A model with prompt or prefix tuning (add_prompt_tuning / add_prefix_tuning) is written as PEFT's PROMPT_TUNING /
    PREFIX_TUNING directory (pyfastpeft.integrations.prompt_learning), which holds that method alone.
    """
    fn = "save_adapter"
    model = _check_model(fn, model)
    path = _check_path(fn, path)
    config, tensors = _adapter_files(fn, model, adapter_name)
    if not any(is_dtensor(p) for p in model.parameters()):
        _write_directory(fn, path, config, tensors)
        return
    import torch.distributed as dist

    try:
        if dist.get_rank() == 0:
            _write_directory(fn, path, config, tensors)
    finally:
        dist.barrier()


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """tensor on the CPU, contiguous; a DTensor (an FSDP2 shard) gathered whole first, a collective every rank of
    its mesh must reach."""
    if is_dtensor(tensor):
        tensor = tensor.detach().full_tensor()
    return tensor.detach().to("cpu").contiguous()


def _adapter_files(fn: str, model: nn.Module, adapter_name: str, state_dict: dict | None = None):
    """(adapter_config.json's dict, the tensors of adapter_model.safetensors). The tensors come from state_dict
    (keyed as model.state_dict()) when given, else from the layers. A model with prompt or prefix tuning
    (model.prompt_encoder) writes PEFT's PROMPT_TUNING / PREFIX_TUNING directory instead."""
    if prompt_learning_module(model) is not None:
        from pyfastpeft.integrations import prompt_learning

        others = [path for path, _ in _lora_layers(model) + _moe_layers(model) + _saved_modules(model)]
        if others:
            raise ValueError(
                f"{fn}: the model holds prompt learning (model.prompt_encoder) and LoRA layers ({others[:3]}); a PEFT "
                "adapter directory holds one method"
            )
        if adapter_name != "default":
            raise ValueError(f"{fn}: prompt learning holds one adapter, 'default'; got adapter_name={adapter_name!r}")
        return prompt_learning.files(fn, model)
    all_layers = _lora_layers(model)
    layers = [(module_path, module) for module_path, module in all_layers if adapter_name in module.lora_A]
    parameters = _moe_entries(model, adapter_name)
    if not layers:
        found = sorted({name for _, module in all_layers for name in module.lora_A})
        raise ValueError(
            f"{fn}: no LoRALinear layer has adapter {adapter_name!r}, nothing to save; the model's adapters are {found}"
        )
    embeddings = [
        (module_path, module)
        for module_path, module in embedding_modules(model)
        if isinstance(module, LoRAEmbedding) and adapter_name in module.lora_embedding_A
    ]
    paths = [module_path for module_path, _ in layers + embeddings]
    ranks = {module_path: module.r[adapter_name] for module_path, module in layers + embeddings}
    alphas = {module_path: module.lora_alpha[adapter_name] for module_path, module in layers + embeddings}
    for entry in parameters:
        ranks[entry.parameter_path], alphas[entry.parameter_path] = entry.r, entry.lora_alpha
    for setting in ("lora_dropout", "use_rslora", "use_dora", "lora_bias"):
        values = {getattr(module, setting)[adapter_name] for _, module in layers}
        if setting in ("use_rslora", "use_dora"):  # PEFT's use_dora puts DoRA on embeddings too
            values |= {getattr(module, setting)[adapter_name] for _, module in embeddings}
        if setting == "use_rslora":
            values |= {entry.use_rslora for entry in parameters}
        elif setting in ("use_dora", "lora_bias") and parameters:
            values.add(False)  # PEFT's target_parameters are plain LoRA
        elif parameters and values != {0.0}:
            raise ValueError(
                f"{fn}: adapter {adapter_name!r} adapts MoE experts or routers (PEFT's target_parameters), which "
                f"PEFT reads only without dropout, and its linear layers have lora_dropout {sorted(values)}"
            )
        if len(values) > 1:
            raise ValueError(
                f"{fn}: adapter {adapter_name!r} has {setting} values {sorted(values)} on different "
                "layers; PEFT's config holds one"
            )
    _, first = layers[0]
    r, lora_alpha = _most_common(ranks.values()), _most_common(alphas.values())
    bias_entries = _trained_biases(fn, model)
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
        "target_parameters": sorted(entry.parameter_path for entry in parameters) or None,
        "rank_pattern": {re.escape(p): value for p, value in ranks.items() if value != r},
        "alpha_pattern": {re.escape(p): value for p, value in alphas.items() if value != lora_alpha},
        "bias": "all" if bias_entries else "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": first.use_dora[adapter_name],
        "lora_bias": first.lora_bias[adapter_name],
        "revision": None,
    }
    copies = trainable_copies(model, adapter_name)
    config["modules_to_save"] = sorted(path for path, _ in copies) or None  # whole paths: PEFT matches their ends
    _warn_peft_remaps(fn, model, config["target_modules"])
    # (the model's state-dict key, the file's key, the tensor) of everything the file holds, in PEFT's names
    entries = list(bias_entries)
    for module_path, module in copies:  # the trained copy's tensors under the module's own path
        for name, tensor in module.state_dict().items():
            entries.append((f"{module_path}.modules_to_save.{adapter_name}.{name}", f"{module_path}.{name}", tensor))
    for module_path, module in embeddings:  # LoRA on embeddings: bare parameters lora_embedding_A / _B
        for matrix, table in (("A", module.lora_embedding_A), ("B", module.lora_embedding_B)):
            key = f"{module_path}.lora_embedding_{matrix}"
            entries.append((f"{key}.{adapter_name}", key, table[adapter_name]))
        if module.use_dora[adapter_name]:
            key = f"{module_path}.lora_magnitude_vector"
            entries.append((f"{key}.{adapter_name}.weight", key, module.lora_magnitude_vector[adapter_name].weight))
    for module_path, module in layers:
        for matrix, table in (("A", module.lora_A), ("B", module.lora_B)):
            key = f"{module_path}.lora_{matrix}"
            entries.append((f"{key}.{adapter_name}.weight", f"{key}.weight", table[adapter_name].weight))
        if module.use_dora[adapter_name]:  # PEFT writes the magnitude without its ".weight"
            key = f"{module_path}.lora_magnitude_vector"
            entries.append((f"{key}.{adapter_name}.weight", key, module.lora_magnitude_vector[adapter_name].weight))
        if module.lora_bias[adapter_name]:
            key = f"{module_path}.lora_B"
            entries.append((f"{key}.{adapter_name}.bias", f"{key}.bias", module.lora_B[adapter_name].bias))
    for entry in parameters:
        for matrix, (state_key, tensor) in (("A", entry.lora_A), ("B", entry.lora_B)):
            entries.append((state_key, f"{entry.key_path}.lora_{matrix}.weight", tensor))
    tensors = {}
    for model_key, file_key, tensor in entries:
        if state_dict is not None:
            if model_key not in state_dict:
                raise ValueError(f"{fn}: the state_dict passed lacks {model_key!r}")
            tensor = state_dict[model_key]
        tensors[f"{KEY_PREFIX}{file_key}"] = _whole(tensor)
    return config, tensors


def _model_biases(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the model's own biases (PEFT's bias="all" set): not adapter parameters (lora_B's bias) nor
    the insides of ModulesToSave, which save as themselves."""
    inside = tuple(f"{path}." for path, _ in _saved_modules(model))
    return [
        (name, parameter)
        for name, parameter in model.named_parameters()
        if name.endswith(".bias") and ".lora_" not in name and not name.startswith(inside)
    ]


def _trained_biases(fn: str, model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """The adapter file's bias entries (model key, file key, tensor): every bias of the model, as PEFT's LoRA
    bias="all" writes them, when any of them trains (BitFit beside the adapter); none otherwise. A bias add_bitfit
    added is not PEFT's to hold."""
    from pyfastpeft.nn.bitfit import ADDED_BIAS_ATTR

    biases = _model_biases(model)
    if not any(parameter.requires_grad for _, parameter in biases):
        return []
    added = [name for name, parameter in biases if getattr(parameter, ADDED_BIAS_ATTR, False)]
    if added:
        raise ValueError(
            f"{fn}: {added[:4]} are biases add_bitfit added; a PEFT adapter directory holds only biases the base "
            "model has. Save the trained parameters with model.state_dict() instead"
        )
    return [(name, name, parameter) for name, parameter in biases]


def _plan_biases(
    where: str, model: nn.Module, config: _AdapterConfig, state: dict
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """PEFT's bias="all" / "lora_only" entries: [(the model's bias, its value)], every key naming a bias of the model
    (PEFT's names of a wrapped layer's bias, `...q_proj.base_layer.bias`, name the bare layer's before the load)
    with its shape; those keys leave `state`."""
    if config.bias == "none":
        return []
    parameters = dict(model.named_parameters())
    plans = []
    for key in [
        key for key in state if key.endswith(".bias") and _LORA_KEY.fullmatch(key.removeprefix(KEY_PREFIX)) is None
    ]:
        name = key.removeprefix(KEY_PREFIX)
        if ".original_module." in name:  # the frozen original of a modules_to_save module: the model's own
            state.pop(key)
            continue
        parameter = parameters.get(name, parameters.get(name.replace(".base_layer.", ".")))
        if parameter is None:
            raise ValueError(f"{where}: {key!r} names no bias of the model (the config sets bias={config.bias!r})")
        value = state.pop(key)
        if value.shape != parameter.shape:
            raise ValueError(f"{where}: {key!r} is {tuple(value.shape)}, the model's bias is {tuple(parameter.shape)}")
        plans.append((parameter, value))
    return plans


def _peft_remapped_names(model: nn.Module) -> dict[str, str]:
    """The layer names PEFT (0.19 and newer, over transformers 5) rewrites in a loaded adapter's target_modules for
    this architecture, as it converts adapters trained on transformers 4's per-expert MoE layers: {old: new}. Read
    from PEFT's own tables; empty where PEFT has none (or is older, or absent)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return {}
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        return {}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = getattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)
    if base is None or not getattr(conversion, "_MOE_FUSED_TARGETS", {}).get(base):
        return {}
    return dict(getattr(conversion, "_MOE_TARGET_MODULE_MAPPING", {}).get(base) or {})


def _warn_peft_remaps(fn: str, model: nn.Module, target_modules) -> None:
    """Warn when PEFT would load this adapter onto other layers than it was saved from: its transformers 5
    conversion turns target_modules named like transformers 4's expert layers (Qwen3-MoE's gate_proj / up_proj /
    down_proj, Mixtral's w1 / w2 / w3) into the fused experts' parameters, so dense layers of those names (e.g. a
    MoE model's dense MLP layers) are left without their adapter. pyfastpeft.load_adapter reads it as saved."""
    remapped = _peft_remapped_names(model)
    hit = sorted({name for name in target_modules if name.rpartition(".")[2] in remapped})
    if hit:
        import warnings

        warnings.warn(
            f"{fn}: linear layers named {hit} are adapted; PEFT's loader for this architecture on transformers 5 "
            "rewrites those names to the MoE experts' fused parameters, so peft.PeftModel.from_pretrained would "
            "leave these layers without their adapter. pyfastpeft.load_adapter reads the directory as saved.",
            stacklevel=3,
        )


@dataclasses.dataclass
class _ParameterEntry:
    """One adapted bare parameter as PEFT's target_parameters writes it: parameter_path (the targeted parameter,
    e.g. model.layers.0.mlp.experts.gate_up_proj), key_path (where its ParamWrapper sits: PEFT nests the wrappers
    of one module's parameters in their registration order, the first innermost, so each earlier one is one
    `.base_layer` deeper), and lora_A / lora_B as (our state-dict key, tensor)."""

    parameter_path: str
    key_path: str
    r: int
    lora_alpha: float
    use_rslora: bool
    lora_A: tuple[str, torch.Tensor]
    lora_B: tuple[str, torch.Tensor]


def _moe_entries(model: nn.Module, adapter_name: str) -> list[_ParameterEntry]:
    entries = []
    for path, module in model.named_modules():
        if isinstance(module, LoRAExperts) and module.adapter_name == adapter_name:
            order = module.parameter_order
            for depth, name in enumerate(reversed(order)):
                entries.append(
                    _ParameterEntry(
                        f"{path}.{name}",
                        path + ".base_layer" * depth,
                        module.r[name],
                        module.lora_alpha[name],
                        module.use_rslora,
                        (f"{path}.lora_A.{name}", module.lora_A[name]),
                        (f"{path}.lora_B.{name}", module.lora_B[name]),
                    )
                )
        elif isinstance(module, LoRAParameter) and module.adapter_name == adapter_name:
            entries.append(
                _ParameterEntry(
                    f"{path}.{module.parameter_name}",
                    path,
                    module.r,
                    module.lora_alpha,
                    module.use_rslora,
                    (f"{path}.lora_A", module.lora_A),
                    (f"{path}.lora_B", module.lora_B),
                )
            )
    return entries


def _fsync(path: str) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _write_directory(fn: str, path: str, config: dict, tensors: dict) -> None:
    """Write config and tensors into a temporary sibling of path, then rename them into place: the whole
    directory when path does not exist, else each file (see _replace_files). The temporary directory never
    outlives the call."""
    from safetensors.torch import save_file

    target = os.path.abspath(path)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{fn}: {path!r} exists and is not a directory")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        config_path, weights_path = os.path.join(staging, CONFIG_NAME), os.path.join(staging, SAFETENSORS_NAME)
        with open(config_path, "w", encoding="utf-8") as file:
            json.dump(config, file, indent=2, sort_keys=True)
        save_file(tensors, weights_path, metadata={"format": "pt"})
        _fsync(config_path)
        _fsync(weights_path)
        if os.path.isdir(target):
            _replace_files(target, staging, (SAFETENSORS_NAME, CONFIG_NAME))
        else:
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_files(target: str, staging: str, names) -> None:
    """Move each staged file over its namesake in target. The files replaced wait in staging/previous until all
    new ones are in, and are moved back if any move fails."""
    previous = os.path.join(staging, "previous")
    os.mkdir(previous)
    moved = []  # (name, whether target held a file of that name)
    try:
        for name in names:
            current = os.path.join(target, name)
            existed = os.path.lexists(current)
            if existed:
                os.replace(current, os.path.join(previous, name))
            moved.append((name, existed))
            os.replace(os.path.join(staging, name), current)
    except BaseException:
        for name, existed in reversed(moved):
            current = os.path.join(target, name)
            if existed:
                os.replace(os.path.join(previous, name), current)
            elif os.path.lexists(current):
                os.remove(current)
        raise


# ---- load: read and check the files --------------------------------------------------------------------------


@dataclasses.dataclass
class _AdapterConfig:
    """The settings of adapter_config.json that load_adapter uses, checked. A pattern is a list of
    (key, its compiled PEFT match, value) in the file's order."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    rank_pattern: list[tuple[str, SafePattern, int]]
    alpha_pattern: list[tuple[str, SafePattern, float]]
    target_parameters: tuple[str, ...] = ()  # PEFT's: names or paths of bare parameters (MoE experts, routers)
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()
    bias: str = "none"  # PEFT's: which of the model's own biases the adapter trains and saves


def _check_int(where: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {key} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{where}: {key} must be >= 1, got {value}")
    return value


def _check_real(where: str, key: str, value, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {key} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (upper != math.inf and not 0.0 <= value < upper):
        bounds = f"in [0, {upper})" if upper != math.inf else "finite"
        raise ValueError(f"{where}: {key} must be {bounds}, got {value}")
    return value


def _check_flag(where: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {key} must be true or false, got {type(value).__name__} {value!r}")
    return value


def _read_patterns(where: str, name: str, patterns, check_value) -> list:
    if patterns is None:
        return []
    if not isinstance(patterns, dict):
        raise TypeError(f"{where}: {name!r} must be an object of {{regex: value}}, got {type(patterns).__name__}")
    compiled = []
    for key, value in patterns.items():
        try:
            matcher = compile_pattern(rf"(.*\.)?({key})$")
        except ValueError as error:
            raise ValueError(f"{where}: {name} key {key!r} is refused: {error}") from None
        compiled.append((key, matcher, check_value(where, f"{name}[{key!r}]", value)))
    return compiled


def _read_json(fn: str, path: str) -> tuple[str, dict]:
    """(adapter_config.json's path, its object), read as untrusted text."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{fn}: no {CONFIG_NAME} in {path!r}")
    with open(config_path, "rb") as file:
        raw = file.read()
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{fn}: {config_path} is not UTF-8 text: {error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{fn}: {config_path} is not valid JSON: {error}") from None
    where = f"{fn}: {config_path}"
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the file holds a JSON {type(config).__name__}, not an object")
    return config_path, config


def _read_config(fn: str, path: str, read: tuple[str, dict] | None = None) -> tuple[str, _AdapterConfig]:
    config_path, config = read if read is not None else _read_json(fn, path)
    where = f"{fn}: {config_path}"
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{where}: 'peft_type' is {config.get('peft_type')!r}; LORA, PROMPT_TUNING and PREFIX_TUNING adapters load"[
                :400
            ]
        )
    unsupported = [
        name
        for name in _UNSUPPORTED_FLAGS
        if name in config and config[name] is not None and _check_flag(where, repr(name), config[name])
    ]
    unsupported += [
        name
        for name in _UNSUPPORTED_OPTIONS
        if name != "target_parameters" and config.get(name) not in (None, [], {}, "")
    ]
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"{where}: 'bias' must be 'none', 'all' or 'lora_only', got {config.get('bias')!r}"[:400])
    if unsupported:
        raise ValueError(f"{where}: sets {unsupported}, which LoRALinear does not implement")
    missing = [name for name in ("r", "lora_alpha") if name not in config]
    if missing:
        raise ValueError(f"{where}: lacks {missing}")
    return config_path, _AdapterConfig(
        r=_check_int(where, "'r'", config["r"]),
        lora_alpha=_check_real(where, "'lora_alpha'", config["lora_alpha"]),
        lora_dropout=float(_check_real(where, "'lora_dropout'", config.get("lora_dropout", 0.0), upper=1.0)),
        use_rslora=_check_flag(where, "'use_rslora'", config.get("use_rslora", False)),
        rank_pattern=_read_patterns(where, "rank_pattern", config.get("rank_pattern"), _check_int),
        alpha_pattern=_read_patterns(where, "alpha_pattern", config.get("alpha_pattern"), _check_real),
        target_parameters=_read_target_parameters(where, config.get("target_parameters")),
        use_dora=_check_flag(where, "'use_dora'", config.get("use_dora") or False),
        lora_bias=_check_flag(where, "'lora_bias'", config.get("lora_bias") or False),
        modules_to_save=_read_names(where, "modules_to_save", config.get("modules_to_save")),
        bias=config.get("bias") or "none",
    )


def _read_names(where: str, key: str, value) -> tuple[str, ...]:
    if value in (None, [], ""):
        return ()
    if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
        raise ValueError(f"{where}: {key!r} must be a list of module names, got {value!r}"[:400])
    return tuple(value)


def _read_target_parameters(where: str, value) -> tuple[str, ...]:
    if value in (None, [], ""):
        return ()
    if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
        raise ValueError(f"{where}: 'target_parameters' must be a list of parameter names, got {value!r}"[:400])
    return tuple(value)


def _read_weights(fn: str, path: str) -> tuple[str, dict]:
    """(the weights file, its {key: tensor}), every tensor a finite floating-point matrix."""
    safetensors_path, bin_path = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file

        weights_path, reader, kind = safetensors_path, load_file, "safetensors"
    elif os.path.isfile(bin_path):
        weights_path, kind = bin_path, "torch.save"
        reader = functools.partial(torch.load, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{fn}: neither {SAFETENSORS_NAME} nor {BIN_NAME} in {path!r}")
    try:
        state = reader(weights_path)
    except OSError:
        raise
    except Exception as error:  # each reader has its own error types for a corrupt file
        raise ValueError(
            f"{fn}: {weights_path} is not a readable {kind} file: {type(error).__name__}: {error}"
        ) from None
    where = f"{fn}: {weights_path}"
    if not isinstance(state, dict):
        raise ValueError(f"{where}: holds a {type(state).__name__}, not a dict of tensors")
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{where}: entry {key!r} is a {type(tensor).__name__}, not a tensor under a str key")
        if not tensor.is_floating_point():
            raise TypeError(f"{where}: {key!r} has dtype {tensor.dtype}; LoRA matrices are floating point")
        if _LORA_KEY.fullmatch(key.removeprefix(KEY_PREFIX)) is None:
            continue  # a module trained whole (modules_to_save): checked against the module it loads into
        if key.endswith(_VECTOR_KEYS):
            if tensor.dim() != 1:
                raise ValueError(
                    f"{where}: {key!r} has shape {tuple(tensor.shape)}; a DoRA magnitude or B's bias is 1-D"
                )
        elif tensor.dim() != 2:
            raise ValueError(f"{where}: {key!r} has shape {tuple(tensor.shape)}; LoRA matrices are 2-D")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{where}: {key!r} holds non-finite values")
    return weights_path, state


def _group_by_module(where: str, state: dict, use_dora: bool = False, lora_bias: bool = False) -> dict:
    """{module path: {"A": (key, tensor), "B": (key, tensor)[, "magnitude": ..., "bias": ...]}} from the adapter's
    keys; a DoRA adapter (use_dora) has a magnitude for every module, any other none; likewise B's bias (lora_bias)."""
    grouped, unsupported = {}, []
    for key, tensor in state.items():
        match = _LORA_KEY.fullmatch(key.removeprefix(KEY_PREFIX))
        if match is None:
            unsupported.append(key)
            continue
        part = match["matrix"] or match["embedding"] or match["magnitude"] or match["bias"]
        pair = grouped.setdefault(match["path"], {})
        if part in pair:
            raise ValueError(f"{where}: {pair[part][0]!r} and {key!r} name the same matrix")
        pair[part] = (key, tensor)
    if unsupported:
        raise ValueError(f"{where}: holds entries that are not LoRA A/B matrices of linear layers: {unsupported[:4]}")
    incomplete = [module_path for module_path, pair in grouped.items() if "A" not in pair or "B" not in pair]
    if incomplete:
        raise ValueError(f"{where}: lacks lora_A or lora_B for {incomplete[:4]}")
    for part, flag, name, key in (
        ("magnitude", use_dora, "use_dora", "lora_magnitude_vector"),
        ("bias", lora_bias, "lora_bias", "lora_B.bias"),
    ):
        holding = [module_path for module_path, pair in grouped.items() if part in pair]
        if flag and len(holding) != len(grouped):
            lacking = [module_path for module_path in grouped if module_path not in holding]
            raise ValueError(f"{where}: the config sets {name}, and {lacking[:4]} lack {key}")
        if not flag and holding:
            raise ValueError(f"{where}: holds {key} for {holding[:4]}, and the config does not set {name}")
    return grouped


# ---- load: plan, then change the model -----------------------------------------------------------------------


@dataclasses.dataclass
class _Step:
    """One layer's part of a load: module is a LoRALinear that gets the adapter, or the base that gets wrapped."""

    module_path: str
    module: nn.Module
    r: int
    lora_alpha: float
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor | None = None  # DoRA's [out], None for plain LoRA
    lora_bias: torch.Tensor | None = None  # B's bias [out] (lora_bias), None without


def _pattern_value(patterns: list, module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key whose regex matches the path's end."""
    return next((value for _, matcher, value in patterns if matcher.match(module_path)), default)


def _plan(
    fn: str, model: nn.Module, adapter_name: str, config: _AdapterConfig, where: str, grouped: dict
) -> list[_Step]:
    """Every check against the model, nothing changed."""
    known = dict(model.named_modules())
    wrapped = [path for path, module in known.items() if isinstance(module, LoRALinear)]
    steps, unmatched = [], []
    for module_path, pair in grouped.items():
        key = pair["A"][0]
        owner = next((path for path in wrapped if module_path.startswith(f"{path}.")), None)
        if owner is not None:
            raise ValueError(
                f"{where}: key {key!r} names {module_path}, a part of the LoRALinear layer {owner}; "
                f"an adapter's keys name the layer itself ({KEY_PREFIX}{owner}.lora_A.weight)"
            )
        if module_path not in known:
            unmatched.append(module_path)
            continue
        module = known[module_path]
        embedding = isinstance(module, (nn.Embedding, LoRAEmbedding))
        if ".lora_embedding_" in key and not embedding:
            raise TypeError(f"{where}: key {key!r} is LoRA of an embedding, {module_path} is a {type(module).__name__}")
        if embedding:
            if ".lora_embedding_" not in key:
                raise TypeError(f"{where}: key {key!r} is LoRA of a linear layer, {module_path} is an embedding")
            if config.lora_bias:
                raise ValueError(f"{where}: LoRA on the embedding {module_path} has no lora_bias (nor has PEFT's)")
            if isinstance(module, LoRAEmbedding) and adapter_name in module.lora_embedding_A:
                raise ValueError(f"{fn}: {module_path} already has an adapter named {adapter_name!r}")
        elif not isinstance(module, LoRALinear) and base_kind(module) is None:
            raise TypeError(
                f"{where}: key {key!r}: {module_path} is a {type(module).__name__}, LoRALinear wraps "
                "nn.Linear, pyfastpeft.nn.Linear4bit and pyfastpeft.nn.Linear8bitLt"
            )
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            raise ValueError(f"{fn}: {module_path} already has an adapter named {adapter_name!r}")
        r = _pattern_value(config.rank_pattern, module_path, config.r)
        lora_alpha = _pattern_value(config.alpha_pattern, module_path, config.lora_alpha)
        if embedding:
            expected = {"A": (r, module.num_embeddings), "B": (module.embedding_dim, r)}
        else:
            expected = {"A": (r, module.in_features), "B": (module.out_features, r)}
        for matrix, shape in expected.items():
            matrix_key, tensor = pair[matrix]
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{where}: {matrix_key!r} is {tuple(tensor.shape)}, the config's r={r} and the layer give {shape}"
                )
        width = module.embedding_dim if embedding else module.out_features
        for part in ("magnitude", "bias"):
            if part in pair and tuple(pair[part][1].shape) != (width,):
                raise ValueError(
                    f"{where}: {pair[part][0]!r} is {tuple(pair[part][1].shape)}, the layer has {width} output features"
                )
        vectors = (pair.get("magnitude", (None, None))[1], pair.get("bias", (None, None))[1])
        steps.append(_Step(module_path, module, r, lora_alpha, pair["A"][1], pair["B"][1], *vectors))
    if unmatched:
        linear_names = [module_path for module_path, _ in linear_modules(model)][:6]
        raise ValueError(
            f"{where}: adapter keys match no module of the model: {unmatched[:4]} (its linear layers "
            f"include {linear_names})"
        )
    return steps


def _restore_bias(parameter: nn.Parameter, value: torch.Tensor, requires_grad: bool) -> None:
    with torch.no_grad():
        parameter.copy_(value)
    parameter.requires_grad_(requires_grad)


def _restore_requires_grad(flags) -> None:
    for parameter, flag in flags:
        parameter.requires_grad_(flag)


def _fill(layer: LoRALinear, adapter_name: str, step: _Step) -> None:
    with torch.no_grad():
        if isinstance(layer, LoRAEmbedding):
            layer.lora_embedding_A[adapter_name].copy_(step.lora_A)
            layer.lora_embedding_B[adapter_name].copy_(step.lora_B)
            if step.magnitude is not None:
                layer.lora_magnitude_vector[adapter_name].weight.copy_(step.magnitude)
            return
        copy_whole(layer.lora_A[adapter_name].weight, step.lora_A)  # a tensor-parallel layer's A or B: its shard
        copy_whole(layer.lora_B[adapter_name].weight, step.lora_B)
        if step.magnitude is not None:
            layer.lora_magnitude_vector[adapter_name].weight.copy_(step.magnitude)
        if step.lora_bias is not None:
            layer.lora_B[adapter_name].bias.copy_(step.lora_bias)


def _apply(
    model: nn.Module, steps: list[_Step], adapter_name: str, config: _AdapterConfig, parameter_steps=(), biases=()
) -> None:
    """Build the new LoRALinear layers aside, then add the adapter to wrapped layers and swap the new ones in;
    if anything fails, every change made so far is undone in reverse order."""
    settings = dict(
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        init_lora_weights=False,
        use_dora=config.use_dora,
        lora_bias=config.lora_bias,
    )
    undo = []
    try:
        built = []
        embedding_settings = dict(use_rslora=config.use_rslora, init_lora_weights=False, use_dora=config.use_dora)
        for step in steps:
            if not isinstance(step.module, (LoRALinear, LoRAEmbedding)):
                undo.append(
                    functools.partial(_restore_requires_grad, [(p, p.requires_grad) for p in step.module.parameters()])
                )
                if isinstance(step.module, nn.Embedding):
                    layer = LoRAEmbedding(
                        step.module, step.r, step.lora_alpha, adapter_name=adapter_name, **embedding_settings
                    )
                else:
                    layer = LoRALinear(step.module, step.r, step.lora_alpha, adapter_name=adapter_name, **settings)
                _fill(layer, adapter_name, step)
                built.append((step, layer))
        for step in steps:
            if isinstance(step.module, (LoRALinear, LoRAEmbedding)):
                chosen = embedding_settings if isinstance(step.module, LoRAEmbedding) else settings
                step.module.add_adapter(adapter_name, step.r, step.lora_alpha, **chosen)
                undo.append(functools.partial(step.module.delete_adapter, adapter_name))
                _fill(step.module, adapter_name, step)
        for module_path, build in parameter_steps:
            module = model.get_submodule(module_path)
            undo.append(functools.partial(_restore_requires_grad, [(p, p.requires_grad) for p in module.parameters()]))
            built.append((_Step(module_path, module, 0, 0.0, None, None), build()))
        for step, layer in built:
            _replace_module(model, step.module_path, layer)
            undo.append(functools.partial(_replace_module, model, step.module_path, step.module))
        for parameter, value in biases:  # PEFT's bias="all": the model's own biases, trained beside the adapter
            undo.append(
                functools.partial(_restore_bias, parameter, parameter.detach().clone(), parameter.requires_grad)
            )
            with torch.no_grad():
                parameter.copy_(value)
            parameter.requires_grad_(True)
    except BaseException:
        for action in reversed(undo):
            action()
        raise


def load_adapter(model: nn.Module, path, adapter_name: str = "default") -> list[str]:
    """Load a PEFT LoRA adapter directory (PEFT's save_pretrained or save_adapter) into model, in place, as
    adapter `adapter_name`; returns the module paths it went to.

    Each layer named in the weights is wrapped in LoRALinear (r, lora_alpha, lora_dropout, use_rslora from
    the config, rank_pattern / alpha_pattern per layer), where the adapter is active; a layer already
    wrapped gets it added, not activated (LoRALinear.set_adapter switches). Bare parameters the config names in
    target_parameters (PEFT's LoRA on MoE experts and routers) get LoRAExperts / LoRAParameter, one adapter each.
    The model changes only once every check has passed (a missing or corrupt file, a non-LoRA peft_type, settings
    beyond plain LoRA, a value of the wrong type, a pattern key refused by safe_regex, keys that match no linear
    layer or targeted parameter, shapes that disagree with the config, non-finite weights), and is restored if the
    change itself fails.

    A PROMPT_TUNING / PREFIX_TUNING directory installs a PromptTuning / PrefixTuning as model.prompt_encoder once its
    settings and its one tensor are checked against the model (pyfastpeft.integrations.prompt_learning); returns
    ["prompt_encoder"].
    """
    fn = "load_adapter"
    model = _check_model(fn, model)
    path = _check_path(fn, path)
    _check_adapter_name(fn, adapter_name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{fn}: {path!r} is not a directory")
    config_path, raw = _read_json(fn, path)
    if raw.get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING"):
        from pyfastpeft.integrations import prompt_learning

        if adapter_name != "default":
            raise ValueError(f"{fn}: prompt learning holds one adapter, 'default'; got adapter_name={adapter_name!r}")
        weights_path, state = _read_weights(fn, path)
        return prompt_learning.load(fn, model, config_path, raw, weights_path, state)
    _, config = _read_config(fn, path, (config_path, raw))
    weights_path, state = _read_weights(fn, path)
    where = f"{fn}: {weights_path}"
    saved_steps = _plan_modules_to_save(fn, model, adapter_name, config, where, state)  # takes its keys out
    _check_saved_embeddings(where, model, state)  # takes its keys out
    bias_values = _plan_biases(where, model, config, state)  # takes its keys out
    grouped = _group_by_module(where, state, config.use_dora, config.lora_bias)
    parameter_steps = _plan_parameters(fn, model, adapter_name, config, where, grouped)  # takes its paths out
    steps = _plan(fn, model, adapter_name, config, where, grouped)
    _apply(model, steps, adapter_name, config, parameter_steps + saved_steps, bias_values)
    return [step.module_path for step in steps] + [path for path, _ in parameter_steps + saved_steps]


def _check_saved_embeddings(where: str, model: nn.Module, state: dict) -> None:
    """PEFT writes the base weight of an embedding it adapts beside the adapter (save_embedding_layers="auto", for a
    resized vocabulary): such an entry must equal the model's own weight, which load_adapter does not replace."""
    embeddings = dict(embedding_modules(model))
    for key in [key for key in state if key.endswith(".base_layer.weight")]:
        module_path = key.removeprefix(KEY_PREFIX).removesuffix(".base_layer.weight")
        if module_path not in embeddings:
            continue
        weight = embeddings[module_path].weight
        saved = state.pop(key)
        if saved.shape != weight.shape or not torch.equal(saved.to(weight.dtype), weight.detach().cpu()):
            raise ValueError(
                f"{where}: {key!r} holds {module_path}'s weight ({tuple(saved.shape)}) and it differs from the model's "
                f"({tuple(weight.shape)}): the adapter was trained over another embedding (a resized vocabulary?); "
                "give the model that embedding first"
            )


def _plan_modules_to_save(
    fn: str, model: nn.Module, adapter_name: str, config: _AdapterConfig, where: str, state: dict
) -> list[tuple[str, Callable[[], nn.Module]]]:
    """The modules_to_save part of a load, checked and nothing changed: [(module path, build its ModulesToSave)]. Each
    module the config names (PEFT's rule: its path ends with a name) needs its every tensor in the file, of its
    shape; those keys leave `state`."""
    if not config.modules_to_save:
        return []
    plans = []
    for module_path, module in modules_to_save_targets(model, config.modules_to_save):
        if isinstance(module, ModulesToSave):
            raise ValueError(
                f"{fn}: {module_path} already holds modules_to_save copies {list(module.modules_to_save)}; load an "
                "adapter with modules_to_save into a model whose modules are not wrapped yet"
            )
        values = {}
        for name, tensor in module.state_dict().items():
            key = f"{KEY_PREFIX}{module_path}.{name}"
            if key not in state:
                raise ValueError(f"{where}: the config names {module_path} in modules_to_save, and {key!r} is missing")
            loaded = state.pop(key)
            if loaded.shape != tensor.shape:
                raise ValueError(
                    f"{where}: {key!r} is {tuple(loaded.shape)}, {module_path}.{name} is {tuple(tensor.shape)}"
                )
            values[name] = loaded
        left = [
            key
            for key in state
            if key.startswith(f"{KEY_PREFIX}{module_path}.") and not _LORA_KEY.fullmatch(key.removeprefix(KEY_PREFIX))
        ]
        if left:
            raise ValueError(f"{where}: {left[:4]} name no tensor of {module_path} ({type(module).__name__})")

        def build(module=module, values=values):
            wrapper = ModulesToSave(module, adapter_name)
            with torch.no_grad():
                wrapper.modules_to_save[adapter_name].load_state_dict(values)
            return wrapper

        plans.append((module_path, build))
    if not plans:
        raise ValueError(f"{where}: modules_to_save {list(config.modules_to_save)} match no module of the model")
    return plans


def _plan_parameters(
    fn: str, model: nn.Module, adapter_name: str, config: _AdapterConfig, where: str, grouped: dict
) -> list[tuple[str, Callable[[], nn.Module]]]:
    """The target_parameters part of a load, checked and nothing changed: [(module path, build its LoRAExperts or
    LoRAParameter)]; the keys it takes are removed from grouped. PEFT's keys for a module's targeted parameters
    are <path>(.base_layer)*d.lora_A.weight, one nesting level per parameter in registration order, the first
    deepest (see _moe_entries)."""
    if not config.target_parameters:
        return []
    if config.lora_dropout:
        raise ValueError(f"{where}: target_parameters with lora_dropout > 0; PEFT's ParamWrapper refuses that too")
    targets = config.target_parameters
    nests: dict[str, dict[int, str]] = {}
    for key_path in list(grouped):
        module_path, depth = key_path, 0
        while module_path.endswith(".base_layer"):
            module_path, depth = module_path[: -len(".base_layer")], depth + 1
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            continue  # left to _plan, which names it
        if isinstance(module, (LoRAExperts, LoRAParameter)):
            raise ValueError(f"{fn}: {module_path} already holds adapter {module.adapter_name!r}; it holds one")
        if isinstance(module, LoRALinear) or base_kind(module) is not None:
            continue  # a linear layer
        nests.setdefault(module_path, {})[depth] = key_path
    steps = []
    for module_path, keys in nests.items():
        module = model.get_submodule(module_path)
        # PEFT's match: the parameter's path equals a target or ends in "." + a target (QuantizedExperts: the
        # 3-D weights it was made from)
        candidates = (
            module.parameter_order
            if isinstance(module, QuantizedExperts)
            else [name for name, _ in module.named_parameters(recurse=False)]
        )
        names = [
            name
            for name in candidates
            if any(f"{module_path}.{name}" == t or f"{module_path}.{name}".endswith(f".{t}") for t in targets)
        ]
        if sorted(keys) != list(range(len(names))):
            raise ValueError(
                f"{where}: {module_path} ({type(module).__name__}) has keys at {len(keys)} nesting levels and "
                f"{len(names)} parameters named in target_parameters ({names})"
            )
        # the parameter at depth d is the (len - 1 - d)-th in registration order
        pairs = {names[len(names) - 1 - depth]: grouped.pop(key_path) for depth, key_path in keys.items()}
        settings = {}
        for name, pair in pairs.items():
            parameter_path = f"{module_path}.{name}"
            r = _pattern_value(config.rank_pattern, parameter_path, config.r)
            alpha = _pattern_value(config.alpha_pattern, parameter_path, config.lora_alpha)
            settings[name] = (r, alpha, pair["A"], pair["B"])
        steps.append((module_path, _parameter_builder(where, module_path, module, settings, config, adapter_name)))
    return steps


def _bare_parameter_wrapper(where: str, module_path: str, base: nn.Module, settings: dict, use_rslora, adapter_name):
    """The LoRAExperts or LoRAParameter for LoRA on base's bare parameters, settings {parameter name: (r,
    lora_alpha, lora_A, lora_B)} (PEFT's target_parameters, read from an adapter directory or a live ParamWrapper
    chain), once the matrices' shapes match base; ValueError naming the module otherwise. Its matrices are fresh:
    the caller fills them in."""

    def check(name, experts, out_features, in_features):
        r, _, lora_A, lora_B = settings[name]
        for matrix, tensor, shape in (
            ("lora_A", lora_A, (r * experts, in_features)),
            ("lora_B", lora_B, (out_features, r * experts)),
        ):
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{where}: {module_path}.{name}'s {matrix} is {tuple(tensor.shape)}; r={r} and the "
                    f"{type(base).__name__} give {shape}"
                )

    if isinstance(base, QuantizedExperts) or experts_layout_problem(base) is None:
        projections = {up_name(base), "down_proj"}
        if set(settings) != projections:
            raise ValueError(
                f"{where}: {module_path} adapts {sorted(settings)}; LoRAExperts adapts {sorted(projections)} "
                "together (as PEFT's all-linear does)"
            )
        for name in settings:
            check(name, expert_count(base), *expert_features(base, name))
        ranks = {name: value[0] for name, value in settings.items()}
        alphas = {name: value[1] for name, value in settings.items()}
        return LoRAExperts(base, ranks, alphas, use_rslora, adapter_name)
    name = next(iter(settings)) if len(settings) == 1 else None
    weight = base._parameters.get(name) if name is not None else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"{where}: {module_path} ({type(base).__name__}) adapts {sorted(settings)}: neither a MoE experts block "
            f"LoRAExperts covers ({experts_layout_problem(base)}) nor one 2-D floating-point weight"
        )
    check(name, 1, *weight.shape)
    r, alpha, _, _ = settings[name]
    return LoRAParameter(base, name, r, alpha, use_rslora, adapter_name)


def _set_matrices(layer: nn.Module, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling=None) -> None:
    """Put PEFT's own Parameters (their values and training state: from_peft) into a LoRAExperts projection
    `name` or a LoRAParameter."""
    if isinstance(layer, LoRAExperts):
        layer.lora_A[name], layer.lora_B[name] = lora_A, lora_B
        if scaling is not None:
            layer.scaling[name] = scaling
    else:
        layer.lora_A, layer.lora_B = lora_A, lora_B
        if scaling is not None:
            layer.scaling = scaling


def _parameter_builder(where: str, module_path: str, module: nn.Module, settings: dict, config, adapter_name: str):
    """Check one module's target_parameters matrices read from an adapter directory; return what builds its
    wrapper holding copies of them."""
    matrices = {name: (r, alpha, pair_A[1], pair_B[1]) for name, (r, alpha, pair_A, pair_B) in settings.items()}
    _bare_parameter_wrapper(where, module_path, module, matrices, config.use_rslora, adapter_name)  # the checks

    def build():
        layer = _bare_parameter_wrapper(where, module_path, module, matrices, config.use_rslora, adapter_name)
        for name, (_, _, lora_A, lora_B) in matrices.items():
            fresh = layer.lora_A[name] if isinstance(layer, LoRAExperts) else layer.lora_A
            dtype, device = fresh.dtype, fresh.device
            _set_matrices(
                layer,
                name,
                nn.Parameter(lora_A.to(device=device, dtype=dtype).clone()),
                nn.Parameter(lora_B.to(device=device, dtype=dtype).clone()),
            )
        return layer

    return build


# ---- from a live PeftModel -----------------------------------------------------------------------------------


def _check_peft_configs(fn: str, peft_configs: dict) -> None:
    for adapter_name, config in peft_configs.items():
        peft_type = getattr(config, "peft_type", None)
        if peft_type != "LORA":
            raise ValueError(f"{fn}: adapter {adapter_name!r} is a {peft_type} adapter; only LoRA converts")
        on = [name for name in _UNSUPPORTED_FLAGS if getattr(config, name, False)]
        on += [name for name in _UNSUPPORTED_OPTIONS if getattr(config, name, None) and name != "target_parameters"]
        if getattr(config, "bias", "none") not in ("none", "all", "lora_only"):
            on.append("bias")
        if on:
            raise ValueError(
                f"{fn}: adapter {adapter_name!r} sets {on}, which LoRALinear does not implement "
                "(yet); keep this model on PEFT's layers"
            )


def _converted(fn: str, module_path: str, layer) -> nn.Module:
    """A LoRALinear holding layer's base and its very adapter modules (same parameters, same trainability); the
    base alone when the layer holds no adapter."""
    names = list(layer.lora_A)
    dora = {name for name in names if getattr(layer, "use_dora", {}).get(name)}
    variants = [
        type(variant).__name__
        for name, variant in getattr(layer, "lora_variant", {}).items()
        if variant is not None and not (name in dora and type(variant).__name__ == "DoraLinearVariant")
    ]
    if variants or getattr(layer, "fan_in_fan_out", False):
        raise ValueError(
            f"{fn}: {module_path} uses {variants or 'fan_in_fan_out'}, which LoRALinear does not implement"
        )
    if dora & set(layer.merged_adapters):
        raise ValueError(f"{fn}: {module_path} has DoRA adapters merged {sorted(dora)}; unmerge them first")
    if len(layer.active_adapters) > 1:
        raise ValueError(
            f"{fn}: {module_path} has several active adapters {layer.active_adapters}; LoRALinear applies one at a time"
        )
    base = layer.base_layer  # a bitsandbytes base (QLoRA) becomes ours over the same bytes
    if is_bitsandbytes_linear(base):
        base = from_bitsandbytes(base, f"{module_path}.base_layer")
    if base_kind(base) is None:
        raise TypeError(
            f"{fn}: {module_path}'s base is a {type(base).__name__}, LoRALinear wraps "
            "nn.Linear, pyfastpeft.nn.Linear4bit and pyfastpeft.nn.Linear8bitLt"
        )
    if not names:
        return base
    active = layer.active_adapters[0] if layer.active_adapters else None

    def settings(name):
        dropout = layer.lora_dropout[name]
        r, lora_alpha = layer.r[name], layer.lora_alpha[name]
        if hasattr(layer, "use_rslora"):
            use_rslora = layer.use_rslora.get(name, False)
        else:  # PEFT before 0.18 keeps only the scaling it chose: alpha / sqrt(r) for rsLoRA, else alpha / r
            use_rslora = r > 1 and math.isclose(layer.scaling[name], lora_alpha / math.sqrt(r))
        return dict(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            use_rslora=use_rslora,
            init_lora_weights=False,
            use_dora=name in dora,
            lora_bias=bool(getattr(layer, "lora_bias", {}).get(name)),
        )

    requires_grad = [p.requires_grad for p in base.parameters()]
    ours = LoRALinear(base, adapter_name=names[0], **settings(names[0]))
    for parameter, flag in zip(base.parameters(), requires_grad):
        parameter.requires_grad_(flag)  # PEFT's choice stands: the base is shared, not ours to retrain
    for name in names[1:]:
        ours.add_adapter(name, **settings(name))
    ours.set_adapter(active if active in names else None)  # PEFT: an adapter this layer lacks applies nothing
    for name in names:  # PEFT's own modules replace the fresh ones, trainability included
        ours.lora_A[name], ours.lora_B[name] = layer.lora_A[name], layer.lora_B[name]
        if name in dora:  # PEFT's DoraLinearLayer holds the magnitude as `weight`, as DoRAMagnitude does
            ours.lora_magnitude_vector[name] = layer.lora_magnitude_vector[name]
        ours.scaling[name] = layer.scaling[name]  # as PEFT holds it (set_scale may have changed it)
    ours.merged_adapters = list(layer.merged_adapters)
    if layer.disable_adapters:
        ours.disable_adapters()
    return ours


def _param_wrappers(fn: str, module_path: str, outer) -> nn.Module:
    """A LoRAExperts or LoRAParameter holding the adapter of a chain of PEFT ParamWrappers (target_parameters: one
    wrapper per parameter, nested, the base innermost), sharing PEFT's very matrices and scaling."""
    chain, base = [], outer
    while type(base).__name__ == "ParamWrapper" and type(base).__module__.startswith("peft."):
        chain.append(base)
        base = base.base_layer
    names = {name for wrapper in chain for name in wrapper.lora_A}
    if len(names) != 1 or any(len(wrapper.active_adapters) != 1 for wrapper in chain):
        raise ValueError(
            f"{fn}: {module_path} holds adapters {sorted(names)} on bare parameters (target_parameters); "
            "LoRAExperts and LoRAParameter hold one, active"
        )
    (adapter_name,) = names
    if any(wrapper.merged for wrapper in chain):
        raise ValueError(f"{fn}: {module_path}'s target_parameters adapter is merged; unmerge it first")
    settings = {
        wrapper.parameter_name: (
            wrapper.r[adapter_name],
            wrapper.lora_alpha[adapter_name],
            wrapper.scaling[adapter_name],
            wrapper.lora_A[adapter_name].weight,
            wrapper.lora_B[adapter_name].weight,
        )
        for wrapper in chain
    }
    use_rslora = any(getattr(wrapper, "use_rslora", {}).get(adapter_name, False) for wrapper in chain)
    matrices = {name: (r, alpha, lora_A, lora_B) for name, (r, alpha, _, lora_A, lora_B) in settings.items()}
    ours = _bare_parameter_wrapper(fn, module_path, base, matrices, use_rslora, adapter_name)
    for name, (_, _, scaling, lora_A, lora_B) in settings.items():  # PEFT's scaling: set_scale may have changed it
        _set_matrices(ours, name, lora_A, lora_B, scaling)
    ours.adapters_enabled = not chain[0].disable_adapters
    return ours


def _converted_embedding(fn: str, module_path: str, layer) -> nn.Module:
    """A LoRAEmbedding over PEFT's lora.Embedding's base and very adapter parameters (scaling, active adapter, merged
    state as PEFT holds them)."""
    names = list(layer.lora_embedding_A)
    use_dora = {name: bool(getattr(layer, "use_dora", {}).get(name, False)) for name in names}
    if any(use_dora[name] for name in layer.merged_adapters):
        raise ValueError(f"{fn}: {module_path} has a merged DoRA adapter; unmerge it on the PeftModel first")
    if len(layer.active_adapters) > 1:
        raise ValueError(f"{fn}: {module_path} has several active adapters {layer.active_adapters}")
    base = layer.base_layer
    if not isinstance(base, nn.Embedding):
        raise TypeError(f"{fn}: {module_path}'s base is a {type(base).__name__}, LoRAEmbedding wraps nn.Embedding")
    if not names:
        return base
    requires_grad = [p.requires_grad for p in base.parameters()]

    def use_rslora(name):
        if hasattr(layer, "use_rslora"):
            return layer.use_rslora.get(name, False)
        r = layer.r[name]  # PEFT before 0.18 keeps only the scaling it chose
        return r > 1 and math.isclose(layer.scaling[name], layer.lora_alpha[name] / math.sqrt(r))

    settings = [
        dict(r=layer.r[name], lora_alpha=layer.lora_alpha[name], use_rslora=use_rslora(name), use_dora=use_dora[name])
        for name in names
    ]
    ours = LoRAEmbedding(base, adapter_name=names[0], init_lora_weights=False, **settings[0])
    for parameter, flag in zip(base.parameters(), requires_grad):
        parameter.requires_grad_(flag)
    for name, setting in zip(names[1:], settings[1:]):
        ours.add_adapter(name, init_lora_weights=False, **setting)
    active = layer.active_adapters[0] if layer.active_adapters else None
    ours.set_adapter(active if active in names else None)
    ours.lora_embedding_A, ours.lora_embedding_B = layer.lora_embedding_A, layer.lora_embedding_B  # PEFT's very ones
    if any(use_dora.values()):  # PEFT's DoraEmbeddingLayer modules: each holds m as .weight, as DoRAMagnitude does
        ours.lora_magnitude_vector = layer.lora_magnitude_vector
    for name in names:
        ours.scaling[name] = layer.scaling[name]
    ours.merged_adapters = list(layer.merged_adapters)
    if layer.disable_adapters:
        ours.disable_adapters()
    return ours


def _modules_to_save(wrapper) -> ModulesToSave:
    """A ModulesToSave over PEFT's ModulesToSaveWrapper's very modules (original and per-adapter copies)."""
    active = wrapper.active_adapters[0] if wrapper.active_adapters else None
    return ModulesToSave.sharing(
        wrapper.original_module, wrapper.modules_to_save, active, not getattr(wrapper, "disable_adapters", False)
    )


def from_peft(peft_model) -> nn.Module:
    """Replace, in place, every peft.tuners.lora.Linear of a live PeftModel with a LoRALinear that holds the
    same base layer and the same adapter modules (weights, scaling, active adapter, merged state), and return
    the underlying transformers model (peft_model.base_model.model).

    peft_model stays usable: its methods that act on adapter layers (save_pretrained, set_adapter,
    disable_adapter, merge_and_unload, ...) act on the LoRALinear layers from then on, and those that cannot
    raise an error naming the alternative (see _ConvertedPeftModel). A second call returns the model again.
    LoRA on bare parameters (target_parameters, PEFT's nested ParamWrappers: what its all-linear puts on the MoE
    experts and routers of transformers 5.x) becomes LoRAExperts / LoRAParameter over the same matrices; those hold
    one adapter, so set_adapter to another adapter and merging raise for them.
    DoRA adapters convert too (their magnitudes are PEFT's very parameters); merged ones must be unmerged first.
    PEFT's modules_to_save wrappers become ModulesToSave over the same original and copies, its LoRA embeddings
    LoRAEmbedding over the same parameters.
    Refused, with the model unchanged: adapters of other PEFT types, bias, trainable tokens, fan_in_fan_out, merged
    DoRA adapters, and LoRA on anything but linear layers, embeddings and bare parameters (convolutions).

    A prompt-learning PeftModel (PROMPT_TUNING, PREFIX_TUNING, one adapter) converts too: the transformers model
    (peft_model.base_model) gets a PromptTuning / PrefixTuning over PEFT's very parameters, and is returned;
    peft_model's forward, generate and save_pretrained call it from then on.
    """
    fn = "from_peft"
    try:
        from peft import PeftModel
        from peft.tuners.lora import Embedding as PeftLoraEmbedding
        from peft.tuners.lora import Linear as PeftLoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as error:
        raise ImportError(f"{fn}: needs the peft package") from error
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"{fn}: peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    if isinstance(peft_model, _ConvertedPromptModel):
        return peft_model.base_model
    if isinstance(peft_model, _ConvertedPeftModel):
        return peft_model.base_model.model
    if getattr(peft_model.active_peft_config, "is_prompt_learning", False):
        from pyfastpeft.integrations import prompt_learning

        model = prompt_learning.from_peft(fn, peft_model)
        peft_model.__class__ = _converted_class(_ConvertedPromptModel, type(peft_model))
        return model
    _check_peft_configs(fn, peft_model.peft_config)
    model = peft_model.base_model.model
    lora_layers, embedding_layers, wrappers, saved, others = [], [], [], [], []
    lora_classes = (PeftLoraLinear, *peft_bitsandbytes_lora_classes())  # LoRA over bitsandbytes layers: QLoRA
    inside = ()
    for module_path, module in model.named_modules():
        if module_path.startswith(inside):
            continue
        if type(module) in lora_classes:
            lora_layers.append((module_path, module))
            inside += (module_path + ".",)  # its own parts: base layer, A, B, DoRA's magnitudes
        elif type(module) is PeftLoraEmbedding:
            embedding_layers.append((module_path, module))
            inside += (module_path + ".",)
        elif type(module).__name__ == "ModulesToSaveWrapper" and type(module).__module__.startswith("peft."):
            saved.append((module_path, module))
            inside += (module_path + ".",)
        elif type(module).__name__ == "ParamWrapper" and type(module).__module__.startswith("peft."):
            wrappers.append((module_path, module))  # the outermost of a chain; the rest are inside it
            inside += (module_path + ".",)
        elif isinstance(module, BaseTunerLayer) or type(module).__module__.startswith("peft."):
            others.append(f"{module_path} ({type(module).__module__}.{type(module).__name__})")
    if others:
        raise ValueError(
            f"{fn}: LoRALinear converts LoRA on linear layers (peft.tuners.lora.Linear) only; the "
            f"model also holds {others[:4]}"
        )
    if not lora_layers and not wrappers:
        raise ValueError(f"{fn}: the model holds no peft.tuners.lora.Linear layer")
    converted = [(module_path, _converted(fn, module_path, layer)) for module_path, layer in lora_layers]
    converted += [(module_path, _param_wrappers(fn, module_path, outer)) for module_path, outer in wrappers]
    converted += [(module_path, _modules_to_save(module)) for module_path, module in saved]
    converted += [
        (module_path, _converted_embedding(fn, module_path, layer)) for module_path, layer in embedding_layers
    ]
    for module_path, ours in converted:
        _replace_module(model, module_path, ours)
    peft_model.base_model.__class__ = _converted_class(_ConvertedLoraModel, type(peft_model.base_model))
    peft_model.__class__ = _converted_class(_ConvertedPeftModel, type(peft_model))
    return model


# ---- the PeftModel after from_peft ---------------------------------------------------------------------------


@functools.cache
def _converted_class(methods: type, peft_class: type) -> type:
    """peft_class with `methods` first in its MRO, under the same name (isinstance checks keep working)."""
    return type(peft_class.__name__, (methods, peft_class), {"__doc__": methods.__doc__})


def _new_converted(methods: type, peft_class: type):
    cls = _converted_class(methods, peft_class)
    return cls.__new__(cls)


class _Converted:
    """Pickles (torch.save, deepcopy) as the importable pair (methods, PEFT class), not as the class made of them."""

    def __reduce_ex__(self, protocol):
        methods, peft_class = type(self).__bases__
        return _new_converted, (methods, peft_class), self.__dict__


def _unsupported(method: str, alternative: str):
    return NotImplementedError(
        f"PeftModel.{method}: this PeftModel's LoRA layers were converted by pyfastpeft.from_peft; {alternative}"
    )


def _one_adapter_name(fn: str, adapter_name) -> str:
    if isinstance(adapter_name, (list, tuple)) and len(adapter_name) == 1:
        adapter_name = adapter_name[0]
    if not isinstance(adapter_name, str):
        raise ValueError(f"{fn}: LoRALinear applies one adapter at a time; pass one adapter name, got {adapter_name!r}")
    return adapter_name


class _ConvertedLoraModel(_Converted):
    """PEFT's LoraModel (PeftModel.base_model) over LoRALinear layers: set_adapter, enable / disable_adapter_layers,
    merge_adapter, unmerge_adapter, merge_and_unload, unload, delete_adapter and set_requires_grad act on them;
    add_weighted_adapter, inject_adapter, subtract_mutated_init and mixed-adapter batches raise."""

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        fn = "set_adapter"
        adapter_name = _one_adapter_name(fn, adapter_name)
        layers = _lora_layers(self.model)
        if not any(adapter_name in layer.lora_A for _, layer in layers):
            found = sorted({name for _, layer in layers for name in layer.lora_A})
            raise ValueError(f"{fn}: no layer has adapter {adapter_name!r}; the model's adapters are {found}")
        _refuse_moe(fn, self.model, adapter_name)
        for _, layer in layers:
            layer.set_adapter(adapter_name if adapter_name in layer.lora_A else None)
            if inference_mode and adapter_name in layer.lora_A:
                layer.lora_A[adapter_name].weight.requires_grad_(False)
                layer.lora_B[adapter_name].weight.requires_grad_(False)
        for _, layer in _embedding_layers(self.model):
            layer.set_adapter(adapter_name if adapter_name in layer.lora_embedding_A else None)
            if inference_mode and adapter_name in layer.lora_embedding_A:
                layer.lora_embedding_A[adapter_name].requires_grad_(False)
                layer.lora_embedding_B[adapter_name].requires_grad_(False)
        for _, module in _saved_modules(self.model):
            module.set_adapter(adapter_name if adapter_name in module.modules_to_save else None)
            if inference_mode and adapter_name in module.modules_to_save:
                module.modules_to_save[adapter_name].requires_grad_(False)
        self.active_adapter = adapter_name

    def enable_adapter_layers(self) -> None:
        for _, layer in _lora_layers(self.model) + _embedding_layers(self.model) + _saved_modules(self.model):
            layer.enable_adapters()
        for _, layer in _moe_layers(self.model):
            layer.adapters_enabled = True

    def disable_adapter_layers(self) -> None:
        for _, layer in _lora_layers(self.model) + _embedding_layers(self.model) + _saved_modules(self.model):
            layer.disable_adapters()
        for _, layer in _moe_layers(self.model):
            layer.adapters_enabled = False

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Merge the active adapter into every layer that has it (LoRALinear merges the active adapter only)."""
        fn = "merge_adapter"
        _refuse_moe(fn, self.model)
        layers = [
            layer for _, layer in _lora_layers(self.model) if layer.active_adapter is not None and not layer.merged
        ]
        active = sorted({layer.active_adapter for layer in layers})
        if adapter_names is not None and sorted(set(adapter_names)) != active:
            raise ValueError(
                f"{fn}: LoRALinear merges the active adapter {active}, not {list(adapter_names)}; "
                "set_adapter(name) first"
            )
        if any(not layer.adapters_enabled for layer in layers):
            raise ValueError(f"{fn}: adapters are disabled; enable_adapter_layers() first")
        if safe_merge:
            broken = [
                path
                for path, layer in _lora_layers(self.model)
                if layer in layers
                and not all(
                    torch.isfinite(table[layer.active_adapter].weight).all() for table in (layer.lora_A, layer.lora_B)
                )
            ]
            if broken:
                raise ValueError(f"{fn}: non-finite adapter weights in {broken[:4]}; nothing was merged")
        for layer in layers:
            layer.merge()
        for _, layer in _embedding_layers(self.model):
            if layer.active_adapter is not None and layer.adapters_enabled and not layer.merged:
                layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in _lora_layers(self.model) + _embedding_layers(self.model):
            if layer.merged:
                layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        self.merge_adapter(adapter_names, safe_merge)
        return self.unload()

    def unload(self):
        """Put every layer's base back (merged weights stay merged, as in PEFT) and return the model."""
        _refuse_moe("unload", self.model)
        for module_path, layer in _lora_layers(self.model):
            _replace_module(self.model, module_path, layer.base_layer)
        for module_path, layer in _embedding_layers(self.model):
            _replace_module(self.model, module_path, layer.base_layer)
        for module_path, module in _saved_modules(self.model):  # PEFT keeps the trained copy in use
            _replace_module(self.model, module_path, module.module_in_use())
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        fn = "delete_adapter"
        if adapter_name not in self.peft_config:
            raise ValueError(f"{fn}: adapter {adapter_name!r} does not exist")
        holders = [(path, layer) for path, layer in _lora_layers(self.model) if adapter_name in layer.lora_A]
        if any(module.adapter_name == adapter_name for _, module in _moe_layers(self.model)):
            raise _unsupported(fn, f"adapter {adapter_name!r} is on MoE experts or routers; delete it before from_peft")
        merged = [path for path, layer in holders if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"{fn}: adapter {adapter_name!r} is merged into {merged[:4]}; unmerge_adapter() first")
        del self.peft_config[adapter_name]
        for path, layer in holders:
            if len(layer.lora_A) == 1:
                _replace_module(self.model, path, layer.base_layer)
            else:
                layer.delete_adapter(adapter_name)
        for path, layer in _embedding_layers(self.model):
            if adapter_name in layer.lora_embedding_A:
                if len(layer.lora_embedding_A) == 1:
                    _replace_module(self.model, path, layer.base_layer)
                else:
                    layer.delete_adapter(adapter_name)
        for path, module in _saved_modules(self.model):
            if adapter_name in module.modules_to_save:
                if len(module.modules_to_save) == 1:
                    _replace_module(self.model, path, module.original_module)
                else:
                    module.delete_adapter(adapter_name)
        if self.active_adapter == adapter_name or self.active_adapter == [adapter_name]:
            remaining = [
                name for name in self.peft_config if any(name in layer.lora_A for _, layer in _lora_layers(self.model))
            ]
            if remaining:
                self.set_adapter(remaining[0])
            else:
                self.active_adapter = []

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for _, layer in _lora_layers(self.model):
            for name in names:
                if name in layer.lora_A:
                    layer.lora_A[name].weight.requires_grad_(requires_grad)
                    layer.lora_B[name].weight.requires_grad_(requires_grad)
        for _, layer in _moe_layers(self.model):
            if layer.adapter_name in names:
                for matrices in (layer.lora_A, layer.lora_B):
                    matrices.requires_grad_(requires_grad)

    def add_weighted_adapter(self, *args, **kwargs):
        raise _unsupported("add_weighted_adapter", "combine adapters with PEFT before converting")

    def inject_adapter(self, *args, **kwargs):
        raise _unsupported("inject_adapter", "add adapters with pyfastpeft.add_lora or pyfastpeft.load_adapter")

    def subtract_mutated_init(self, *args, **kwargs):
        raise _unsupported("subtract_mutated_init", "convert PiSSA / OLoRA adapters with PEFT before converting")

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None or kwargs.get("alora_offsets") is not None:
            raise _unsupported(
                "forward",
                "batches that mix adapters (adapter_names=) or aLoRA offsets are not "
                "supported; call set_adapter(name) between batches",
            )
        yield


class _ConvertedPeftModel(_Converted):
    """A PeftModel whose LoRA layers pyfastpeft.from_peft converted to LoRALinear. save_pretrained writes each
    adapter with pyfastpeft.save_adapter, disable_adapter disables the LoRALinear layers, load_adapter reads a
    local directory with pyfastpeft.load_adapter; set_adapter, delete_adapter, merge_and_unload and the rest act
    through base_model (_ConvertedLoraModel). add_adapter, get_layer_status and get_model_status raise."""

    def save_pretrained(
        self,
        save_directory,
        safe_serialization: bool = True,
        selected_adapters=None,
        save_embedding_layers="auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion=None,
        **kwargs,
    ) -> None:
        fn = "PeftModel.save_pretrained"
        if not safe_serialization:
            raise _unsupported(
                "save_pretrained", "adapters are written as safetensors only; pass safe_serialization=True"
            )
        if path_initial_model_for_weight_conversion is not None:
            raise _unsupported("save_pretrained", "PiSSA / OLoRA weight conversion is not supported")
        save_directory = _check_path(fn, save_directory)
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"{fn}: unknown adapters {unknown}; the model's adapters are {list(self.peft_config)}")
        state_dict = kwargs.get("state_dict")
        if state_dict is not None:  # keyed as this PeftModel's state_dict, e.g. gathered by a Trainer
            state_dict = {key.removeprefix(KEY_PREFIX): value for key, value in state_dict.items()}
        model = self.base_model.model
        files = [(name, _adapter_files(fn, model, name, state_dict)) for name in names]
        if not is_main_process:
            return
        for name, (config, tensors) in files:
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            _write_directory(fn, directory, config, tensors)

    @contextlib.contextmanager
    def disable_adapter(self):
        layers = [layer for _, layer in _lora_layers(self.base_model.model)]
        moe = [layer for _, layer in _moe_layers(self.base_model.model)]
        enabled = [layer.adapters_enabled for layer in layers + moe]
        for layer in layers:
            layer.disable_adapters()
        for layer in moe:
            layer.adapters_enabled = False
        self._adapters_disabled = True
        try:
            yield
        finally:
            for layer, was_enabled in zip(layers, enabled):
                if was_enabled:
                    layer.enable_adapters()
            for layer, was_enabled in zip(moe, enabled[len(layers) :]):
                layer.adapters_enabled = was_enabled
            self._adapters_disabled = False

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, **kwargs):
        fn = "PeftModel.load_adapter"
        if not isinstance(model_id, (str, os.PathLike)) or not os.path.isdir(model_id):
            raise _unsupported(
                "load_adapter",
                f"adapters load from a local directory (pyfastpeft.load_adapter), "
                f"and {model_id!r} is not one; download it first "
                "(huggingface_hub.snapshot_download)",
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"{fn}: adapter {adapter_name!r} already exists")
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(os.fspath(model_id))
        load_adapter(self.base_model.model, model_id, adapter_name)
        config.inference_mode = not is_trainable
        self.peft_config[adapter_name] = config

    def add_adapter(self, *args, **kwargs):
        raise _unsupported(
            "add_adapter",
            "add one with pyfastpeft.add_lora(model, target_modules=..., "
            "adapter_name=...) on the model from_peft returned",
        )

    def get_layer_status(self, *args, **kwargs):
        raise _unsupported(
            "get_layer_status", "each LoRALinear layer reports active_adapter, adapters_enabled and merged_adapters"
        )

    def get_model_status(self, *args, **kwargs):
        raise _unsupported(
            "get_model_status", "each LoRALinear layer reports active_adapter, adapters_enabled and merged_adapters"
        )


class _ConvertedPromptModel(_Converted):
    """A prompt-learning PeftModel that pyfastpeft.from_peft converted: the prompt or prefix now lives on the
    transformers model (model.prompt_encoder, over PEFT's own parameters), so forward and generate call that model
    as is, and save_pretrained writes it with pyfastpeft.save_adapter."""

    def forward(self, *args, **kwargs):
        kwargs.pop("task_ids", None)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        kwargs.pop("task_ids", None)
        return self.base_model.generate(*args, **kwargs)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, is_main_process: bool = True, **kwargs):
        fn = "PeftModel.save_pretrained"
        if not safe_serialization:
            raise NotImplementedError(f"{fn}: adapters are written as safetensors only; pass safe_serialization=True")
        save_directory = _check_path(fn, save_directory)
        config, tensors = _adapter_files(fn, self.base_model, "default")
        if is_main_process:
            _write_directory(fn, save_directory, config, tensors)

    def add_adapter(self, *args, **kwargs):
        raise NotImplementedError("PeftModel.add_adapter: converted by pyfastpeft.from_peft, it holds one adapter")

    def load_adapter(self, *args, **kwargs):
        raise NotImplementedError("PeftModel.load_adapter: converted by pyfastpeft.from_peft, it holds one adapter")
