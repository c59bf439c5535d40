"""The PEFT options users combine with LoRA, against PEFT itself: lora_bias (a trained bias on B), modules_to_save
(modules trained whole, e.g. a classification head) and LoRA on input embeddings: outputs, gradients, merging,
checkpoints both ways (PEFT's save_pretrained -> load_adapter, save_adapter -> PeftModel.from_pretrained), on tiny
Llama and Gemma models, and bad checkpoints refused before the model changes."""

import copy
import json

import pytest
import torch
from helpers import tiny_llama, train_steps
from torch import nn

import pyfastpeft
from pyfastpeft.nn import LoRALinear

peft = pytest.importorskip("peft")


def input_ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize(model, seed=1):
    """Every adapter tensor of a PEFT model away from its start (B and its bias are zero there)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def logits_and_grads(model):
    model.train()
    model.zero_grad()
    out = model(input_ids=input_ids(), labels=input_ids())
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training(ours, theirs):
    (got, got_grads), (want, want_grads) = logits_and_grads(ours), logits_and_grads(theirs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(got_grads) == sorted(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6)


# ---- lora_bias ---------------------------------------------------------------------------------------------------


def lora_bias_model():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_bias=True)
    model = peft.get_peft_model(tiny_llama(attention_bias=True), config)
    randomize(model)
    return model


def test_lora_bias_converts_with_the_same_outputs_and_gradients():
    theirs = lora_bias_model()
    ours = copy.deepcopy(theirs)
    pyfastpeft.from_peft(ours)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.lora_bias["default"]
    assert_same_training(ours, theirs)


def test_lora_bias_adapters_round_trip_and_merge(tmp_path):
    theirs = lora_bias_model().eval()
    with torch.no_grad():
        want = theirs(input_ids=input_ids()).logits
    theirs.save_pretrained(tmp_path / "peft")
    model = tiny_llama(attention_bias=True)
    pyfastpeft.load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids()).logits, want, rtol=1e-5, atol=1e-5)
    pyfastpeft.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["lora_bias"] is True
    back = peft.PeftModel.from_pretrained(tiny_llama(attention_bias=True), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=input_ids()).logits, want, rtol=1e-5, atol=1e-5)
    layer = model.model.layers[1].self_attn.v_proj
    bias = layer.base_layer.bias.detach().clone()
    layer.merge()
    expected_bias = bias + layer.scaling["default"] * layer.lora_B["default"].bias.detach()
    torch.testing.assert_close(layer.base_layer.bias.detach(), expected_bias)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids()).logits, want, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.bias.detach(), bias, rtol=1e-6, atol=1e-7)


def test_lora_bias_without_a_base_bias_trains_and_refuses_to_merge():
    layer = LoRALinear(nn.Linear(8, 6, bias=False), r=2, lora_bias=True)
    assert layer.lora_B["default"].bias.requires_grad
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.lora_B["default"].bias.grad, torch.full((6,), 3.0 * layer.scaling["default"]))
    with pytest.raises(ValueError, match="has no bias to merge it into"):
        layer.merge()
    with pytest.raises(ValueError, match="not supported with use_dora"):
        LoRALinear(nn.Linear(8, 6), use_dora=True, lora_bias=True)


# ---- modules_to_save ---------------------------------------------------------------------------------------------


def sequence_classifier(seed=0):
    from helpers import TINY_DECODER
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_DECODER, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def classifier_peft_model():
    """PEFT's SEQ_CLS task adds the classification head ("score") to modules_to_save by itself."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    model = peft.get_peft_model(sequence_classifier(), config)
    randomize(model)
    assert "score" in model.peft_config["default"].modules_to_save
    return model


