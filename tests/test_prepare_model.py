"""prepare_model end to end: a tiny Llama trained with and without it (PEFT's LoRA as the unfused baseline),
per-step losses compared; NF4 and int8 bases; generation, checkpointing, compile, pickling, evaluation through
transformers' Trainer, the default adapter, second calls and PeftModels refused without a change, reports and
bad input."""

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

import pyfastpeft
from pyfastpeft import LoraSettings
from pyfastpeft.nn import Linear4bit, Linear8bitLt, LoRALinear

peft = pytest.importorskip("peft")

STEPS = 30
_PREPARED = []


def prepare_model(model, *args, **kwargs):
    """pyfastpeft.prepare_model, remembered so the test's teardown can unpatch the module-level RoPE again."""
    report = pyfastpeft.prepare_model(model, *args, **kwargs)
    if kwargs.get("patch", True):
        _PREPARED.append(model)
    return report


@pytest.fixture(autouse=True)
def _unpatch_prepared_models():
    yield
    while _PREPARED:
        pyfastpeft.unpatch_model(_PREPARED.pop())


LORA = LoraSettings(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")


def tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype)


def token_stream(seed=1, batch=4, seq=32, vocab=128):
    """A fixed stream with structure to learn: a repeated random phrase with noise tokens."""
    generator = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, vocab, (8,), generator=generator)
    ids = phrase.repeat(batch, seq // 8)
    noise = torch.rand(ids.shape, generator=generator) < 0.1
    return torch.where(noise, torch.randint(0, vocab, ids.shape, generator=generator), ids)


def peft_twin(model_before, ours):
    """PEFT's LoRA on a copy of the unprepared model, with our adapters' initial values (same keys)."""
    config = peft.LoraConfig(
        r=LORA.r, lora_alpha=LORA.lora_alpha, lora_dropout=LORA.lora_dropout, target_modules="all-linear"
    )
    twin = peft.get_peft_model(copy.deepcopy(model_before), config)
    ours_state = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    twin_state = {k.removeprefix("base_model.model."): v for k, v in twin.state_dict().items() if ".lora_" in k}
    assert set(ours_state) == set(twin_state)
    with torch.no_grad():
        for key, value in twin_state.items():
            value.copy_(ours_state[key])
    return twin


def train(model, ids, steps=STEPS, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_losses_match_peft_step_by_step(dtype, tolerance):
    """fp32: per-step losses within 2e-4 relative of transformers + PEFT; bf16 (every op rounds to bf16 in a
    different order, and Adam amplifies it): within 3e-2."""
    base = tiny_llama(dtype)
    ours = copy.deepcopy(base)
    report = prepare_model(ours, quant=None, lora=LORA)
    assert report.replaced["lora"] == 2 * 7 and report.replaced["fused loss"] == 1
    twin = peft_twin(base, ours)
    ids = token_stream()
    our_losses, peft_losses = train(ours, ids), train(twin, ids)
    assert our_losses[-1] < 0.8 * our_losses[0]  # it learns
    for step, (a, b) in enumerate(zip(our_losses, peft_losses)):
        assert abs(a - b) <= tolerance * abs(b), (step, a, b)


@pytest.mark.parametrize("quant, band", [("nf4", 0.15), ("int8", 0.05)])
def test_quantized_base_still_learns_within_a_band_of_the_dense_run(quant, band):
    """A 4-bit (8-bit) frozen base: the loss falls and every step stays within 15% (5%) of the dense run."""
    base = tiny_llama()
    dense, quantized = copy.deepcopy(base), copy.deepcopy(base)
    prepare_model(dense, quant=None, lora=LORA)
    report = prepare_model(quantized, quant=quant, lora=LORA)
    kind = Linear4bit if quant == "nf4" else Linear8bitLt
    assert report.replaced[quant] == 2 * 7 and isinstance(quantized.model.layers[0].mlp.up_proj.base_layer, kind)
    assert report.bytes_after < report.bytes_before
    ids = token_stream()
    dense_losses, quantized_losses = train(dense, ids), train(quantized, ids)
    assert quantized_losses[-1] < 0.8 * quantized_losses[0]
    for step, (a, b) in enumerate(zip(quantized_losses, dense_losses)):
        assert abs(a - b) <= band * b, (step, a, b)
    perplexity = math.exp(quantized_losses[-1])
    assert 1.0 < perplexity < math.exp(quantized_losses[0])


def test_fused_loss_equals_transformers_loss_and_gradients():
    model = tiny_llama()
    ids = token_stream(batch=2, seq=16)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that does not count
    reference = copy.deepcopy(model)
    prepare_model(model, quant=None, lora=False, patch=False)
    out = model(input_ids=ids, labels=labels)
    expected = reference(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for p in model.parameters():
        p.requires_grad_(True)
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(20))
    out.loss.backward()
    expected = reference(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(20))
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lm_head.weight.grad, reference.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        model.model.embed_tokens.weight.grad, reference.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6
    )


def test_generate_and_logits_without_labels_are_unchanged():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    prepare_model(model, quant=None, lora=LORA)
    ids = token_stream(batch=1, seq=8)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        ours = model.generate(ids, max_new_tokens=6, do_sample=False)
        theirs = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


def _checkpoint(model, use_reentrant: bool, route: str) -> None:
    """Turn on gradient checkpointing: through transformers' public call (from 5.0 it also makes the embeddings'
    output require grad itself), or by the layers' flags alone (what it did before 5.0, where only our hook makes
    reentrant checkpointing reach the adapters)."""
    import functools

    from torch.utils.checkpoint import checkpoint

    if route == "api":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=functools.partial(checkpoint, use_reentrant=use_reentrant)
        )


