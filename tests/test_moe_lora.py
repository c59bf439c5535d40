"""LoRA on transformers 5.x MoE blocks (3-D expert weights and bare router weights), as PEFT's target_parameters
puts it: prepare_model's all-linear adapts what PEFT's all-linear adapts, computes PEFT's loss and gradients (dense
and over NF4 experts), saves adapters PEFT reads, and from_peft converts PEFT's ParamWrappers. Tiny models."""

import copy
import pickle

import pytest
import torch
import transformers
from test_architectures import loss_and_grads, stacked_experts, synthetic_experts, tiny_moe, with_dequantized_weights

import pyfastpeft
from pyfastpeft.nn.experts import LoRAExperts, LoRAParameter

peft = pytest.importorskip("peft")
moe = pytest.importorskip("transformers.integrations.moe", reason="transformers < 5 has no 3-D experts")

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def adapted(model) -> dict[str, int]:
    """What a model adapts, in one vocabulary for both libraries: linear layer path, or path.parameter for a bare
    parameter (PEFT's target_parameters) -> rank."""
    from pyfastpeft.nn import LoRALinear

    found = {}
    for path, module in model.named_modules():
        path = path.removeprefix("base_model.model.")
        kind = type(module).__name__
        if isinstance(module, LoRALinear):
            found[path] = module.r["default"]
        elif isinstance(module, LoRAExperts):
            found.update({f"{path}.{name}": module.r[name] for name in module.projections})
        elif isinstance(module, LoRAParameter):
            found[f"{path}.{module.parameter_name}"] = module.r
        elif kind == "ParamWrapper":
            found[f"{path.replace('.base_layer', '')}.{module.parameter_name}"] = module.r["default"]
        elif kind == "Linear" and type(module).__module__.startswith("peft."):
            found[path] = module.r["default"]
    return found


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"])
def test_all_linear_adapts_what_peft_all_linear_adapts(name):
    """Every part PEFT's all-linear adapts (linear layers; on transformers 5.x, through target_parameters, the
    experts' gate_up_proj at rank 2r, down_proj and the router weight), ours adapts at the same rank. PEFT adapts
    the experts only of the architectures in its weight-conversion table (not Qwen2-MoE's, for one): ours covers
    every experts block whose layout LoRAExperts reproduces."""
    from real_stack_helpers import LORA, peft_lora_config

    base = tiny_moe(name)
    theirs = adapted(peft.get_peft_model(copy.deepcopy(base), peft_lora_config()))
    model = copy.deepcopy(base)
    report = pyfastpeft.prepare_model(model, quant=None, lora=LORA)
    ours = adapted(model)
    assert {path: ours.get(path) for path in theirs} == theirs
    blocks = stacked_experts(base)
    assert report.replaced["lora experts"] == len(blocks) == report.replaced["lora routers"]
    for path in blocks:
        assert ours[f"{path}.down_proj"] == LORA.r and ours[f"{path}.gate_up_proj"] == 2 * LORA.r
    assert not [line for line in report.not_patched if "not adapted" in line]


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_prepared_moe_equals_peft_and_its_adapter_loads_in_peft(name, quant):
    """prepare_model adapts experts and routers; with seeded adapters the loss and every adapter gradient equal
    transformers + PEFT holding the same adapters (read by PeftModel.from_pretrained from the directory our
    save_pretrained wrote) over the dense model, or over the one holding the NF4 experts' dequantized weights."""
    from real_stack_helpers import LORA, in_peft_names, load_adapters, peft_twin

    base = tiny_moe(name)
    model = copy.deepcopy(base)
    report = pyfastpeft.prepare_model(model, quant=quant, lora=LORA)
    if quant == "nf4":
        assert report.replaced["nf4 experts"] == len(stacked_experts(base))
        base = with_dequantized_weights(copy.deepcopy(base), model)
    reference, adapters = peft_twin(base, model)
    load_adapters(model, adapters)
    model.train(), reference.train()
    torch.manual_seed(2)
    ours, our_grads = loss_and_grads(model, IDS, IDS)
    torch.manual_seed(2)
    theirs, their_grads = loss_and_grads(reference, IDS, IDS)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-5)
    their_grads = {key.removeprefix("base_model.model."): grad for key, grad in their_grads.items()}
    our_grads = in_peft_names(model, our_grads)
    assert our_grads.keys() == their_grads.keys()
    assert any(".experts." in key for key in our_grads) and any(".gate.lora_" in key for key in our_grads)
    for key, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize(
    "lora, why",
    [
        (pyfastpeft.LoraSettings(target_modules=["q_proj", "v_proj"]), "'all-linear' adapts experts"),
        (pyfastpeft.LoraSettings(lora_dropout=0.1), "lora_dropout > 0"),
        (False, "lora=False"),
    ],
    ids=["named-targets", "dropout", "no-lora"],
)
def test_moe_parts_left_frozen_are_reported(lora, why):
    model = tiny_moe("mixtral")
    blocks = stacked_experts(model)
    report = pyfastpeft.prepare_model(model, quant=None, lora=lora)
    lines = [line for line in report.not_patched if "not adapted" in line]
    assert {line.split(" ")[0] for line in lines} == blocks | {path.replace("experts", "gate") for path in blocks}
    assert all(why in line for line in lines)
    assert not any(isinstance(m, (LoRAExperts, LoRAParameter)) for m in model.modules())
    assert all(not p.requires_grad for path in blocks for p in model.get_submodule(path).parameters())