def classifier_outputs(model):
    labels = torch.tensor([0, 2])
    model.train()
    model.zero_grad()
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_classifier_with_modules_to_save_converts_with_the_same_outputs_and_gradients():
    from pyfastpeft.nn import ModulesToSave

    theirs = classifier_peft_model()
    ours = copy.deepcopy(theirs)
    pyfastpeft.from_peft(ours)
    assert isinstance(ours.base_model.model.score, ModulesToSave)
    (got, got_grads), (want, want_grads) = classifier_outputs(ours), classifier_outputs(theirs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(got_grads) == sorted(want_grads)
    assert any("modules_to_save.default" in name for name in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6)
    ours.disable_adapter_layers()
    theirs.disable_adapter_layers()
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_modules_to_save_round_trip_between_peft_and_pyfastpeft(tmp_path):
    theirs = classifier_peft_model().eval()
    with torch.no_grad():
        theirs.base_model.model.score.modules_to_save["default"].weight.mul_(3.0)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    theirs.save_pretrained(tmp_path / "peft")
    model = sequence_classifier()
    loaded = pyfastpeft.load_adapter(model, tmp_path / "peft")
    assert "score" in loaded
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert model.score.weight.requires_grad and not model.score.original_module.weight.requires_grad
    pyfastpeft.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"]
    back = peft.PeftModel.from_pretrained(sequence_classifier(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_bf16_trained_lm_head_matches_peft_through_the_fused_loss():
    """A bf16 model in training whose lm_head is unfrozen: the fused loss trains it (on the CPU dW is one bf16 GEMM
    over every token's dz). The loss and the lm_head's gradient match PEFT's eager step to bf16 rounding."""
    from real_stack_helpers import adapter_state, load_adapters

    model = tiny_llama().to(torch.bfloat16).train()
    reference = copy.deepcopy(model)
    settings = pyfastpeft.LoraSettings(r=4, lora_dropout=0.0)
    pyfastpeft.prepare_model(model, quant=None, lora=settings)
    config = peft.LoraConfig(r=4, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    reference = peft.get_peft_model(reference, config)
    # the adapters as initialized (B = 0): both sides' hidden states are then the same, and dW is the lm_head's alone
    load_adapters(reference, adapter_state(model))
    head, reference_head = model.lm_head.weight, reference.base_model.model.lm_head.weight
    head.requires_grad_(True)
    reference_head.requires_grad_(True)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    outputs = model(input_ids=ids, labels=ids)
    assert outputs.logits is None  # the fused loss ran
    outputs.loss.backward()
    expected = reference(input_ids=ids, labels=ids).loss
    expected.backward()
    torch.testing.assert_close(outputs.loss, expected, rtol=1e-4, atol=0)
    # bf16 keeps 8 bits: each side rounds dz and dW once, so the two differ by about 2^-8 of the largest entry
    scale = reference_head.grad.float().abs().max().item()
    torch.testing.assert_close(head.grad.float(), reference_head.grad.float(), rtol=0, atol=2**-7 * scale)
    pyfastpeft.unpatch_model(model)


def test_prepare_model_trains_modules_to_save_dense_beside_qlora():
    from pyfastpeft.nn import Linear4bit, ModulesToSave

    model = tiny_llama()
    settings = pyfastpeft.LoraSettings(r=4, modules_to_save=["lm_head", "model.norm"])
    report = pyfastpeft.prepare_model(model, quant="nf4", lora=settings)
    assert isinstance(model.lm_head, ModulesToSave) and isinstance(model.model.norm, ModulesToSave)
    assert not isinstance(model.lm_head.original_module, Linear4bit)
    assert model.get_output_embeddings().weight.requires_grad  # the fused loss trains the copy
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert (
        "lm_head.modules_to_save.default.weight" in trainable
        and "model.norm.modules_to_save.default.weight" in trainable
    )
    assert "lm_head.original_module.weight" not in trainable
    before = model.lm_head.original_module.weight.detach().clone()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = train_steps(model, ids, 8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1, (losses, report)
    torch.testing.assert_close(model.lm_head.original_module.weight, before)
    assert not torch.equal(model.lm_head.modules_to_save["default"].weight, before)
    pyfastpeft.unpatch_model(model)


def test_bad_modules_to_save_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no module of the model matches modules_to_save"):
        pyfastpeft.add_lora(tiny_llama(), modules_to_save=["missing_head"])
    with pytest.raises(TypeError, match="modules_to_save must be a list"):
        pyfastpeft.LoraSettings(modules_to_save="lm_head")
    theirs = classifier_peft_model()
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    state["base_model.model.score.weight"] = torch.ones(3, 32)
    save_file(state, weights)
    model = sequence_classifier()
    with pytest.raises(ValueError, match=r"score\.weight' is \(3, 32\), score\.weight is \(3, 64\)"):
        pyfastpeft.load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    del state["base_model.model.score.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match="names score in modules_to_save, and .* is missing"):
        pyfastpeft.load_adapter(model, tmp_path)


# ---- LoRA on input embeddings ------------------------------------------------------------------------------------


def gemma_tiny(seed=0):
    from helpers import TINY_DECODER
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    return GemmaForCausalLM(GemmaConfig(**TINY_DECODER, head_dim=16)).eval()


MODELS = {"llama": tiny_llama, "gemma": gemma_tiny}


def embedding_peft_model(name, use_dora=False):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=use_dora)
    model = peft.get_peft_model(MODELS[name](), config)
    randomize(model)
    if use_dora:  # magnitudes near the weight norms they start at, each its own
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_magnitude_vector" in key:
                    parameter.copy_(1.0 + torch.rand(parameter.shape, generator=torch.Generator().manual_seed(3)))
    return model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_lora_on_embeddings_converts_with_the_same_outputs_and_gradients(name, use_dora):
    from pyfastpeft.nn.lora_embedding import LoRAEmbedding

    theirs = embedding_peft_model(name, use_dora)
    ours = copy.deepcopy(theirs)
    model = pyfastpeft.from_peft(ours)
    assert isinstance(model.model.embed_tokens, LoRAEmbedding)
    assert model.model.embed_tokens.use_dora["default"] is use_dora
    assert_same_training(ours, theirs)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_lora_on_embeddings_round_trips_between_peft_and_pyfastpeft(name, use_dora, tmp_path):
    theirs = embedding_peft_model(name, use_dora).eval()
    with torch.no_grad():
        want = theirs(input_ids=input_ids()).logits
    theirs.save_pretrained(tmp_path / "peft")  # holds embed_tokens.base_layer.weight too (save_embedding_layers)
    model = MODELS[name]()
    assert "model.embed_tokens" in pyfastpeft.load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids()).logits, want, rtol=1e-5, atol=1e-5)
    pyfastpeft.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert "embed_tokens" in config["target_modules"]
    back = peft.PeftModel.from_pretrained(MODELS[name](), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=input_ids()).logits, want, rtol=1e-5, atol=1e-5)


def test_an_adapter_trained_over_another_embedding_is_refused(tmp_path):
    theirs = embedding_peft_model("llama")
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.base_layer.weight.add_(1.0)  # as if the vocabulary were resized
    theirs.save_pretrained(tmp_path)
    model = tiny_llama()
    with pytest.raises(ValueError, match="differs from the model's"):
        pyfastpeft.load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def assert_merge_round_trips(model, layer, rtol=1e-6):
    """Merging the embedding's adapter keeps the logits; unmerging gives back its weight."""
    model.eval()
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        adapted = model(input_ids=input_ids()).logits
        layer.merge()
        torch.testing.assert_close(model(input_ids=input_ids()).logits, adapted, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=rtol, atol=1e-6)


def test_add_lora_on_embeddings_starts_as_the_identity_trains_and_merges():
    from pyfastpeft.nn.lora_embedding import LoRAEmbedding

    model = tiny_llama()
    with torch.no_grad():
        before = model(input_ids=input_ids()).logits
    report = pyfastpeft.add_lora(model, target_modules=["q_proj", "embed_tokens"], r=4)
    assert report.embeddings == ["model.embed_tokens"]
    layer = model.model.embed_tokens
    assert isinstance(layer, LoRAEmbedding) and layer.lora_embedding_A["default"].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids()).logits, before)  # A starts at zero
    losses = train_steps(model, input_ids(), 8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert_merge_round_trips(model, layer)
    with pytest.raises(ValueError, match="no lora_bias"):
        pyfastpeft.add_lora(tiny_llama(), target_modules=["q_proj", "embed_tokens"], lora_bias=True)


def test_dora_on_embeddings_starts_as_lora_trains_merges_and_keeps_its_norm_blockwise(monkeypatch):
    from pyfastpeft.nn import lora_embedding
    from pyfastpeft.nn.lora_embedding import dora_embedding_norm

    model = tiny_llama()
    with torch.no_grad():
        before = model(input_ids=input_ids()).logits
    pyfastpeft.add_lora(model, target_modules=["q_proj", "embed_tokens"], r=4, use_dora=True)
    layer = model.model.embed_tokens
    magnitude = layer.lora_magnitude_vector["default"].weight
    assert magnitude.requires_grad and magnitude.shape == (64,)
    torch.testing.assert_close(magnitude, layer.base_layer.weight.norm(dim=0))  # m starts at ||E||_col: g = 1
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids()).logits, before)
    losses = train_steps(model, input_ids(), 8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.equal(magnitude, layer.base_layer.weight.norm(dim=0))  # m trained
    A, B, s = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"], layer.scaling["default"]
    dense = (layer.base_layer.weight.double() + s * (B.double() @ A.double()).t()).norm(dim=0)
    monkeypatch.setattr(lora_embedding, "_NORM_ROWS", 48)  # blocks that split the vocabulary of 128 unevenly
    torch.testing.assert_close(dora_embedding_norm(layer.base_layer.weight, A, B, s).double(), dense)
    assert_merge_round_trips(model, layer, rtol=1e-5)


# ---- BitFit ------------------------------------------------------------------------------------------------------


def bias_grads(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def without_wrappers(name: str) -> str:
    return name.replace(".base_layer", "")


@pytest.mark.parametrize("quant", [None, "nf4", "int8"])
def test_bitfit_bias_gradients_of_the_fused_layers_equal_plain_torch(quant):
    """Zero biases added to a bias-free Llama: the fused model's bias gradients (through the NF4 / int8 / dense
    layers, norms, MLP and RoPE patched) equal those of plain torch layers holding the same (dequantized) weights."""
    from pyfastpeft.nn import Linear4bit, Linear8bitLt

    ours = tiny_llama()
    pyfastpeft.prepare_model(ours, quant=quant, lora=False, fused_loss=True)
    report = pyfastpeft.add_bitfit(ours, add_missing_biases=True)
    assert len(report.added) == 14 and "lm_head" not in report.added
    reference = tiny_llama()
    with torch.no_grad():  # the same weights the fused model computes with
        for path, module in ours.named_modules():
            if isinstance(module, Linear4bit):
                reference.get_submodule(path).weight.copy_(module.dequantize().float())
            elif isinstance(module, Linear8bitLt):
                reference.get_submodule(path).weight.copy_(module.dequantize(torch.float32))
    pyfastpeft.add_bitfit(reference, add_missing_biases=True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    if quant == "int8":  # LLM.int8 quantizes x too: compare ours against ours on the reference backend instead
        with pyfastpeft.use_backend("reference"):
            want = {without_wrappers(n): g for n, g in bias_grads(ours, ids).items()}
    else:
        want = bias_grads(reference, ids)
    got = {without_wrappers(n): g for n, g in bias_grads(ours, ids).items()}
    assert sorted(got) == sorted(want) and all(name.endswith(".bias") for name in got)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)
    pyfastpeft.unpatch_model(ours)


def test_bitfit_alone_trains_only_biases_and_lowers_the_loss():
    model = tiny_llama(attention_bias=True, mlp_bias=True)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if not name.endswith(".bias")}
    report = pyfastpeft.add_bitfit(model)
    assert report.added == [] and len(report.trained) == 14
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(report.trained)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = train_steps(model, ids, 10, lr=5e-2)
    assert losses[-1] < losses[0] - 0.1, losses
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p, weights[name])
    subset = pyfastpeft.add_bitfit(tiny_llama(attention_bias=True), target_modules=["q_proj", "v_proj"])
    assert sorted(subset.trained) == sorted(
        f"model.layers.{i}.self_attn.{name}.bias" for i in range(2) for name in ("q_proj", "v_proj")
    )


