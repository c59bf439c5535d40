"""LoRA modules: LoRALinear against PEFT's lora.Linear (forward, grads, adapters, merge), the NF4 base,
add_lora, and PEFT interoperability (save_adapter, load_adapter, from_peft) on a tiny random Llama."""

import copy
import json
import math
import re

import pytest
import torch
from helpers import TOLERANCES, assert_no_less_accurate
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import pyfastpeft
from pyfastpeft.nn import Linear4bit, Linear8bitLt, LoRALinear

LLAMA_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def peft_module():
    return pytest.importorskip("peft")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIG)).eval()


def input_ids(seed=1):
    return torch.randint(0, LLAMA_CONFIG["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=2):
    """Give every LoRA matrix random values (B starts at zero, which would hide errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_A." in f".{name}" or ".lora_B." in f".{name}":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def lora_formula(x, base, lora_A, lora_B, scaling):
    """base(x) + s * (x A^T) B^T in x's dtype, differentiable w.r.t. x, A and B."""
    return base(x) + scaling * (x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t()


def adapter_weights(module, name):
    return module.lora_A[name].weight, module.lora_B[name].weight


# ---- LoRALinear against PEFT's lora.Linear -------------------------------------------------------------------


def forward_and_grads(module, x):
    """(y, dx, dA, dB) of module on x for a fixed upstream gradient."""
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape).to(y.dtype))
    lora_A, lora_B = adapter_weights(module, "default")
    return y.detach(), x.grad, lora_A.grad, lora_B.grad


def peft_lora_linear(peft, base, **settings):
    """peft.tuners.lora.Linear(base, "default", **settings) on every supported PEFT release (newer releases'
    constructor also takes the LoraConfig the settings come from)."""
    import inspect

    if "config" in inspect.signature(peft.tuners.lora.Linear.__init__).parameters:
        config = peft.LoraConfig(**settings)
        return peft.tuners.lora.Linear(base, "default", config=config, **settings)
    return peft.tuners.lora.Linear(base, "default", **settings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias, use_rslora, x_shape", [(True, False, (5, 40)), (False, True, (2, 3, 40))])
def test_forward_and_grads_match_peft_lora_linear(dtype, bias, use_rslora, x_shape):
    peft = peft_module()
    torch.manual_seed(0)
    base = nn.Linear(40, 24, bias=bias).to(dtype)
    theirs = peft_lora_linear(
        peft, copy.deepcopy(base), r=6, lora_alpha=12, use_rslora=use_rslora, init_lora_weights=False
    )
    ours = LoRALinear(copy.deepcopy(base), r=6, lora_alpha=12, use_rslora=use_rslora, init_lora_weights=False)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(ours, name)["default"].weight.copy_(getattr(theirs, name)["default"].weight)
    assert ours.scaling == theirs.scaling
    x = torch.randn(x_shape).to(dtype)
    got = forward_and_grads(ours, x)
    want = forward_and_grads(theirs, x)
    exact = forward_and_grads(copy.deepcopy(theirs).double(), x.double())
    assert got[0].dtype == dtype
    for ours_value, peft_value, exact_value in zip(got, want, exact):
        if dtype == torch.float32:
            torch.testing.assert_close(ours_value, peft_value, **TOLERANCES[dtype])
        else:  # PEFT rounds every bf16 step; ours accumulates in fp32 and must be at least as accurate
            assert_no_less_accurate(ours_value.to(dtype), peft_value, exact_value, dtype)


def test_state_dict_keys_and_init_are_peft_s():
    peft = peft_module()
    base = nn.Linear(32, 16)
    ours = LoRALinear(copy.deepcopy(base), r=4)
    theirs = peft_lora_linear(peft, copy.deepcopy(base), r=4, lora_alpha=16)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours.lora_A["default"], nn.Linear) and ours.lora_A["default"].bias is None
    assert torch.count_nonzero(ours.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert 0.5 * bound < ours.lora_A["default"].weight.abs().max() <= bound
    x = torch.randn(3, 32)
    torch.testing.assert_close(ours(x), base(x))  # B = 0: a new adapter starts as the identity


def test_only_the_active_adapter_trains_and_switching_changes_the_output():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    module = LoRALinear(base, r=4, lora_alpha=8)
    module.add_adapter("second", r=2, lora_alpha=8, use_rslora=True)
    randomize_adapters(module)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert module.lora_A["default"].weight.requires_grad and not module.lora_A["second"].weight.requires_grad
    x = torch.randn(3, 32)
    y_default = module(x)
    torch.testing.assert_close(y_default, lora_formula(x, base, *adapter_weights(module, "default"), 2.0))

    module.set_adapter("second")
    assert module.active_adapter == "second" and module.scaling["second"] == 8 / math.sqrt(2)
    assert module.lora_B["second"].weight.requires_grad and not module.lora_B["default"].weight.requires_grad
    torch.testing.assert_close(module(x), lora_formula(x, base, *adapter_weights(module, "second"), 8 / math.sqrt(2)))

    module.delete_adapter("second")
    assert module.active_adapter == "default" and list(module.lora_A) == ["default"] and "second" not in module.r
    torch.testing.assert_close(module(x), y_default)


def test_disabled_adapters_give_the_base_alone():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    module = LoRALinear(base, r=4)
    randomize_adapters(module)
    x = torch.randn(3, 32)
    y = module(x)
    module.disable_adapters()
    assert not module.adapters_enabled
    torch.testing.assert_close(module(x), base(x))
    module.enable_adapters()
    torch.testing.assert_close(module(x), y)


def test_dropout_applies_in_training_only_and_follows_the_seed():
    torch.manual_seed(0)
    module = LoRALinear(nn.Linear(32, 16), r=4, lora_dropout=0.5)
    randomize_adapters(module)
    x = torch.randn(8, 32)
    undropped = lora_formula(x, module.base_layer, *adapter_weights(module, "default"), module.scaling["default"])
    torch.testing.assert_close(module.eval()(x), undropped)
    module.train()
    torch.manual_seed(3)
    first = module(x)
    torch.manual_seed(3)
    assert torch.equal(module(x), first)
    assert not torch.allclose(first, undropped)


# ---- merge / unmerge -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_the_adapter_and_unmerge_restores_the_weight(dtype):
    torch.manual_seed(0)
    base = nn.Linear(48, 40).to(dtype)
    original = base.weight.detach().clone()
    module = LoRALinear(base, r=4, lora_alpha=8)
    randomize_adapters(module)
    x = torch.randn(5, 48).to(dtype)
    y = module(x)
    module.merge()
    assert module.merged
    delta = module._delta_weight("default")
    torch.testing.assert_close(base.weight, (original.float() + delta).to(dtype), rtol=0, atol=0)  # rounded once
    torch.testing.assert_close(module(x), y, **TOLERANCES[dtype])
    module.unmerge()
    assert not module.merged
    eps = torch.finfo(dtype).eps
    error = (base.weight.float() - original.float()).abs()
    assert (error <= eps * (original.float().abs() + delta.abs()) + 1e-7).all()  # one rounding of W + delta
    torch.testing.assert_close(module(x), y, **TOLERANCES[dtype])


def test_disabling_a_merged_layer_unmerges_it():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    module = LoRALinear(base, r=4)
    randomize_adapters(module)
    x = torch.randn(3, 32)
    expected = base(x)
    module.merge()
    module.disable_adapters()
    assert not module.merged
    torch.testing.assert_close(module(x), expected)


# ---- NF4 base ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_nf4_base_forward_and_grads_follow_linear4bit(compute_dtype):
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 48), compute_dtype=compute_dtype)
    module = LoRALinear(base, r=4, lora_alpha=8)
    randomize_adapters(module)
    x = torch.randn(2, 3, 64, requires_grad=True)  # fp32 x: cast to compute_dtype and back, as Linear4bit does
    y = module(x)
    assert y.dtype == torch.float32
    lora_A, lora_B = adapter_weights(module, "default")
    x_ref = x.detach().clone().requires_grad_()
    expected = lora_formula(x_ref.to(compute_dtype), base, lora_A, lora_B, 2.0).float()
    torch.testing.assert_close(y, expected, **TOLERANCES[compute_dtype])
    grad_y = torch.linspace(-1, 1, y.numel()).view(y.shape)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B), grad_y)
    expected_grads = torch.autograd.grad(expected, (x_ref, lora_A, lora_B), grad_y)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **TOLERANCES[compute_dtype])


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 12])  # the decode GEMV's rows, and past its 8
def test_nf4_base_at_inference_gives_lora_linear_s_output_bit_for_bit(monkeypatch, compute_dtype, rows):
    """With gradients off and nothing to draw, a LoRA layer over Linear4bit runs the decode kernel without
    re-describing its base each call (as Linear4bit does): lora_linear's output, bit for bit, and a truncated
    weight is still refused. Training with dropout, autocast and gradients take lora_linear."""
    from pyfastpeft.nn import lora as lora_nn

    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(256, 48), compute_dtype=compute_dtype).requires_grad_(False)
    module = LoRALinear(base, r=4, lora_alpha=8, lora_dropout=0.1)
    randomize_adapters(module)
    x = torch.randn(rows, 1, 256)
    through = []
    direct = lora_nn.lora_nf4_no_grad
    monkeypatch.setattr(lora_nn, "lora_nf4_no_grad", lambda *args: through.append(1) or direct(*args))
    with torch.no_grad():
        fast = module.eval()(x)
        assert len(through) == 1
        with monkeypatch.context() as patch:
            patch.setattr(LoRALinear, "_infers_over_nf4", lambda *args: False)
            expected = module(x)
        torch.manual_seed(3)
        module.train()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            module.eval()(x)
    assert torch.equal(fast, expected) and fast.dtype == x.dtype
    assert len(through) == 1  # dropout in training and autocast went through lora_linear
    base.weight.data = base.weight.data[:-1]  # a truncated checkpoint
    with torch.no_grad(), pytest.raises(ValueError, match="packed"):
        module(x)


