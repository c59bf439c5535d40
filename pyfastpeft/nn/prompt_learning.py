"""Prompt tuning (Lester, Al-Rfou and Constant, 2021) and prefix tuning (Li and Liang, 2021) for causal LMs: PEFT's
PROMPT_TUNING and PREFIX_TUNING, installed on a transformers model in place.

- PromptTuning: n trained virtual-token embeddings [n, hidden] are put before every sequence's input embeddings.
- PrefixTuning: n trained key/value vectors per layer are put before every layer's keys and values, as a prefilled
  KV cache [n, layers * 2 * kv_heads * head_dim]; with prefix_projection they are the output of PEFT's
  reparametrization MLP (Linear -> tanh -> Linear) over n trained embeddings, which trains more stably.

The method lives in one submodule, model.prompt_encoder, and two hooks on the model's forward. The pre-hook, on every
call (training, evaluation, each step of generate):
- puts n ones before a 2-D attention_mask, and shifts position_ids / cache_position (transformers < 5.x) by n, so
  the real tokens keep the positions they have after the virtual ones;
- when the call starts a sequence (no cache, or an empty one), prepends the prompts to the embeddings (and n
  ignored labels, -100, to labels) or fills the cache with the prefix; a call that continues a cache (a decode step)
  finds them there already.
The post-hook drops the virtual tokens' rows from outputs.logits: logits keep one row per real token, as without the
method, so Trainer metrics, TRL's token accuracy and generate's next-token choice read them unchanged (PEFT's
PeftModel returns the virtual rows too). The loss is computed inside, over the extended labels, as PEFT's.

Nothing here is fused: the prompt is an embedding lookup and a concatenation, the prefix at most a two-layer MLP over
n rows, negligible beside the model; what the hooks buy is that generate and the KV cache work on every transformers
release we support (PEFT 0.21's generate drops the prefix, and misplaces the prompt's positions, on transformers 5.x).
Left-padded batches work as the base model's do: the virtual tokens are attended by every real token.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

ATTRIBUTE = "prompt_encoder"  # where the method's module sits on the model
IGNORE_INDEX = -100


@dataclasses.dataclass
class PromptLearningReport:
    """What add_prompt_tuning / add_prefix_tuning installed: the method ("prompt_tuning" or "prefix_tuning"), its
    virtual tokens, its trainable parameters, and the model's trainable and total parameter counts."""

    method: str
    num_virtual_tokens: int
    method_params: int = 0
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        return (
            f"pyfastpeft.add_{self.method}: {self.num_virtual_tokens} virtual tokens, {self.method_params:,} "
            f"parameters; trainable params {self.trainable_params:,} of {self.total_params:,} ({share:.4f}%)"
        )


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config(decoder=True) if callable(get_text_config) else config