def test_from_peft_converts_target_parameters_and_the_peft_model_keeps_working(tmp_path):
    """PEFT's nested ParamWrappers become LoRAExperts / LoRAParameter over the very same matrices: equal loss and
    gradients, the PeftModel's save_pretrained writes what PEFT reads back, disable_adapter gives the base model,
    and merging (not built for experts) raises naming the alternative."""
    from real_stack_helpers import peft_lora_config, seed_adapters

    base = tiny_moe("mixtral")
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_lora_config())
    seed_adapters(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    theirs, _ = loss_and_grads(peft_model, IDS, IDS)
    their_grads = [p.grad.clone() for p in params]
    model = pyfastpeft.from_peft(peft_model)
    experts = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert len(experts) == len(stacked_experts(base)) and any(isinstance(m, LoRAParameter) for m in model.modules())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    ours, _ = loss_and_grads(peft_model, IDS, IDS)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-6, atol=1e-6)
    for parameter, grad in zip(params, their_grads):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-5, atol=1e-7)
    peft_model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, peft_model(input_ids=IDS).logits)
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(input_ids=IDS).logits, base(input_ids=IDS).logits)
        assert all(m.adapters_enabled for m in experts)
    with pytest.raises(NotImplementedError, match="before from_peft"):
        peft_model.merge_and_unload()


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_load_adapter_reads_target_parameters_written_by_peft_and_by_us(tmp_path, quant):
    """An adapter directory with target_parameters (PEFT's all-linear on a MoE model, or our save) loads into a
    model without adapters: experts become LoRAExperts (over NF4 experts too), routers LoRAParameter, and the model
    computes what PEFT does with the same directory (over the dequantized weights when quantized)."""
    from real_stack_helpers import peft_lora_config, seed_adapters

    base = tiny_moe("qwen3_moe")
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_lora_config())
    seed_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    pyfastpeft.prepare_model(model, quant=quant, lora=False, fused_loss=False)
    loaded = pyfastpeft.load_adapter(model, tmp_path / "peft")
    assert sum(isinstance(m, LoRAExperts) for m in model.modules()) == len(stacked_experts(base))
    assert any(path.endswith(".gate") for path in loaded)
    if quant is not None:  # PEFT over the dense model holding the NF4 weights' dequantized values
        peft_model = peft.PeftModel.from_pretrained(
            with_dequantized_weights(copy.deepcopy(base), model), tmp_path / "peft"
        )
    model.eval(), peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        got = model(input_ids=IDS).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        pyfastpeft.save_adapter(model, tmp_path / "ours")
        again = copy.deepcopy(base)
        pyfastpeft.load_adapter(again, tmp_path / "ours")
        if quant is None:
            torch.testing.assert_close(again(input_ids=IDS).logits, got, rtol=0, atol=1e-6)


