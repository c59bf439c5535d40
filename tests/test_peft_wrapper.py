"""from_peft and the PeftModel the user keeps: named adapters on different modules convert, every PeftModel method
acts on the LoRALinear layers (compared with the same method on an unconverted copy) or raises naming the
alternative, nothing saves an empty adapter, and what is not built (trainable tokens, DoRA on embeddings) is refused
with the model unchanged."""

import copy
import json
import os

import pytest
import torch
from helpers import tiny_llama
from torch import nn

import pyfastpeft
from pyfastpeft.nn import LoRALinear

peft = pytest.importorskip("peft")


def input_ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def two_adapter_peft_model():
    """A PeftModel with adapter 'default' on q_proj, v_proj and 'other' on v_proj, up_proj (different modules),
    random B matrices."""
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    model.add_adapter(
        "other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "up_proj"], task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.fixture
def pair():
    """(theirs, ours): the same PeftModel twice, ours converted by from_peft."""
    theirs = two_adapter_peft_model()
    ours = copy.deepcopy(theirs)
    pyfastpeft.from_peft(ours)
    return theirs, ours


def lora_layers(model):
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def test_adapters_on_different_modules_convert_and_switch_like_peft(pair):
    theirs, ours = pair
    up_proj = ours.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(up_proj, LoRALinear) and up_proj.active_adapter is None  # 'default' does not target it
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    for model in pair:
        model.set_adapter("other")
    assert up_proj.active_adapter == "other" and ours.active_adapter == "other"
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.active_adapter is None
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    trainable = sorted(name for name, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(name for name, p in theirs.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="Adapter missing not found"):
        ours.set_adapter("missing")


def test_save_pretrained_writes_every_adapter_as_peft_does(pair, tmp_path):
    theirs, ours = pair
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    for name, directory in (("default", tmp_path), ("other", tmp_path / "other")):
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), directory)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(loaded), logits(theirs), rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["up_proj", "v_proj"] and config["r"] == 2


def test_trainer_save_model_writes_the_adapter(pair, tmp_path):
    from transformers import Trainer, TrainingArguments

    theirs, ours = pair
    trainer = Trainer(model=ours, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    trainer.save_model(str(tmp_path / "out"))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out")
    torch.testing.assert_close(logits(loaded), logits(theirs), rtol=1e-5, atol=1e-5)


def test_save_pretrained_uses_the_state_dict_it_is_given_and_honours_its_options(pair, tmp_path):
    _, ours = pair
    state_dict = {key: torch.zeros_like(value) for key, value in ours.state_dict().items()}
    ours.save_pretrained(tmp_path / "zeros", selected_adapters=["other"], state_dict=state_dict)
    assert os.listdir(tmp_path / "zeros") == ["other"]
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "zeros" / "other" / "adapter_model.safetensors")
    assert len(tensors) == 8 and all(not tensor.any() for tensor in tensors.values())
    ours.save_pretrained(tmp_path / "worker", is_main_process=False)
    assert not (tmp_path / "worker").exists()
    with pytest.raises(ValueError, match=r"unknown adapters \['missing'\]"):
        ours.save_pretrained(tmp_path / "x", selected_adapters=["missing"])
    with pytest.raises(NotImplementedError, match="safetensors only"):
        ours.save_pretrained(tmp_path / "x", safe_serialization=False)


def test_nothing_saves_an_empty_adapter(pair, tmp_path):
    _, ours = pair
    ours.unload()
    with pytest.raises(ValueError, match="no LoRALinear layer has adapter 'default', nothing to save"):
        ours.save_pretrained(tmp_path)
    assert not tmp_path.joinpath("adapter_model.safetensors").exists()


def test_disable_adapter_gives_the_base_model_inside_the_block_only(pair):
    theirs, ours = pair
    base = logits(tiny_llama())
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), base)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    ours.disable_adapter_layers()
    torch.testing.assert_close(logits(ours), base)
    ours.enable_adapter_layers()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_merge_and_unload_returns_the_merged_transformers_model(pair):
    theirs, ours = pair
    expected = logits(theirs)
    merged = ours.merge_and_unload()
    assert merged is ours.base_model.model and not lora_layers(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(merged), logits(theirs.merge_and_unload()), rtol=1e-5, atol=1e-5)