def test_lora_with_trained_biases_round_trips_as_peft_bias_all(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all")
    theirs = peft.get_peft_model(tiny_llama(attention_bias=True), config)
    randomize(theirs)
    with torch.no_grad():
        theirs.base_model.model.model.layers[0].self_attn.o_proj.bias.add_(0.5)
        theirs.base_model.model.model.layers[1].self_attn.q_proj.base_layer.bias.add_(0.25)
    ours = copy.deepcopy(theirs)
    pyfastpeft.from_peft(ours)
    assert_same_training(ours, theirs)
    theirs.eval()
    with torch.no_grad():
        want = theirs(input_ids=input_ids()).logits
    theirs.save_pretrained(tmp_path / "peft")
    model = tiny_llama(attention_bias=True)
    pyfastpeft.load_adapter(model, tmp_path / "peft")
    assert model.model.layers[0].self_attn.o_proj.bias.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids()).logits, want, rtol=1e-5, atol=1e-5)
    pyfastpeft.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == "all"
    back = peft.PeftModel.from_pretrained(tiny_llama(attention_bias=True), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=input_ids()).logits, want, rtol=1e-5, atol=1e-5)
    added = tiny_llama()
    pyfastpeft.add_lora(added, r=4)
    pyfastpeft.add_bitfit(added, add_missing_biases=True, freeze_others=False)
    with pytest.raises(ValueError, match="are biases add_bitfit added"):
        pyfastpeft.save_adapter(added, tmp_path / "refused")
    with pytest.raises(ValueError, match="no matched layer has a bias"):
        pyfastpeft.add_bitfit(tiny_llama())