def test_nf4_inference_follows_every_update_of_the_adapter():
    """Over a bf16 Linear4bit the no-grad path casts the fp32 adapter to bf16 at every call: each output equals
    lora_linear's over the weights of the moment, however they changed. An update through `.data` bumps no version
    counter, so a cast kept between calls (keyed on the weight's version and storage) went stale on it."""
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(128, 32), compute_dtype=torch.bfloat16).requires_grad_(False)
    module = LoRALinear(base, r=4, lora_alpha=8).eval()
    module.add_adapter("other", r=2, lora_alpha=4)
    randomize_adapters(module)
    x = torch.randn(2, 128, dtype=torch.bfloat16)

    def check():
        with torch.no_grad():
            fast = module(x)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(LoRALinear, "_infers_over_nf4", lambda *args: False)
                expected = module(x)
        assert torch.equal(fast, expected)
        return fast

    before = check()
    with torch.no_grad():
        module.lora_A["default"].weight.mul_(2.0)  # an optimizer step
    check()
    module.lora_B["default"].weight.data.copy_(torch.randn(32, 4))  # an EMA or a loader writing through .data
    assert not torch.equal(check(), before)
    module.lora_B["default"].weight.data = torch.randn(32, 4)
    check()
    module.lora_B["default"].weight = nn.Parameter(torch.randn(32, 4))
    check()
    module.set_adapter("other")
    check()