def test_merge_adapter_and_unmerge_adapter_round_trip(pair):
    theirs, ours = pair
    expected = logits(theirs)
    ours.merge_adapter()
    assert all(layer.merged for layer in lora_layers(ours) if layer.active_adapter is not None)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-4, atol=1e-4)
    ours.unmerge_adapter()
    assert not any(layer.merged for layer in lora_layers(ours))
    torch.testing.assert_close(logits(ours), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"merges the active adapter \['default'\], not \['other'\]"):
        ours.merge_adapter(adapter_names=["other"])


def test_unload_returns_the_base_model(pair):
    _, ours = pair
    unloaded = ours.unload()
    assert not lora_layers(unloaded)
    torch.testing.assert_close(logits(unloaded), logits(tiny_llama()))


def test_delete_adapter_removes_it_everywhere_as_peft_does(pair):
    theirs, ours = pair
    for model in pair:
        model.delete_adapter("default")
    assert ours.active_adapter == "other" and list(ours.peft_config) == ["other"]
    theirs.set_adapter("other")  # PEFT leaves its PeftModel on the deleted adapter when layers differ
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear  # it held 'default' only
    assert list(ours.base_model.model.model.layers[0].self_attn.v_proj.lora_A) == ["other"]
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Adapter default does not exist"):
        ours.delete_adapter("default")


def test_set_requires_grad_and_trainable_parameter_counts_follow_peft(pair):
    theirs, ours = pair
    if not hasattr(theirs, "set_requires_grad"):
        pytest.skip("this PEFT release has no PeftModel.set_requires_grad")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in pair:
        model.set_requires_grad("other", requires_grad=True)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.base_model.model.model.layers[0].mlp.up_proj.lora_A["other"].weight.requires_grad


def test_load_adapter_reads_a_local_directory(pair, tmp_path):
    theirs, ours = pair
    theirs.save_pretrained(tmp_path)
    ours.delete_adapter("other")
    ours.load_adapter(tmp_path / "other", adapter_name="again")
    assert "again" in ours.peft_config
    ours.set_adapter("again")
    theirs.set_adapter("other")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="local directory.*snapshot_download"):
        ours.load_adapter("someone/some-adapter", adapter_name="hub")


@pytest.mark.parametrize(
    "call, alternative",
    [
        (lambda model: model.add_adapter("new", peft.LoraConfig(target_modules=["k_proj"])), "pyfastpeft.add_lora"),
        (lambda model: model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix"), "with PEFT before"),
        (lambda model: model.get_layer_status(), "active_adapter, adapters_enabled"),
        (lambda model: model.get_model_status(), "active_adapter, adapters_enabled"),
        (lambda model: model(input_ids=input_ids(), adapter_names=["default", "other"]), "set_adapter"),
    ],
)
def test_methods_that_cannot_work_name_the_alternative(pair, call, alternative):
    _, ours = pair
    with pytest.raises(NotImplementedError, match=f"converted by pyfastpeft.from_peft; .*{alternative}"):
        call(ours)


def test_converted_wrapper_works_with_pyfastpeft_and_converts_once(pair, tmp_path):
    theirs, ours = pair
    model = pyfastpeft.from_peft(ours)
    assert model is ours.base_model.model and isinstance(ours, peft.PeftModel)
    pyfastpeft.save_adapter(ours, tmp_path)
    fresh = tiny_llama()
    pyfastpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(theirs), rtol=1e-5, atol=1e-5)


def test_the_converted_wrapper_survives_torch_save_whole(pair):
    import io

    _, ours = pair
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(logits(restored), logits(ours))
    for model in (restored, ours):
        model.set_adapter("other")
    torch.testing.assert_close(logits(restored), logits(ours))


def test_a_merged_dora_embedding_is_refused_and_the_model_is_unchanged():
    """PEFT keeps the norm a merged DoRA adapter was merged with in its own cache, which a conversion would lose."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], use_dora=True)
    model = peft.get_peft_model(tiny_llama(), config)
    model.base_model.model.model.embed_tokens.merge()
    types = [type(module) for module in model.modules()]
    with pytest.raises(ValueError, match="embed_tokens has a merged DoRA adapter"):
        pyfastpeft.from_peft(model)
    assert [type(module) for module in model.modules()] == types


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(trainable_token_indices=[1, 2]), r"sets \['trainable_token_indices'\]"),
    ],
)
def test_what_is_not_built_is_refused_and_the_model_is_unchanged(settings, message):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **settings}))
    types = [type(module) for module in model.modules()]
    with pytest.raises(ValueError, match=message):
        pyfastpeft.from_peft(model)
    assert [type(module) for module in model.modules()] == types
    assert type(model) is peft.PeftModel
