"""PEFT's PROMPT_TUNING and PREFIX_TUNING adapter directories for the methods of pyfastpeft.nn.prompt_learning: what
save_adapter writes, what load_adapter reads, and from_peft's conversion of a live PeftModel.

The format, PEFT's: adapter_config.json (peft_type, task_type CAUSAL_LM, num_virtual_tokens, token_dim,
num_attention_heads, num_layers, num_transformer_submodules 1, for prefixes encoder_hidden_size and
prefix_projection) and one tensor, prompt_embeddings: the prompt [n, token_dim], or the prefix as the model uses it
[n, num_layers * 2 * token_dim] (with prefix_projection, the MLP's output: the MLP itself is not saved, as PEFT does
not save it; such a prefix loads as a directly trained one). For prefixes token_dim = kv_heads * head_dim and
num_attention_heads = kv_heads (PEFT's provisioning for grouped-query attention).

A directory is untrusted: every setting is type- and range-checked, the shapes must be the model's, the tensor
finite, and nothing else may be in the file, before the model changes.
"""

from __future__ import annotations

import torch
from torch import nn

from pyfastpeft.nn.prompt_learning import (
    PrefixTuning,
    PromptTuning,
    check_model,
    prefix_shape,
    prompt_learning_module,
)

PEFT_TYPES = {"PROMPT_TUNING": PromptTuning, "PREFIX_TUNING": PrefixTuning}
TENSOR_KEY = "prompt_embeddings"
_MAX_VIRTUAL_TOKENS = 1 << 16


def _num_attention_heads(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    config = get_text_config(decoder=True) if callable(get_text_config) else config
    return getattr(config, "num_attention_heads", None)


def files(fn: str, model: nn.Module) -> tuple[dict, dict]:
    """(adapter_config.json's dict, {"prompt_embeddings": tensor}) of model's prompt-learning module."""
    module = prompt_learning_module(model)
    config = getattr(model, "config", None)
    text_config = config.get_text_config(decoder=True) if callable(getattr(config, "get_text_config", None)) else config
    common = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(config, "name_or_path", None),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": module.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "num_layers": getattr(text_config, "num_hidden_layers", None),
        "modules_to_save": None,
    }
    with torch.no_grad():
        if isinstance(module, PromptTuning):
            tensor = module.prompts()
            specific = {
                "peft_type": "PROMPT_TUNING",
                "token_dim": module.token_dim,
                "num_attention_heads": _num_attention_heads(model),
                "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None,
            }
        else:
            tensor = module.prefix()
            specific = {
                "peft_type": "PREFIX_TUNING",
                "token_dim": module.token_dim,
                "num_attention_heads": module.num_key_value_heads,
                "num_layers": module.num_layers,
                "encoder_hidden_size": module.encoder_hidden_size,
                "prefix_projection": module.prefix_projection,
                "init_weights": None,
            }
    if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2): gathered whole
        tensor = tensor.full_tensor()
    return {**common, **specific}, {TENSOR_KEY: tensor.detach().to("cpu").contiguous()}


def _int(where: str, config: dict, key: str, upper: int = 1 << 24, required: bool = True) -> int | None:
    value = config.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{where}: {key!r} must be an int in [1, {upper}], got {value!r}"[:400])
    return value