class _PromptLearning(nn.Module):
    """The hooks both methods share; subclasses say how a fresh sequence gets its virtual tokens."""

    method: str
    num_virtual_tokens: int

    def __init__(self) -> None:
        super().__init__()
        self._handles: list = []
        self._real_tokens: int | None = None  # set by the pre-hook when it prepended prompts, read by the post-hook
        self._cache_name = "past_key_values"  # the model's name for its cache argument ("cache" on transformers 5.x)

    # -- installation ---------------------------------------------------------------------------------------------

    def install(self, model: nn.Module) -> None:
        """Hang this module on model (model.prompt_encoder) and hook model's forward."""
        parameters = inspect.signature(type(model).forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        model.add_module(ATTRIBUTE, self)
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def uninstall(self, model: nn.Module) -> None:
        """Remove the hooks and the module: model computes as it did before the method was added."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if model._modules.get(ATTRIBUTE) is self:
            del model._modules[ATTRIBUTE]

    def __getstate__(self):  # hook handles do not pickle; a copy of the model carries its hooks itself
        state = self.__dict__.copy()
        state["_handles"] = []
        return state

    # -- the hooks ------------------------------------------------------------------------------------------------

    def _begin_sequence(self, model, kwargs: dict, batch: int, tokens: int, device) -> None:
        raise NotImplementedError

    def _before_forward(self, model, args, kwargs):
        fn = f"{type(self).__name__} (model.{ATTRIBUTE})"
        self._real_tokens = None
        if args:
            if len(args) > 1 or "input_ids" in kwargs or "inputs_embeds" in kwargs:
                raise TypeError(f"{fn}: pass the model's inputs as keywords (input_ids=..., attention_mask=...)")
            kwargs = {**kwargs, "input_ids": args[0]}
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if (ids is None) == (embeds is None):
            raise ValueError(f"{fn}: pass exactly one of input_ids and inputs_embeds")
        source = ids if ids is not None else embeds
        if source.dim() < 2:
            raise ValueError(
                f"{fn}: input_ids / inputs_embeds must be [batch, tokens(, hidden)], got {tuple(source.shape)}"
            )
        batch, tokens, device = source.shape[0], source.shape[1], source.device
        n = self.num_virtual_tokens
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")
        if cache is not None and not callable(getattr(cache, "get_seq_length", None)):
            raise TypeError(f"{fn}: the cache must be a transformers Cache (DynamicCache), got {type(cache).__name__}")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(
                f"{fn}: a static cache ({type(cache).__name__}) is sized for the real tokens only; use the default "
                "DynamicCache (generate's default cache_implementation)"
            )
        fresh = cache is None or cache.get_seq_length() == 0
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError(
                    f"{fn}: attention_mask must be a 2-D [batch, tokens] tensor, which gets the virtual tokens' ones; "
                    f"got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}"
                )
            ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
            kwargs["attention_mask"] = torch.cat((ones, mask), dim=1)
        prepends = fresh and isinstance(self, PromptTuning)
        for name in ("position_ids", "cache_position"):
            positions = kwargs.get(name)
            if positions is None:
                continue
            shifted = positions + n
            if prepends:  # the virtual tokens take positions 0 .. n-1 themselves
                virtual = torch.arange(n, device=positions.device, dtype=positions.dtype)
                virtual = virtual.expand(*positions.shape[:-1], n)
                shifted = torch.cat((virtual, shifted), dim=-1)
            kwargs[name] = shifted
        if fresh:
            self._begin_sequence(model, kwargs, batch, tokens, device)
        return (), kwargs

    def _after_forward(self, model, args, kwargs, output):
        tokens, self._real_tokens = self._real_tokens, None
        logits = getattr(output, "logits", None)
        if tokens is not None and isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] > tokens:
            output.logits = logits[:, logits.shape[1] - tokens :]
        return output


class PromptTuning(_PromptLearning):
    """num_virtual_tokens trained input embeddings before every sequence (PEFT's PromptEmbedding; its parameter
    `embedding.weight`, kept in fp32 and cast to the embeddings' dtype on use)."""

    method = "prompt_tuning"

    def __init__(self, num_virtual_tokens: int, token_dim: int, device=None, embedding: nn.Embedding | None = None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.token_dim = token_dim
        self.embedding = (
            embedding if embedding is not None else nn.Embedding(num_virtual_tokens, token_dim, device=device)
        )

    def prompts(self) -> torch.Tensor:
        """[num_virtual_tokens, token_dim]."""
        return self.embedding.weight

    def _begin_sequence(self, model, kwargs, batch, tokens, device) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])
        prompts = self.prompts().to(device=embeds.device, dtype=embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat((prompts.expand(batch, -1, -1), embeds), dim=1)
        kwargs["input_ids"] = None
        labels = kwargs.get("labels")
        if labels is not None:
            ignored = torch.full((labels.shape[0], self.num_virtual_tokens), IGNORE_INDEX, dtype=labels.dtype)
            kwargs["labels"] = torch.cat((ignored.to(labels.device), labels), dim=1)
        self._real_tokens = tokens


class PrefixTuning(_PromptLearning):
    """num_virtual_tokens trained keys and values before every layer's own (PEFT's PrefixEncoder): the prefix is
    `embedding.weight` [n, layers * 2 * kv_heads * head_dim], or with prefix_projection
    transform(embedding.weight), transform = Linear(token_dim, encoder_hidden_size) -> tanh ->
    Linear(encoder_hidden_size, layers * 2 * token_dim), token_dim = kv_heads * head_dim. Row layout, PEFT's:
    [layer 0 keys, layer 0 values, layer 1 keys, ...], each kv_heads blocks of head_dim."""

    method = "prefix_tuning"

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        num_key_value_heads: int,
        head_dim: int,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        device=None,
        embedding: nn.Embedding | None = None,
        transform: nn.Sequential | None = None,
    ):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.token_dim = num_key_value_heads * head_dim
        self.prefix_projection = prefix_projection
        self.encoder_hidden_size = encoder_hidden_size or self.token_dim
        width = num_layers * 2 * self.token_dim
        if prefix_projection:
            self.embedding = (
                embedding if embedding is not None else nn.Embedding(num_virtual_tokens, self.token_dim, device=device)
            )
            self.transform = (
                transform
                if transform is not None
                else nn.Sequential(
                    nn.Linear(self.token_dim, self.encoder_hidden_size, device=device),
                    nn.Tanh(),
                    nn.Linear(self.encoder_hidden_size, width, device=device),
                )
            )
        else:
            self.embedding = (
                embedding if embedding is not None else nn.Embedding(num_virtual_tokens, width, device=device)
            )

    def prefix(self) -> torch.Tensor:
        """[num_virtual_tokens, num_layers * 2 * token_dim]: what PEFT saves as prompt_embeddings."""
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [batch, kv_heads, n, head_dim] (expanded over the batch, not copied)."""
        n, heads, dim = self.num_virtual_tokens, self.num_key_value_heads, self.head_dim
        prefix = self.prefix().to(dtype).view(n, self.num_layers * 2, heads, dim).permute(1, 2, 0, 3)
        return [
            (prefix[2 * layer].expand(batch, -1, -1, -1), prefix[2 * layer + 1].expand(batch, -1, -1, -1))
            for layer in range(self.num_layers)
        ]

    def _begin_sequence(self, model, kwargs, batch, tokens, device) -> None:
        if model.training and torch.is_grad_enabled() and _checkpointing(model):
            raise ValueError(
                "PrefixTuning (model.prompt_encoder): transformers' gradient-checkpointed layers drop the KV cache "
                "that holds the prefix in training, so the prefix would neither act nor train; turn gradient "
                "checkpointing off (TrainingArguments / SFTConfig(gradient_checkpointing=False), "
                "model.gradient_checkpointing_disable()) or use prompt tuning"
            )
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")
        name = "cache" if kwargs.get("cache") is not None else self._cache_name
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        dtype = getattr(model, "dtype", None) or self.embedding.weight.dtype
        position = torch.arange(self.num_virtual_tokens, device=device)
        for layer, (keys, values) in enumerate(self.key_values(batch, dtype)):
            cache.update(keys.to(device), values.to(device), layer, {"cache_position": position})
        kwargs[name] = cache


def _checkpointing(model: nn.Module) -> bool:
    """Whether model's layers run under transformers' gradient checkpointing (the flag its layers carry)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in dir(type(model)):
            import warnings

            with warnings.catch_warnings():  # one of the two is deprecated on each transformers release
                warnings.simplefilter("ignore")
                return bool(getattr(model, name))
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


# ---- entry points -------------------------------------------------------------------------------------------------


def _check_count(fn: str, name: str, value, upper: int = 1 << 16) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{fn}: {name} must be an int in [1, {upper}], got {value!r}")
    return value


def check_model(fn: str, model: nn.Module):
    """The model's decoder config, once model is shown to be a causal LM that holds no prompt-learning method yet."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    type_name = type(model).__name__
    if type_name.startswith("PeftModel"):
        raise TypeError(f"{fn}: model is a PeftModel; convert it with pyfastpeft.from_peft first")
    config = _text_config(model)
    if config is None or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"{fn}: needs a transformers decoder-only model (model.config), got {type_name}")
    if ATTRIBUTE in model._modules or hasattr(type(model), ATTRIBUTE):
        raise ValueError(f"{fn}: model already holds model.{ATTRIBUTE}; one prompt-learning method per model")
    return config


def prefix_shape(fn: str, config) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a decoder whose layers all share one KV shape, as PEFT provisions it."""
    values = config.to_dict() if callable(getattr(config, "to_dict", None)) else vars(config)
    unusual = [
        name
        for name in ("global_head_dim", "per_layer_config", "num_kv_shared_layers")
        if values.get(name) not in (None, 0, {})
    ]
    if unusual:
        raise ValueError(f"{fn}: the model's layers do not share one KV shape ({unusual}); not supported")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    layers = getattr(config, "num_hidden_layers", None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        raise ValueError(f"{fn}: cannot read num_hidden_layers / num_key_value_heads / head_dim from the config")
    return layers, kv_heads, head_dim


def _finish(model: nn.Module, module: _PromptLearning, freeze_others: bool) -> PromptLearningReport:
    if freeze_others:
        model.requires_grad_(False)
    module.install(model)
    module.requires_grad_(True)
    return PromptLearningReport(
        method=module.method,
        num_virtual_tokens=module.num_virtual_tokens,
        method_params=sum(p.numel() for p in module.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
    )


def add_prompt_tuning(
    model: nn.Module, num_virtual_tokens: int = 20, init="random", freeze_others: bool = True
) -> PromptLearningReport:
    """Prompt tuning on a causal LM, in place: num_virtual_tokens trained embeddings before every sequence
    (model.prompt_encoder, a PromptTuning); every other parameter freezes unless freeze_others=False. Returns a
    PromptLearningReport. save_adapter writes PEFT's PROMPT_TUNING directory.

    init, PEFT's prompt_tuning_init: "random" (N(0, 1), PEFT's RANDOM), "sample_vocab" (the embeddings of random
    vocabulary tokens), or a sequence of token ids (PEFT's TEXT: pass tokenizer(text)["input_ids"]), repeated or
    cut to num_virtual_tokens.
    """
    fn = "add_prompt_tuning"
    check_model(fn, model)
    _check_count(fn, "num_virtual_tokens", num_virtual_tokens)
    if not isinstance(freeze_others, bool):
        raise TypeError(f"{fn}: freeze_others must be a bool, got {type(freeze_others).__name__}")
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{fn}: model.get_input_embeddings() has no 2-D weight to size the prompt from")
    vocab, token_dim = weight.shape
    token_ids = None
    if isinstance(init, str):
        if init not in ("random", "sample_vocab"):
            raise ValueError(f"{fn}: init must be 'random', 'sample_vocab' or a sequence of token ids, got {init!r}")
        if init == "sample_vocab":
            token_ids = torch.randint(0, vocab, (num_virtual_tokens,)).tolist()
    else:
        token_ids = list(init) if isinstance(init, (list, tuple, torch.Tensor)) else None
        if token_ids is None or not token_ids:
            raise ValueError(f"{fn}: init must be 'random', 'sample_vocab' or a non-empty sequence of token ids")
        token_ids = [int(t) for t in token_ids]
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"{fn}: init holds token ids outside [0, {vocab})")
        token_ids = (token_ids * -(-num_virtual_tokens // len(token_ids)))[:num_virtual_tokens]
    module = PromptTuning(num_virtual_tokens, token_dim, device=weight.device)
    if token_ids is not None:
        with torch.no_grad():
            ids = torch.tensor(token_ids, device=weight.device)
            module.embedding.weight.copy_(embeddings(ids).float())
    return _finish(model, module, freeze_others)


def add_prefix_tuning(
    model: nn.Module,
    num_virtual_tokens: int = 20,
    prefix_projection: bool = False,
    encoder_hidden_size: int | None = None,
    init: str = "random",
    freeze_others: bool = True,
) -> PromptLearningReport:
    """Prefix tuning on a causal LM, in place: num_virtual_tokens trained keys and values before every layer's
    (model.prompt_encoder, a PrefixTuning); every other parameter freezes unless freeze_others=False. Returns a
    PromptLearningReport. save_adapter writes PEFT's PREFIX_TUNING directory.

    prefix_projection: compute the prefix with the reparametrization MLP (hidden size encoder_hidden_size, default
    kv_heads * head_dim) rather than train it directly. init: "random" (torch's defaults, PEFT's) or "zero" (a
    zero prefix, PEFT's init_weights="zero"; the output still changes, as the zero keys take attention weight).
    """
    fn = "add_prefix_tuning"
    config = check_model(fn, model)
    _check_count(fn, "num_virtual_tokens", num_virtual_tokens)
    for name, value in (("prefix_projection", prefix_projection), ("freeze_others", freeze_others)):
        if not isinstance(value, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    if encoder_hidden_size is not None:
        _check_count(fn, "encoder_hidden_size", encoder_hidden_size, upper=1 << 20)
    if init not in ("random", "zero"):
        raise ValueError(f"{fn}: init must be 'random' or 'zero', got {init!r}")
    layers, kv_heads, head_dim = prefix_shape(fn, config)
    device = next((p.device for p in model.parameters()), None)
    module = PrefixTuning(
        num_virtual_tokens, layers, kv_heads, head_dim, prefix_projection, encoder_hidden_size, device=device
    )
    if init == "zero":
        with torch.no_grad():
            last = module.transform[-1] if prefix_projection else module.embedding
            for parameter in last.parameters():
                parameter.zero_()
    return _finish(model, module, freeze_others)


def prompt_learning_module(model: nn.Module) -> _PromptLearning | None:
    module = getattr(model, "_modules", {}).get(ATTRIBUTE)
    return module if isinstance(module, _PromptLearning) else None