def test_prepare_model_combines_the_methods_and_reports_each_ones_trainable_count():
    model = tiny_llama(attention_bias=True)
    settings = pyfastpeft.LoraSettings(
        r=4,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        use_dora=False,
        modules_to_save=["lm_head"],
        bias="all",
    )
    report = pyfastpeft.prepare_model(model, quant="nf4", lora=settings)
    methods = report.trainable_by_method
    assert set(methods) == {"lora", "embeddings", "modules_to_save", "bitfit"}, methods
    assert methods["bitfit"] == 2 * (64 + 32 + 32 + 64)  # q, k, v, o biases of both layers
    assert methods["modules_to_save"] == 128 * 64
    assert sum(methods.values()) == report.trainable_params
    assert "bitfit" in str(report)
    pyfastpeft.unpatch_model(model)

    alone = tiny_llama()
    report = pyfastpeft.prepare_model(alone, quant="nf4", lora=False, bitfit=True)
    assert report.replaced["bitfit biases added"] == 14 and set(report.trainable_by_method) == {"bitfit"}
    pyfastpeft.unpatch_model(alone)
    dora = tiny_llama()
    report = pyfastpeft.prepare_model(dora, quant="nf4", lora=pyfastpeft.LoraSettings(r=4, use_dora=True))
    assert set(report.trainable_by_method) == {"lora", "dora"}
    pyfastpeft.unpatch_model(dora)
    with pytest.raises(ValueError, match="bias must be 'none', 'all' or 'lora_only'"):
        pyfastpeft.LoraSettings(bias="some")