@pytest.mark.parametrize("route", ["api", "flags"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(use_reentrant, route):
    model = tiny_llama()
    prepare_model(model, quant="nf4", lora=LoraSettings(r=4, lora_dropout=0.1))
    ids = token_stream(batch=2, seq=16)

    def adapter_grads():
        torch.manual_seed(3)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return grads

    plain = adapter_grads()
    _checkpoint(model, use_reentrant, route)
    checkpointed = adapter_grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 2 * 7
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_the_first_layer_input_requires_grad_only_while_checkpointing():
    """Without checkpointing nothing trains on the first layer's input, so its gradient (the first layer's q, k and v
    dX products) is not computed; with reentrant checkpointing turned on by the flags alone, the input requires grad,
    and the hook still lets the model pickle."""
    model = tiny_llama()
    prepare_model(model, quant="nf4", lora=LoraSettings(r=4, lora_dropout=0.1))
    ids = token_stream(batch=2, seq=16)
    seen = []

    def first_layer_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.requires_grad)

    handle = model.model.layers[0].register_forward_pre_hook(first_layer_input, with_kwargs=True)
    model.train()
    phases = []
    for checkpointing in (False, True, False):
        if checkpointing:
            _checkpoint(model, True, "flags")
        else:
            model.gradient_checkpointing_disable()
        seen.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        phases.append(set(seen))
    assert phases == [{False}, {True}, {False}]
    handle.remove()
    pickle.loads(pickle.dumps(model))


def test_compiled_training_step_matches_eager():
    model = tiny_llama()
    prepare_model(model, quant=None, lora=LORA)
    eager = copy.deepcopy(model)
    ids = token_stream(batch=2, seq=16)
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(input_ids=ids, labels=ids).loss
    expected = eager(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_gemma_gets_its_norm_offset_and_report_lists_what_was_patched():
    torch.manual_seed(0)
    config = GemmaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=128,
    )
    model = GemmaForCausalLM(config)
    reference = copy.deepcopy(model)
    report = prepare_model(model, quant=None, lora=LORA)
    # Gemma's norms take 1 + w; its MLP's activation is GELU (tanh), which is not SwiGLU and stays as it is
    assert report.replaced["rmsnorm"] >= 3 and report.replaced["swiglu"] == 0
    assert any("not SiLU" in reason for reason in report.not_patched)
    ids = token_stream(batch=1, seq=8)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss, rtol=1e-4, atol=1e-5
        )
    assert "replaced" in str(report) and "trainable params" in str(report)


