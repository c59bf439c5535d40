"""Prompt tuning and prefix tuning (pyfastpeft.add_prompt_tuning / add_prefix_tuning) against PEFT's
PROMPT_TUNING / PREFIX_TUNING: outputs, loss and gradients equal to PeftModel's forward on tiny Llama and Gemma 3
models (padded batches too), generate equal to greedy decoding by PEFT's forward without a cache, checkpoints both
ways, from_peft, training (plain loop, Trainer, SFTTrainer), prepare_model, and bad input refused before the model
changes."""

import copy
import json
import os

import pytest
import torch
from helpers import TINY_DECODER, tiny_llama, train_steps

import pyfastpeft
from pyfastpeft.nn import PrefixTuning, PromptTuning

peft = pytest.importorskip("peft")

N = 5  # virtual tokens

METHODS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "prefix_projection": lambda: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=24
    ),
}


def add(method, model, **kwargs):
    if method == "prompt":
        return pyfastpeft.add_prompt_tuning(model, N, **kwargs)
    return pyfastpeft.add_prefix_tuning(
        model, N, prefix_projection=method == "prefix_projection", encoder_hidden_size=24, **kwargs
    )


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    layers = ["sliding_attention", "full_attention"]  # a window shorter than the prefix, and a global layer
    config = Gemma3TextConfig(**TINY_DECODER, head_dim=16, sliding_window=4, layer_types=layers)
    return Gemma3ForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


def batch(seed=1, rows=2, tokens=9, left_pad=0):
    ids = torch.randint(3, 128, (rows, tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :left_pad] = 0
    return ids, mask


def peft_twin(method, build, seed=2):
    """A PeftModel of the method over build() with its encoder's parameters drawn at random (PEFT's zero or default
    starts would hide layout errors), and our model over another build() with the same parameters."""
    theirs = peft.get_peft_model(build(), METHODS[method]())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in theirs.prompt_encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    ours = build()
    add(method, ours)
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    return ours, theirs


def forward(model, ids, mask, labels=True):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids if labels else None)
    if labels:
        out.loss.backward()
    return out


def prompt_grads(model):
    encoder = model.prompt_encoder
    encoder = encoder["default"] if isinstance(encoder, torch.nn.ModuleDict) else encoder
    return {name: p.grad.clone() for name, p in encoder.named_parameters()}