def test_load_adapter_refuses_bad_target_parameters_and_changes_nothing(tmp_path):
    import json

    from real_stack_helpers import LORA
    from safetensors.torch import load_file, save_file

    base = tiny_moe("mixtral")
    model = copy.deepcopy(base)
    pyfastpeft.prepare_model(model, quant=None, lora=LORA, fused_loss=False)
    pyfastpeft.save_adapter(model, tmp_path)
    config_path, weights_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    config, weights = json.loads(config_path.read_text()), load_file(weights_path)

    def refused(match, **changes):
        target = copy.deepcopy(base)
        before = {key: value.clone() for key, value in target.state_dict().items()}
        config_path.write_text(json.dumps({**config, **changes.get("config", {})}))
        save_file(changes.get("weights", weights), weights_path)
        with pytest.raises(ValueError, match=match):
            pyfastpeft.load_adapter(target, tmp_path)
        assert target.state_dict().keys() == before.keys()
        assert not any(isinstance(m, (LoRAExperts, LoRAParameter)) for m in target.modules())

    refused("must be a list", config={"target_parameters": "gate_up_proj"})
    refused("2 nesting levels and 1 parameters", config={"target_parameters": ["down_proj", "gate.weight"]})
    refused("lora_dropout", config={"lora_dropout": 0.1})
    key = next(key for key in weights if key.endswith("experts.lora_A.weight"))
    refused(r"r=8 and .* give", weights={**weights, key: weights[key][:-1]})
    refused("r=3 and", config={"rank_pattern": {**config["rank_pattern"], r".*\.down_proj": 3}})


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "quantized-identity"])
@pytest.mark.parametrize("transposed_with_bias", [False, True], ids=["mixtral-layout", "transposed-with-bias"])
def test_lora_experts_equal_transformers_experts_over_peft_merged_weights(transposed_with_bias, quantized):
    """LoRAExperts computes what transformers' batched experts implementation computes over the weights PEFT's
    ParamWrapper merges (W_e + s * B_e A_e in its einsum layout, [E, out, in] or transposed [E, in, out]), biases and
    expert-parallel sentinel ids included, over a dense block or a QuantizedExperts one; gradients reach A and B."""
    from pyfastpeft.nn import QuantizedExperts

    experts, (experts_count, hidden, _) = synthetic_experts(transposed_with_bias)
    r = 3
    merged = copy.deepcopy(experts)
    block = QuantizedExperts(experts, quantize=lambda linear: linear) if quantized else experts
    ours = LoRAExperts(block, {"gate_up_proj": 2 * r, "down_proj": r}, {"gate_up_proj": 5.0, "down_proj": 2.0})
    with torch.no_grad():
        for name in ours.projections:
            ours.lora_B[name].normal_()
            lora_A = ours.lora_A[name].view(experts_count, ours.r[name], -1)  # e r i
            lora_B = ours.lora_B[name].view(ours.lora_B[name].shape[0], ours.r[name], experts_count)  # o r e
            pattern = "o r e, e r i -> e i o" if transposed_with_bias else "o r e, e r i -> e o i"
            getattr(merged, name).add_(torch.einsum(pattern, lora_B, lora_A) * ours.scaling[name])
    x = torch.randn(7, hidden)
    index = torch.randint(0, experts_count, (7, 2))
    index[2, 1] = experts_count  # a sentinel
    weights = torch.rand(7, 2)
    expected = moe.batched_mm_experts_forward(merged, x, index, weights)
    got = ours(x, index, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    assert all(ours.lora_B[name].grad.abs().sum() > 0 for name in ours.projections)
    assert all(not p.requires_grad for p in block.parameters())


def test_prepared_moe_with_lora_pickles_and_deepcopies():
    """Pickled without the fused loss: its probe runs a forward with router logits, after which transformers' own
    Mixtral no longer pickles (a local output-capturing hook); deepcopy works either way."""
    from real_stack_helpers import LORA

    model = tiny_moe("mixtral")
    pyfastpeft.prepare_model(model, quant="nf4", lora=LORA, fused_loss=False)
    model.eval()
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        copied.eval()
        with torch.no_grad():
            torch.testing.assert_close(copied(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_saving_adapters_on_dense_layers_peft_would_remap_warns(tmp_path):
    """PEFT's transformers 5 loader rewrites target_modules named like transformers 4's expert layers (Qwen3-MoE:
    gate_proj, up_proj, down_proj) to the fused experts' parameters, so on a Qwen3-MoE with dense MLP layers
    (mlp_only_layers) it would drop those layers' adapters: saving warns, and our own loader reads them back."""
    from test_architectures import MOE, SMALL

    from pyfastpeft.integrations.peft import _peft_remapped_names

    torch.manual_seed(0)
    base = transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(**SMALL, **MOE["qwen3_moe"][2], mlp_only_layers=[0])
    )
    if "down_proj" not in _peft_remapped_names(base):
        pytest.skip("this PEFT does not remap Qwen3-MoE's layer names")
    model = copy.deepcopy(base)
    pyfastpeft.prepare_model(model, quant=None, lora=pyfastpeft.LoraSettings(), fused_loss=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.normal_(std=0.05)
    with pytest.warns(UserWarning, match="leave these layers without their adapter"):
        model.save_pretrained(tmp_path)
    again = copy.deepcopy(base)
    pyfastpeft.load_adapter(again, tmp_path)
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=1e-6)


def test_prepared_moe_under_bf16_autocast_matches_peft_within_bf16_rounding():
    """TrainingArguments(bf16=True) autocasts an fp32 model: the experts' and router's LoRA follow it (the low-rank
    products in bf16 as F.linear's autocast rule says) and the loss and adapter gradients stay those of
    transformers + PEFT under the same autocast, up to bf16 rounding (both sides round differently: PEFT folds
    s B A into the fp32 weight first)."""
    from real_stack_helpers import LORA, in_peft_names, load_adapters, peft_twin

    base = tiny_moe("mixtral")
    model = copy.deepcopy(base)
    pyfastpeft.prepare_model(model, quant=None, lora=LORA)
    reference, adapters = peft_twin(base, model)
    load_adapters(model, adapters)
    model.train(), reference.train()
    results = []
    for side in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = loss_and_grads(side, IDS, IDS)
        results.append((out.loss, {key.removeprefix("base_model.model."): g for key, g in grads.items()}))
    (ours, our_grads), (theirs, their_grads) = results
    our_grads = in_peft_names(model, our_grads)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=0)
    assert our_grads.keys() == their_grads.keys()
    for key in our_grads:
        if ".experts." in key or ".gate." in key:
            scale = their_grads[key].abs().max().item()
            torch.testing.assert_close(our_grads[key], their_grads[key], rtol=0, atol=0.05 * scale + 1e-6, msg=key)