def warned_error(record) -> float:
    """The max abs re-quantization error a merge / unmerge warning states."""
    return float(re.search(r"up to ([0-9.e+-]+) \(max abs\)", str(record[0].message)).group(1))


def test_nf4_merge_warns_with_the_requantization_error_and_unmerge_undoes_it_up_to_that():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 48), compute_dtype=torch.float32)
    module = LoRALinear(base, r=4)
    randomize_adapters(module)
    original = base.dequantize().float()
    exact = original + module._delta_weight("default")
    x = torch.randn(5, 64)
    with pytest.warns(UserWarning, match="re-quantized") as merge_warning:
        module.merge()
    assert isinstance(module.base_layer, Linear4bit) and module.base_layer.weight.dtype == torch.uint8
    merge_error = (base.dequantize().float() - exact).abs().max().item()
    assert warned_error(merge_warning) == pytest.approx(merge_error, rel=1e-2)
    assert 0 < merge_error <= exact.abs().max() / 7  # NF4's steps are at most about 1/7 of a block's absmax
    torch.testing.assert_close(
        module(x), x @ exact.t() + base.bias, rtol=0, atol=merge_error * x.abs().sum(-1).max().item()
    )
    with pytest.warns(UserWarning, match="re-quantized") as unmerge_warning:
        module.unmerge()
    # W + d + e1 - d + e2: two re-quantization errors, each within its warning's bound
    restored_error = (base.dequantize().float() - original).abs().max().item()
    assert restored_error <= 1.01 * (merge_error + warned_error(unmerge_warning))