def skip_old_peft_gemma_prefix(method, name):
    """PEFT before its transformers 4.56 support put Gemma 3's prefix in a HybridCache, and its outputs differ from
    those of the DynamicCache that PEFT uses since (ours equal the latter, on transformers 4.56 and 5.x alike)."""
    import inspect

    from peft.peft_model import PeftModel

    if (
        name == "gemma3"
        and method != "prompt"
        and "DynamicCache(config=" not in inspect.getsource(PeftModel.get_prompt)
    ):
        pytest.skip("this PEFT builds Gemma 3 prefixes in a HybridCache")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_outputs_loss_and_gradients_equal_peft(method, name):
    skip_old_peft_gemma_prefix(method, name)
    ours, theirs = peft_twin(method, MODELS[name])
    ids, mask = batch(left_pad=3)
    got, want = forward(ours, ids, mask), forward(theirs, ids, mask)
    # our logits keep one row per real token; PEFT's prompt tuning returns the virtual tokens' rows first
    torch.testing.assert_close(got.logits, want.logits[:, -ids.shape[1] :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    got_grads, want_grads = prompt_grads(ours), prompt_grads(theirs)
    assert sorted(got_grads) == sorted(want_grads)
    for key, grad in want_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(got_grads[key], grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        base = MODELS[name]()(input_ids=ids, attention_mask=mask).logits
    assert (got.logits - base).abs().max() > 1e-3  # the method changes the output


def greedy_without_cache(model, ids, steps):
    """Greedy decoding by re-running the whole sequence each step: what generate with a KV cache must equal."""
    sequence = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False).logits
            sequence = torch.cat((sequence, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return sequence


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_generate_with_the_kv_cache_equals_greedy_decoding_by_peft_without_one(method, name):
    skip_old_peft_gemma_prefix(method, name)
    ours, theirs = peft_twin(method, MODELS[name])
    ids, mask = batch(tokens=6)
    ours.generation_config.eos_token_id = None  # seven tokens on every row, an end-of-sequence one included
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got, greedy_without_cache(theirs, ids, 7), rtol=0, atol=0)
    assert ours.prompt_encoder._real_tokens is None


@pytest.mark.parametrize("method", METHODS)
def test_peft_checkpoints_load_and_ours_load_in_peft(method, tmp_path):
    ours, theirs = peft_twin(method, tiny_llama)
    ids, mask = batch()
    theirs.eval()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :]
    theirs.save_pretrained(tmp_path / "peft")
    loaded = tiny_llama()
    assert pyfastpeft.load_adapter(loaded, tmp_path / "peft") == ["prompt_encoder"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)
    if method == "prefix_projection":  # PEFT saves the MLP's output: it loads as the prefix itself
        assert not loaded.prompt_encoder.prefix_projection
    pyfastpeft.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if method == "prompt" else "PREFIX_TUNING")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        got = back(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_from_peft_converts_over_the_same_parameters(method, tmp_path):
    ours, theirs = peft_twin(method, tiny_llama)
    ids, mask = batch()
    want = forward(theirs, ids, mask)
    want_grads = prompt_grads(theirs)
    model = pyfastpeft.from_peft(theirs)
    assert model is theirs.base_model and pyfastpeft.from_peft(theirs) is model
    assert isinstance(model.prompt_encoder, PromptTuning if method == "prompt" else PrefixTuning)
    for via in (model, theirs):  # the PeftModel's forward goes through the converted model now
        got = forward(via, ids, mask)
        torch.testing.assert_close(got.logits, want.logits[:, -ids.shape[1] :], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.loss, want.loss)
    for key, grad in prompt_grads(theirs).items():  # PEFT's own parameters got the gradients
        torch.testing.assert_close(grad, want_grads[key], rtol=1e-4, atol=1e-6)
    theirs.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=ids).logits[:, -ids.shape[1] :], model(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("method", METHODS)
def test_the_loss_falls_and_only_the_method_trains(method):
    model = tiny_llama()
    report = add(method, model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("prompt_encoder.") for name in trainable)
    assert report.method_params == report.trainable_params == sum(p.numel() for p in model.prompt_encoder.parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids, _ = batch(rows=4, tokens=12)
    losses = train_steps(model, ids, 10, lr=0.3)
    assert losses[-1] < losses[0] - 0.1, losses
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]) != (name in trainable), name


def test_prompt_tuning_init_from_token_ids_and_vocabulary():
    model = tiny_llama()
    pyfastpeft.add_prompt_tuning(model, 5, init=[7, 8])  # PEFT's TEXT: repeated to 5 tokens
    rows = model.get_input_embeddings().weight[[7, 8, 7, 8, 7]]
    torch.testing.assert_close(model.prompt_encoder.embedding.weight, rows)
    sampled = tiny_llama()
    pyfastpeft.add_prompt_tuning(sampled, 4, init="sample_vocab")
    table = sampled.get_input_embeddings().weight
    for row in sampled.prompt_encoder.embedding.weight:
        assert (table == row).all(dim=1).any()


def test_a_trainer_and_sft_trainer_train_prompt_tuning_as_on_peft(tmp_path):
    from real_stack_helpers import lm_dataset, step_logs, text_dataset, word_tokenizer
    from transformers import Trainer, TrainingArguments

    def args(name, **extra):
        return dict(
            output_dir=str(tmp_path / name),
            max_steps=4,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=0,
            **extra,
        )

    def peft_and_ours():
        theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
        ours = tiny_llama()
        pyfastpeft.add_prompt_tuning(ours, N)
        ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
        return ours, theirs

    ours, theirs = peft_and_ours()
    runs = [
        Trainer(model=m, args=TrainingArguments(**args(k)), train_dataset=lm_dataset())
        for k, m in (("a", ours), ("b", theirs))
    ]
    for run in runs:
        run.train()
    got, want = step_logs(runs[0]), step_logs(runs[1])
    assert got.keys() == want.keys() == {1, 2, 3, 4}
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]) + 1e-4, (step, got, want)
    assert got[4] < got[1]
    runs[0].save_model(str(tmp_path / "saved"))  # a plain transformers model: its whole state
    trl = pytest.importorskip("trl")
    ours, theirs = peft_and_ours()
    sft = []
    for name, model in (("c", ours), ("d", theirs)):
        config = trl.SFTConfig(**args(name), bf16=True)  # SFTTrainer's default autocast
        sft.append(
            trl.SFTTrainer(model=model, args=config, train_dataset=text_dataset(), processing_class=word_tokenizer())
        )
        sft[-1].train()
    for key, rtol in (("loss", 5e-3), ("mean_token_accuracy", 0.0)):
        got, want = step_logs(sft[0], key), step_logs(sft[1], key)
        assert got.keys() == want.keys() == {1, 2, 3, 4}, key
        for step in want:
            assert abs(got[step] - want[step]) <= rtol * abs(want[step]) + 1e-4, (key, step, got, want)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prepare_model_adds_it_over_an_nf4_base_and_saves_a_peft_directory(method, tmp_path):
    model = tiny_llama()
    settings = pyfastpeft.PromptSettings(method=method, num_virtual_tokens=N)
    report = pyfastpeft.prepare_model(model, quant="nf4", lora=False, prompt=settings)
    assert report.replaced[method] == 1
    assert set(report.trainable_by_method) == {"prompt"}
    assert report.trainable_by_method["prompt"] == sum(p.numel() for p in model.prompt_encoder.parameters())
    ids, _ = batch(rows=4, tokens=12)
    losses = train_steps(model, ids, 8, lr=0.3)
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    loaded = tiny_llama()
    pyfastpeft.load_adapter(loaded, tmp_path)
    pyfastpeft.quantize_model(loaded, "nf4", skip=("lm_head",))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="lora=False"):
        pyfastpeft.prepare_model(tiny_llama(), quant=None, prompt=True)


