"""Builders for tests/test_real_stack.py: the LoRA settings on both sides, PEFT's reference model with seeded
initial adapters, those adapters copied into a prepared model, in-memory datasets, a word-level tokenizer (no
download) and the per-step records a Trainer logs."""

import copy

import pytest
import torch
from helpers import tiny_llama

from pyfastpeft import LoraSettings

peft = pytest.importorskip("peft")

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
LORA = LoraSettings(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")


def peft_lora_config(target_modules=None):
    """LORA in PEFT's LoraConfig (a fresh one each time: TRL edits the config it is given); target_modules, when
    given, in place of LORA's."""
    return peft.LoraConfig(
        r=LORA.r,
        lora_alpha=LORA.lora_alpha,
        lora_dropout=LORA.lora_dropout,
        target_modules=LORA.target_modules if target_modules is None else target_modules,
        task_type="CAUSAL_LM",
    )


def adapted_names(model) -> list[str]:
    """The last path components of the linear layers a prepared model holds adapters on: PEFT's target_modules for
    the same layers."""
    from pyfastpeft.nn import LoRALinear

    return sorted({path.rpartition(".")[2] for path, m in model.named_modules() if isinstance(m, LoRALinear)})


def base_model(dtype=torch.float32):
    """The tiny Llama both sides start from (hidden 64, 2 layers, vocab 128), special tokens as the tokenizer's."""
    return tiny_llama(seed=0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS).to(dtype)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The LoRA matrices under the unwrapped model's names (PEFT's `base_model.model.` prefix removed), cloned."""
    return {
        name.removeprefix("base_model.model."): p.detach().clone()
        for name, p in model.named_parameters()
        if ".lora_" in name
    }


def seed_adapters(model, seed=1) -> dict[str, torch.Tensor]:
    """Give every adapter seeded random A and B (B non-zero, so the adapters change the loss from the first step);
    returns them, as adapter_state gives them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.1 if ".lora_A." in name else 0.05))
    return adapter_state(model)


def peft_names(model) -> dict[str, str]:
    """Our name -> PEFT's for the LoRA matrices on MoE experts and routers (LoRAExperts / LoRAParameter: PEFT's
    nested ParamWrappers, target_parameters); the names of LoRALinear's are PEFT's already."""
    from pyfastpeft.integrations.peft import _moe_entries

    names = {}
    for entry in _moe_entries(model, "default"):
        for matrix, (key, _) in (("A", entry.lora_A), ("B", entry.lora_B)):
            names[key] = f"{entry.key_path}.lora_{matrix}.default.weight"
    return names


def in_peft_names(model, tensors: dict) -> dict:
    """tensors keyed by model's parameter names, keyed by PEFT's (peft_names)."""
    names = peft_names(model)
    return {names.get(key, key): value for key, value in tensors.items()}


def peft_twin(base, model, seed=1):
    """transformers + PEFT holding adapters on exactly the parts prepared `model` adapts (its adapter saved with
    pyfastpeft.save_adapter and read by PeftModel.from_pretrained: linear layers, and on MoE models the experts and
    routers through target_parameters), seeded; returns (reference, its initial adapters) as peft_reference."""
    import tempfile

    from pyfastpeft import save_adapter

    with tempfile.TemporaryDirectory() as directory:
        save_adapter(model, directory)
        reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory, is_trainable=True)
    reference.enable_input_require_grads()
    return reference, seed_adapters(reference, seed)


def load_adapters(model, adapters: dict[str, torch.Tensor]) -> None:
    """Copy adapters (adapter_state's names) into model, prepared or PEFT; the two sets of names must be equal."""
    named = in_peft_names(model, dict(model.named_parameters()))
    params = {name.removeprefix("base_model.model."): p for name, p in named.items() if ".lora_" in name}
    assert params.keys() == adapters.keys()
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(adapters[name])


def peft_reference(base, seed=1, target_modules=None):
    """transformers + PEFT: LORA on a copy of base with seeded adapters; returns (model, its initial adapters).
    Input embeddings require grad, as PEFT users set for gradient checkpointing (Trainer before transformers 5.0
    does not, and reentrant checkpointing then reaches no adapter); it changes no number."""
    model = peft.get_peft_model(copy.deepcopy(base), peft_lora_config(target_modules))
    model.enable_input_require_grads()
    return model, seed_adapters(model, seed)


def token_rows(rows=16, seq=16, seed=1) -> list[list[int]]:
    """A repeated random phrase with 20% noise tokens: something to learn in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, VOCAB, (8,), generator=generator)
    ids = phrase.repeat(rows, seq // 8)
    noise = torch.rand(ids.shape, generator=generator) < 0.2
    return torch.where(noise, torch.randint(3, VOCAB, ids.shape, generator=generator), ids).tolist()


def lm_dataset(rows=16, seq=16, seed=1):
    """A tokenized causal-LM dataset (labels = input_ids), as Trainer takes it."""
    import datasets

    ids = token_rows(rows, seq, seed)
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def text_dataset(rows=16, seed=1):
    """A plain-text dataset (TRL's default "text" field) of 8 to 19 words each."""
    import datasets

    generator = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(rows):
        length = int(torch.randint(8, 20, (), generator=generator))
        texts.append(" ".join(f"w{int(t)}" for t in torch.randint(3, VOCAB, (length,), generator=generator)))
    return datasets.Dataset.from_dict({"text": texts})


def word_tokenizer():
    """A word-level fast tokenizer over the model's vocabulary: <pad> <s> </s>, then w3 ... w127."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def step_logs(trainer, key="loss") -> dict[int, float]:
    """{step: value} of what the trainer logged each step (its log_history, a resumed run's included)."""
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry and "step" in entry}