# ---- the same on Gemma -------------------------------------------------------------------------------------------


def gemma_biased():
    from helpers import TINY_DECODER
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    return GemmaForCausalLM(GemmaConfig(**TINY_DECODER, head_dim=16, attention_bias=True)).eval()


def test_lora_bias_on_gemma_converts_round_trips_and_trains(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_bias=True)
    theirs = peft.get_peft_model(gemma_biased(), config)
    randomize(theirs)
    ours = copy.deepcopy(theirs)
    pyfastpeft.from_peft(ours)
    assert_same_training(ours, theirs)
    theirs.eval()
    with torch.no_grad():
        want = theirs(input_ids=input_ids()).logits
    theirs.save_pretrained(tmp_path)
    model = gemma_biased()
    pyfastpeft.load_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids()).logits, want, rtol=1e-5, atol=1e-5)
    trained = gemma_biased()
    pyfastpeft.add_lora(trained, target_modules=["q_proj", "v_proj"], r=4, lora_bias=True)
    losses = train_steps(trained, input_ids(), 8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert trained.model.layers[0].self_attn.q_proj.lora_B["default"].bias.abs().sum() > 0


def test_a_gemma_classifier_with_modules_to_save_converts_and_round_trips(tmp_path):
    from helpers import TINY_DECODER
    from transformers import GemmaConfig, GemmaForSequenceClassification

    def classifier():
        torch.manual_seed(0)
        return GemmaForSequenceClassification(GemmaConfig(**TINY_DECODER, head_dim=16, num_labels=3, pad_token_id=0))

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(classifier(), config)
    randomize(theirs)
    ours = copy.deepcopy(theirs)
    pyfastpeft.from_peft(ours)
    (got, got_grads), (want, want_grads) = classifier_outputs(ours), classifier_outputs(theirs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6)
    theirs.save_pretrained(tmp_path)
    model = classifier()
    pyfastpeft.load_adapter(model, tmp_path)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    theirs.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