def write(directory, config, tensor):
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensor, str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c, t: c.update(num_virtual_tokens="5"), "num_virtual_tokens"),
        (lambda c, t: c.update(num_virtual_tokens=0), "num_virtual_tokens"),
        (lambda c, t: c.update(num_layers=3), "num_layers=3"),
        (lambda c, t: c.update(token_dim=64), "token_dim=64"),
        (lambda c, t: c.update(num_transformer_submodules=2), "num_transformer_submodules"),
        (lambda c, t: c.update(task_type="SEQ_2_SEQ_LM"), "task_type"),
        (lambda c, t: c.update(prefix_projection="yes"), "prefix_projection"),
        (lambda c, t: t.update(prompt_embeddings=t["prompt_embeddings"][:, :-1].contiguous()), "shape"),
        (lambda c, t: t["prompt_embeddings"].__setitem__((0, 0), float("nan")), "non-finite"),
        (lambda c, t: t.update(extra=torch.zeros(2)), "holds"),
        (lambda c, t: t.update(prompt_embeddings=t["prompt_embeddings"].to(torch.int32)), "dtype|floating"),
    ],
)
def test_bad_prefix_checkpoints_are_refused_before_the_model_changes(change, match, tmp_path):
    _, theirs = peft_twin("prefix", tiny_llama)
    theirs.save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    change(config, tensors)
    write(tmp_path / "bad", config, tensors)
    model = tiny_llama()
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    with pytest.raises((ValueError, TypeError), match=match):
        pyfastpeft.load_adapter(model, tmp_path / "bad")
    assert "prompt_encoder" not in model._modules
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks


def test_a_prompt_for_another_embedding_size_is_refused(tmp_path):
    _, theirs = peft_twin("prompt", tiny_llama)
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="token_dim 64 is not the model's embedding size 96"):
        pyfastpeft.load_adapter(tiny_llama(hidden_size=96), tmp_path)


def test_bad_arguments_and_calls_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        pyfastpeft.add_prompt_tuning(model, 0)
    with pytest.raises(ValueError, match="init"):
        pyfastpeft.add_prompt_tuning(model, 4, init="text")
    with pytest.raises(ValueError, match="token ids outside"):
        pyfastpeft.add_prompt_tuning(model, 4, init=[1, 500])
    with pytest.raises(ValueError, match="init"):
        pyfastpeft.add_prefix_tuning(model, 4, init="normal")
    with pytest.raises(TypeError, match="prefix_projection"):
        pyfastpeft.add_prefix_tuning(model, 4, prefix_projection=1)
    assert "prompt_encoder" not in model._modules and all(p.requires_grad for p in model.parameters())
    pyfastpeft.add_prompt_tuning(model, 4)
    with pytest.raises(ValueError, match="already holds"):
        pyfastpeft.add_prefix_tuning(model, 4)
    ids, mask = batch()
    with pytest.raises(ValueError, match="attention_mask must be a 2-D"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :])
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(attention_mask=mask)
    from transformers import StaticCache

    with pytest.raises(ValueError, match="static cache"):
        model(input_ids=ids, past_key_values=StaticCache(config=model.config, max_cache_len=32))
    assert model(ids).logits.shape == (2, 9, 128)  # input_ids by position still works
    with pytest.raises(TypeError, match="a PeftModel"):
        pyfastpeft.add_prompt_tuning(peft.get_peft_model(tiny_llama(), METHODS["prompt"]()), 4)


def test_uninstall_and_copies():
    model = tiny_llama()
    ids, _ = batch()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    pyfastpeft.add_prefix_tuning(model, 4)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(copied(input_ids=ids).logits, model(input_ids=ids).logits)
    model.prompt_encoder.uninstall(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base)


def test_prefix_tuning_refuses_gradient_checkpointing_which_would_drop_the_prefix():
    """transformers' checkpointed layers set the cache to None in training: the prefix would silently do nothing."""
    model = tiny_llama()
    pyfastpeft.add_prefix_tuning(model, 4)
    model.gradient_checkpointing_enable()
    model.train()
    ids, _ = batch()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():  # no backward to replay: generation and evaluation keep the cache
        model(input_ids=ids)
    model.gradient_checkpointing_disable()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.prompt_encoder.embedding.weight.grad.abs().sum() > 0
    prompt = tiny_llama()
    pyfastpeft.add_prompt_tuning(prompt, 4)
    prompt.gradient_checkpointing_enable()
    prompt.train()
    prompt(input_ids=ids, labels=ids).loss.backward()
    assert prompt.prompt_encoder.embedding.weight.grad.abs().sum() > 0