# ---- LLM.int8 base ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_base_forward_and_grads_follow_linear8bitlt(dtype):
    torch.manual_seed(0)
    base = Linear8bitLt.from_linear(nn.Linear(64, 48), threshold=6.0)
    module = LoRALinear(base, r=4, lora_alpha=8)
    randomize_adapters(module)
    x = (torch.randn(2, 3, 64) * 3).to(dtype).requires_grad_()  # some |x| >= 6: the outlier path runs too
    y = module(x)
    assert y.dtype == dtype
    lora_A, lora_B = adapter_weights(module, "default")
    x_ref = x.detach().clone().requires_grad_()
    expected = lora_formula(x_ref, base, lora_A, lora_B, 2.0)
    torch.testing.assert_close(y, expected, **TOLERANCES[dtype])
    grad_y = torch.linspace(-1, 1, y.numel()).view(y.shape).to(dtype)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B), grad_y)
    expected_grads = torch.autograd.grad(expected, (x_ref, lora_A, lora_B), grad_y)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[dtype])


def test_int8_merge_warns_and_keeps_int8_codes():
    torch.manual_seed(0)
    base = Linear8bitLt.from_linear(nn.Linear(64, 48))
    module = LoRALinear(base, r=4)
    randomize_adapters(module)
    exact = base.dequantize() + module._delta_weight("default")
    with pytest.warns(UserWarning, match="re-quantized") as merge_warning:
        module.merge()
    assert module.base_layer.weight.dtype == torch.int8
    merge_error = (base.dequantize() - exact).abs().max().item()
    assert warned_error(merge_warning) == pytest.approx(merge_error, rel=1e-2)
    assert merge_error <= exact.abs().max().item() / 127


def test_add_lora_wraps_int8_layers():
    model = tiny_llama()
    pyfastpeft.quantize_model(model, "int8")
    report = pyfastpeft.add_lora(model, r=4)
    assert isinstance(model.model.layers[0].self_attn.v_proj.base_layer, Linear8bitLt) and len(report.wrapped) == 4
    ids = torch.randint(0, 128, (1, 8))
    model(ids).logits.sum().backward()
    assert model.model.layers[0].self_attn.v_proj.lora_A.default.weight.grad is not None


# ---- add_lora ------------------------------------------------------------------------------------------------


def test_add_lora_wraps_targets_freezes_the_rest_and_reports_counts():
    model = tiny_llama()
    report = pyfastpeft.add_lora(model, target_modules=("q_proj", "v_proj"), r=4, lora_alpha=8)
    assert report.wrapped == [f"model.layers.{i}.self_attn.{name}" for i in range(2) for name in ("q_proj", "v_proj")]
    assert all(isinstance(model.get_submodule(path), LoRALinear) for path in report.wrapped)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{path}.lora_{m}.default.weight" for path in report.wrapped for m in "AB"}
    # q_proj 64 -> 64, v_proj 64 -> 32 (2 kv heads of 16): r * (in + out) each
    assert report.trainable_params == 2 * 4 * ((64 + 64) + (64 + 32))
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert "trainable params 1,792" in str(report)


def test_add_lora_all_linear_skips_lm_head_and_a_second_adapter_joins_wrapped_layers():
    model = tiny_llama()
    report = pyfastpeft.add_lora(model, target_modules="all-linear")
    assert len(report.wrapped) == 2 * 7 and "lm_head" not in report.wrapped
    second = pyfastpeft.add_lora(model, target_modules=("q_proj",), adapter_name="second")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert second.wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert list(q_proj.lora_A) == ["default", "second"] and q_proj.active_adapter == "second"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{path}.lora_{m}.second.weight" for path in second.wrapped for m in "AB"
    }