def load(fn: str, model: nn.Module, config_path: str, config: dict, weights_path: str, state: dict) -> list[str]:
    """Install the prompt-learning adapter of (config, state) on model after checking both; returns
    ["prompt_encoder"]."""
    model_config = check_model(fn, model)
    where = f"{fn}: {config_path}"
    peft_type = config.get("peft_type")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{where}: task_type {config.get('task_type')!r}; prompt learning loads for CAUSAL_LM")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(f"{where}: num_transformer_submodules must be 1 (a decoder-only model)")
    n = _int(where, config, "num_virtual_tokens", _MAX_VIRTUAL_TOKENS)
    token_dim = _int(where, config, "token_dim")
    num_layers = _int(where, config, "num_layers", required=peft_type == "PREFIX_TUNING")
    weights_where = f"{fn}: {weights_path}"
    if set(state) != {TENSOR_KEY}:
        raise ValueError(f"{weights_where}: holds {sorted(state)[:4]}; a {peft_type} adapter holds {TENSOR_KEY!r} only")
    tensor = state[TENSOR_KEY]
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"{weights_where}: {TENSOR_KEY!r} must be a floating-point tensor")
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    device = getattr(getattr(embeddings, "weight", None), "device", None)
    if peft_type == "PROMPT_TUNING":
        hidden = getattr(getattr(embeddings, "weight", None), "shape", (None, None))[-1]
        if token_dim != hidden:
            raise ValueError(f"{where}: token_dim {token_dim} is not the model's embedding size {hidden}")
        expected = (n, token_dim)
    else:
        layers, kv_heads, head_dim = prefix_shape(fn, model_config)
        heads = _int(where, config, "num_attention_heads")
        if (num_layers, heads, token_dim) != (layers, kv_heads, kv_heads * head_dim):
            raise ValueError(
                f"{where}: the prefix is for num_layers={num_layers}, num_attention_heads={heads}, "
                f"token_dim={token_dim}; the model has {layers} layers of {kv_heads} KV heads of size {head_dim}"
            )
        expected = (n, layers * 2 * token_dim)
        encoder_hidden_size = _int(where, config, "encoder_hidden_size", required=False)
        projection = config.get("prefix_projection", False)
        if not isinstance(projection, bool):
            raise TypeError(f"{where}: 'prefix_projection' must be true or false, got {projection!r}"[:400])
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{weights_where}: {TENSOR_KEY!r} has shape {tuple(tensor.shape)}, the config says {expected}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{weights_where}: {TENSOR_KEY!r} holds non-finite values")
    weight = tensor.to(device=device, dtype=torch.float32)
    embedding = nn.Embedding.from_pretrained(weight, freeze=False)
    if peft_type == "PROMPT_TUNING":
        module = PromptTuning(n, token_dim, embedding=embedding)
    else:  # a projected prefix was saved as the MLP's output: it loads as the prefix itself
        module = PrefixTuning(
            n, layers, kv_heads, head_dim, encoder_hidden_size=encoder_hidden_size, embedding=embedding
        )
    module.install(model)
    return ["prompt_encoder"]


def from_peft(fn: str, peft_model) -> nn.Module:
    """The transformers model under a prompt-learning PeftModel, with a PromptTuning / PrefixTuning over the very
    parameters of PEFT's encoder for the active adapter; peft_model's forward, generate and save_pretrained go
    through it from then on (_ConvertedPromptModel)."""
    config = peft_model.active_peft_config
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type not in PEFT_TYPES:
        raise ValueError(
            f"{fn}: a {peft_type} adapter; of the prompt-learning methods PROMPT_TUNING and PREFIX_TUNING convert"
        )
    if len(peft_model.peft_config) != 1:
        raise ValueError(
            f"{fn}: the PeftModel holds {len(peft_model.peft_config)} prompt-learning adapters; convert one"
        )
    model = peft_model.base_model
    model_config = check_model(fn, model)
    if config.num_transformer_submodules != 1:
        raise ValueError(f"{fn}: num_transformer_submodules must be 1 (a decoder-only model)")
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    n = config.num_virtual_tokens
    if peft_type == "PROMPT_TUNING":
        module = PromptTuning(n, config.token_dim, embedding=encoder.embedding)
    else:
        layers, kv_heads, head_dim = prefix_shape(fn, model_config)
        if (config.num_layers, config.token_dim) != (layers, kv_heads * head_dim):
            raise ValueError(f"{fn}: the prefix's num_layers / token_dim do not match the model's KV shape")
        projection = bool(config.prefix_projection) and not config.inference_mode  # inference: the prefix itself
        module = PrefixTuning(
            n,
            layers,
            kv_heads,
            head_dim,
            prefix_projection=projection,
            encoder_hidden_size=config.encoder_hidden_size,
            embedding=encoder.embedding,
            transform=encoder.transform if projection else None,
        )
    if module.embedding.weight.shape[0] != n:
        raise ValueError(f"{fn}: PEFT's prompt encoder does not hold num_virtual_tokens={n} rows")
    module.install(model)
    return model