def test_unsupported_model_gets_a_report_not_an_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(UserWarning):
        report = prepare_model(model, quant="int8", lora=LoraSettings(r=2))
    assert report.replaced["int8"] == 2 and report.replaced["lora"] == 2
    assert any("fused loss" in reason for reason in report.not_patched)
    assert isinstance(model[0], LoRALinear) and report.trainable_params == (2 * 8 + 8 * 2) + (2 * 8 + 4 * 2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: prepare_model(m, quant="int4"), ValueError, "quant must be one of"),
        (lambda m: prepare_model(m, lora={"r": 8}), TypeError, "lora must be a pyfastpeft.LoraSettings"),
        (lambda m: prepare_model(m, lora=None), TypeError, "lora must be a pyfastpeft.LoraSettings"),
        (lambda m: prepare_model(m, patch="yes"), TypeError, "patch must be a bool"),
        (lambda m: LoraSettings(r=0), ValueError, "r must be >= 1"),
        (lambda m: LoraSettings(lora_dropout=1.0), ValueError, "lora_dropout must be in"),
        (lambda m: LoraSettings(target_modules=[]), TypeError, "target_modules must be"),
        (lambda m: prepare_model("model"), TypeError, "model must be a torch.nn.Module"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(tiny_llama())


def test_adapter_round_trips_through_peft_after_training(tmp_path):
    model = tiny_llama()
    base = copy.deepcopy(model)
    prepare_model(model, quant=None, lora=LORA)
    train(model, token_stream(), steps=3)
    pyfastpeft.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    ids = token_stream(batch=1, seq=8)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def snapshot(model):
    """Everything a failed prepare_model must leave as it was: the module tree, the state dict, trainability and
    the forward."""
    return (
        [(name, type(module)) for name, module in model.named_modules()],
        {key: value.clone() for key, value in model.state_dict().items()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        dict(model.__dict__).get("forward"),
    )


def assert_unchanged(model, before):
    modules, state, trainable, forward = snapshot(model)
    assert modules == before[0] and trainable == before[2] and forward is before[3]
    assert state.keys() == before[1].keys()
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key


def test_default_adds_peft_default_adapters_and_false_adds_none():
    model = tiny_llama()
    report = prepare_model(model, quant=None)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and report.replaced["lora"] == 2 * 7
    assert layer.r["default"] == 8 and layer.lora_alpha["default"] == 8 and layer.lora_dropout["default"] == 0.0
    assert report.trainable_params == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) > 0
    bare = tiny_llama()
    report = prepare_model(bare, quant=None, lora=False)
    assert "lora" not in report.replaced and report.trainable_params == 0
    assert not any(isinstance(m, LoRALinear) for m in bare.modules())


@pytest.mark.parametrize("second", [dict(), dict(quant=None, lora=False)], ids=["same", "nothing-new"])
def test_second_call_raises_and_changes_nothing(second):
    model = tiny_llama()
    prepare_model(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_model(model, **second)
    assert_unchanged(model, before)


def test_peft_model_is_refused_unchanged_and_converts_through_from_peft():
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = snapshot(peft_model)
    with pytest.raises(ValueError, match="from_peft"):
        prepare_model(peft_model)
    assert_unchanged(peft_model, before)
    with pytest.raises(ValueError, match="from_peft"):
        prepare_model(peft_model.base_model.model)
    assert_unchanged(peft_model, before)
    model = pyfastpeft.from_peft(peft_model)
    with pytest.raises(ValueError, match="lora=False"):
        prepare_model(model)
    report = prepare_model(model, quant="nf4", lora=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Linear4bit) and type(layer.lora_A["default"]) is nn.Linear
    assert report.trainable_params == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) > 0


def test_unmatched_target_modules_raise_before_anything_is_quantized():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no linear layer matches lora.target_modules"):
        prepare_model(model, quant="nf4", lora=LoraSettings(target_modules=["qkv"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("save", ["pickle", "torch.save"])
def test_prepared_model_pickles_whole_and_gives_the_same_loss(save):
    model = tiny_llama()
    prepare_model(model)  # NF4 base, adapters, patched modules, fused loss
    train(model, token_stream(), steps=2)
    if save == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    _PREPARED.append(loaded)
    ids = token_stream(batch=2, seq=16)
    expected, got = model(input_ids=ids, labels=ids), loaded(input_ids=ids, labels=ids)
    assert got.logits is None  # the loaded model still computes the fused loss
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    got.loss.backward()
    assert all(p.grad is not None for n, p in loaded.named_parameters() if ".lora_" in n)


def test_eval_mode_returns_logits_and_the_models_own_loss():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    prepare_model(model, quant=None, lora=False, patch=False)
    ids = token_stream(batch=2, seq=16)
    assert model(input_ids=ids, labels=ids).logits is None  # training: the memory win
    model.eval()
    out, expected = model(input_ids=ids, labels=ids), reference.eval()(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)


def test_trainer_evaluate_hands_logits_to_compute_metrics(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    reference = copy.deepcopy(model).eval()
    prepare_model(model, quant=None)
    ids = token_stream(batch=4, seq=16)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"accuracy": float((prediction.predictions[:, :-1].argmax(-1) == prediction.label_ids[:, 1:]).mean())}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    metrics = Trainer(model=model, args=args, eval_dataset=dataset, compute_metrics=compute_metrics).evaluate()
    assert seen["shape"] == (4, 16, 128) and 0.0 <= metrics["eval_accuracy"] <= 1.0
    with torch.no_grad():
        expected = reference(input_ids=ids, labels=ids).loss.item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-4)


def trainer_for(model, output_dir, **overrides):
    from transformers import Trainer, TrainingArguments

    rows = token_stream(batch=8, seq=16)
    dataset = [{"input_ids": row, "labels": row} for row in rows]
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=dataset)


def adapter_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}


def test_trainer_checkpoints_are_peft_adapters_that_load_and_resume(tmp_path):
    import os

    base = tiny_llama()
    model = copy.deepcopy(base)
    prepare_model(model, quant=None, lora=LORA)
    trainer_for(model, tmp_path / "run").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= files
    assert "config.json" not in files  # not a whole model
    trained = adapter_state(model)

    final = tmp_path / "final"
    trainer_for(model, tmp_path / "run").save_model(str(final))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), final).eval()
    ids = token_stream(batch=1, seq=8)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )

    resumed = copy.deepcopy(base)
    torch.manual_seed(123)  # other initial adapters: the checkpoint must overwrite them
    prepare_model(resumed, quant=None, lora=LORA)
    trainer_for(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    for name, value in adapter_state(resumed).items():
        torch.testing.assert_close(value, trained[name], rtol=1e-5, atol=1e-6, msg=name)