def test_add_lora_with_no_match_names_the_linear_layers():
    with pytest.raises(ValueError, match=r"no linear layer matches.*'q_proj'.*'up_proj'"):
        pyfastpeft.add_lora(tiny_llama(), target_modules=("query",))


def test_add_lora_wraps_nf4_layers():
    model = tiny_llama()
    pyfastpeft.quantize_model(model, compute_dtype=torch.float32)
    report = pyfastpeft.add_lora(model, target_modules=("q_proj", "v_proj"))
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit) and len(report.wrapped) == 4
    ids = input_ids()
    reference = model(ids).logits  # B = 0: same logits as the quantized model alone
    randomize_adapters(model)
    assert not torch.allclose(model(ids).logits, reference)


# ---- PEFT interoperability -----------------------------------------------------------------------------------


def test_save_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = peft_module()
    base = tiny_llama()
    ours = copy.deepcopy(base)
    pyfastpeft.add_lora(ours, target_modules=("q_proj", "v_proj"), r=4, lora_alpha=8, use_rslora=True)
    ours.model.layers[1].self_attn.v_proj.add_adapter("tmp", r=2)  # another adapter stays out of the file
    randomize_adapters(ours)
    pyfastpeft.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["use_rslora"]
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 4 and config["bias"] == "none"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = input_ids()
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_save_adapter_writes_per_layer_ranks_as_rank_pattern(tmp_path):
    peft = peft_module()
    base = tiny_llama()
    ours = copy.deepcopy(base)
    pyfastpeft.add_lora(ours, target_modules=("q_proj",), r=4, lora_alpha=8)
    layer = ours.model.layers[1].self_attn
    layer.q_proj = LoRALinear(layer.q_proj.base_layer, r=2, lora_alpha=3)
    randomize_adapters(ours)
    pyfastpeft.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(config["rank_pattern"].values()) == [2] and list(config["alpha_pattern"].values()) == [3]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = input_ids()
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_adapter_reads_peft_save_pretrained_with_patterns(tmp_path):
    peft = peft_module()
    base = tiny_llama()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.v_proj": 2},
        alpha_pattern={"down_proj": 5},
        use_rslora=True,
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    loaded = pyfastpeft.load_adapter(ours, tmp_path)
    assert len(loaded) == 6
    v_proj = ours.model.layers[1].self_attn.v_proj
    assert v_proj.r["default"] == 2 and v_proj.scaling["default"] == 8 / math.sqrt(2)
    assert ours.model.layers[0].mlp.down_proj.scaling["default"] == 5 / 2
    ids = input_ids()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_adapter_round_trips_save_adapter_into_a_second_adapter(tmp_path):
    model = tiny_llama()
    pyfastpeft.add_lora(model, r=4)
    randomize_adapters(model)
    ids = input_ids()
    expected = model(ids).logits
    pyfastpeft.save_adapter(model, tmp_path)
    loaded = pyfastpeft.load_adapter(model, tmp_path, adapter_name="copy")
    for path in loaded:
        module = model.get_submodule(path)
        assert module.active_adapter == "default" and not module.lora_A["copy"].weight.requires_grad
        for table in (module.lora_A, module.lora_B):
            assert torch.equal(table["copy"].weight, table["default"].weight)
    fresh = tiny_llama()
    pyfastpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, expected)


def test_from_peft_converts_in_place_and_keeps_the_active_adapter():
    peft = peft_module()
    with pytest.raises(TypeError, match="peft_model must be a peft.PeftModel, got LlamaForCausalLM"):
        pyfastpeft.from_peft(tiny_llama())
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM")
    )
    theirs.add_adapter(
        "other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM")
    )
    randomize_adapters(theirs)
    theirs.set_adapter("other")
    ids = input_ids()
    expected = theirs(ids).logits
    peft_A = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A["other"].weight
    model = pyfastpeft.from_peft(theirs)
    assert isinstance(model, LlamaForCausalLM)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and q_proj.active_adapter == "other"
    assert q_proj.lora_A["other"].weight is peft_A and list(q_proj.lora_A) == ["default", "other"]
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_training_step_gives_peft_s_gradients():
    peft = peft_module()
    base = tiny_llama()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    randomize_adapters(theirs)
    ours = pyfastpeft.from_peft(copy.deepcopy(theirs))
    ids = input_ids()
    grads = []
    for model in (theirs, ours):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(
            {name.removeprefix("base_model.model."): p.grad for name, p in model.named_parameters() if p.requires_grad}
        )
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 3 * 2
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


# ---- compile -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_lora_linear_compiles_fullgraph(base):
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    if base == "nf4":
        layer = Linear4bit.from_linear(layer, compute_dtype=torch.float32)
    module = LoRALinear(layer, r=4, lora_dropout=0.1)
    randomize_adapters(module)
    x = torch.randn(3, 32)
    torch.manual_seed(1)
    expected = module(x)  # training mode: the dropout mask comes from the seed
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    y = compiled(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert module.lora_A["default"].weight.grad is not None


# ---- bad input -----------------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    module = LoRALinear(nn.Linear(8, 8), r=2)
    with pytest.raises(ValueError, match=r"unknown adapter 'missing'.*\['default'\]"):
        module.set_adapter("missing")
    with pytest.raises(ValueError, match="r must be >= 1, got 0"):
        LoRALinear(nn.Linear(8, 8), r=0)
    with pytest.raises(ValueError, match="already exists"):
        module.add_adapter("default")
    with pytest.raises(ValueError, match="only adapter"):
        module.delete_adapter("default")
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        module.add_adapter("other", lora_dropout=1.0)
    with pytest.raises(ValueError, match="adapter_name"):
        module.add_adapter("a.b")
    with pytest.raises(TypeError, match="base must be a .*got Conv1d"):
        LoRALinear(nn.Conv1d(8, 8, 1))
    quantized_linear = nn.Linear(8, 8)
    quantized_linear.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(TypeError, match="torch.uint8 weight"):
        LoRALinear(quantized_linear)
    with pytest.raises(TypeError, match="lora_linear: weight has dtype"):
        module(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="already a LoRALinear"):
        LoRALinear(module)
    module.disable_adapters()
    with pytest.raises(ValueError, match="adapters are disabled"):
        module.merge()


def test_bad_model_level_arguments_raise_clear_errors():
    model = tiny_llama()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        pyfastpeft.add_lora("model")
    with pytest.raises(ValueError, match="r must be >= 1, got 0"):
        pyfastpeft.add_lora(model, r=0)
    with pytest.raises(TypeError, match="target_modules must be"):
        pyfastpeft.add_lora(model, target_modules=[1])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    pyfastpeft.add_lora(model, target_modules=("q_proj",))
    model.model.layers[1].self_attn.q_proj.lora_dropout["default"] = 0.1
    with pytest.raises(ValueError, match=r"lora_dropout values \[0.0, 0.1\]"):
        pyfastpeft.save_adapter(model, "unused")


def test_adapter_files_are_checked_before_the_model_changes(tmp_path):
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match="not a directory"):
        pyfastpeft.load_adapter(model, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        pyfastpeft.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no LoRALinear layer has adapter 'default'"):
        pyfastpeft.save_adapter(model, tmp_path)

    source = tiny_llama()
    pyfastpeft.add_lora(source, r=4)
    pyfastpeft.save_adapter(source, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="adapter_config.json: 'peft_type' is 'IA3'"):
        pyfastpeft.load_adapter(model, tmp_path)
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"sets use_dora, and .* lack lora_magnitude_vector"):
        pyfastpeft.load_adapter(model, tmp_path)
    config_path.write_text(json.dumps(config))
    other = LlamaForCausalLM(LlamaConfig(**{**LLAMA_CONFIG, "num_hidden_layers": 1})).eval()
    with pytest.raises(ValueError, match=r"match no module.*model\.layers\.1\.self_attn\.q_proj"):
        pyfastpeft.load_adapter(other, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in other.modules())
    config_path.write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match=r"lora_A\.weight' is \(4, 64\), the config's r=3"):
        pyfastpeft.load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
