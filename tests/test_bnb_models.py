"""Models loaded through bitsandbytes (transformers' BitsAndBytesConfig, load_in_4bit / load_in_8bit): their
Linear4bit / Linear8bitLt layers convert to pyfastpeft's without dequantizing (the same bytes, the same state dict),
compute what bitsandbytes computes, and prepare_model / from_peft take such models as they come.

bitsandbytes' CPU backend is the oracle here. Two of its CPU paths are avoided on purpose:
- its native CPU 4-bit dequantization is wrong when in_features is not a multiple of the blocksize (its kernel
  assumes blocks inside rows; its own pure-PyTorch backend and ours agree), so layers here have in_features a
  multiple of 64, and the tiny Llama an intermediate size of 128;
- on a CPU with AVX512-BF16 an inference call (eval mode, no gradient) repacks a 4-bit layer for a bf16 kernel,
  rounding its absmax to bf16: reference outputs are taken in training mode, where bitsandbytes computes in the
  layer's compute dtype; the repacked case has its own test.
"""

import pytest
import torch
from torch import nn

import pyfastpeft
from pyfastpeft.integrations.bitsandbytes import (
    check_bitsandbytes_modules,
    convert_bitsandbytes_modules,
    from_bitsandbytes,
)
from pyfastpeft.nn import Linear4bit, Linear8bitLt, LoRALinear

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

IN_FEATURES, OUT_FEATURES = 128, 40


@pytest.fixture(autouse=True)
def _quiet_bitsandbytes(caplog):
    caplog.set_level("ERROR")  # bitsandbytes logs a warning per 8-bit call in fp32 ("cast ... to float16")


def bnb_linear4bit(quant_type, double_quant, dtype=torch.float32, bias=True, out_features=OUT_FEATURES, **kwargs):
    dense = nn.Linear(IN_FEATURES, out_features, bias=bias).to(dtype)
    layer = bnb.nn.Linear4bit(
        IN_FEATURES,
        out_features,
        bias=bias,
        compute_dtype=dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        **kwargs,
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu").train()  # bitsandbytes quantizes on the move to a device


def bnb_linear8bit(threshold, bias=True, has_fp16_weights=False):
    dense = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias).half()
    layer = bnb.nn.Linear8bitLt(
        IN_FEATURES, OUT_FEATURES, bias=bias, has_fp16_weights=has_fp16_weights, threshold=threshold
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")


def assert_same_state_dict(ours, theirs):
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


# ---- one layer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_converts_to_the_same_bytes_and_output(quant_type, double_quant, dtype):
    layer = bnb_linear4bit(quant_type, double_quant, dtype)
    ours = from_bitsandbytes(layer, "proj")

    assert isinstance(ours, Linear4bit)
    assert (ours.quant_type, ours.double_quant, ours.compute_dtype) == (quant_type, double_quant, dtype)
    assert ours.weight.data_ptr() == layer.weight.data_ptr()  # the very bytes, not a copy
    assert ours.bias is layer.bias
    assert_same_state_dict(ours.state_dict(), layer.state_dict())
    x = torch.randn(3, 5, IN_FEATURES, dtype=dtype)
    expected = layer(x)
    got = ours(x)
    assert got.dtype == expected.dtype
    # fp32: the same dequantized weight and one fp32 GEMM each: equal to rounding (1e-6). bf16: bitsandbytes
    # multiplies in bf16 after dequantizing to bf16, ours accumulates in fp32: one bf16 ulp (2^-7 relative).
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_linear8bitlt_converts_to_the_same_bytes_and_output(threshold):
    layer = bnb_linear8bit(threshold)
    ours = from_bitsandbytes(layer, "proj")

    assert isinstance(ours, Linear8bitLt) and ours.threshold == threshold
    assert ours.weight.data_ptr() == layer.weight.data_ptr()
    assert_same_state_dict(ours.state_dict(), layer.state_dict())
    x = torch.randn(3, 5, IN_FEATURES, dtype=torch.float16)
    x[..., 7] *= 10  # an outlier column above the threshold
    layer.eval()
    with torch.no_grad():
        expected = layer(x)  # LLM.int8: int8 rows of x, int32 products, 16-bit outlier columns
        got = ours(x)
    # fp16 in, fp16 out, the same int8 codes on both sides: the products agree to 2 fp16 ulps of the output
    # scale (bitsandbytes rounds its scaled product through fp16 before adding the bias and outliers).
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    # bitsandbytes' first forward moves SCB from the weight to its state: a later conversion still finds it
    assert layer.weight.SCB is None
    assert_same_state_dict(from_bitsandbytes(layer, "proj").state_dict(), layer.state_dict())


def test_linear8bitlt_fp32_input_matches_bitsandbytes_within_its_fp16_rounding():
    layer = bnb_linear8bit(6.0).eval()
    ours = from_bitsandbytes(layer, "proj")
    x = torch.randn(4, IN_FEATURES)
    with torch.no_grad():
        expected, got = layer(x), ours(x)
        exact = nn.functional.linear(x, ours.dequantize(), layer.bias.float())
    # bitsandbytes quantizes fp32 x through fp16, ours from fp32 (DESIGN: no fp16 detour); both carry the int8
    # rounding of x (about 0.07 here against the dense product), and differ from each other far less.
    assert (got - expected).abs().max() < 2e-2
    assert (got - exact).abs().max() < 0.1


@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_repacked_for_the_cpu_kernel_converts_as_bitsandbytes_saves_it(double_quant):
    layer = bnb_linear4bit("nf4", double_quant, out_features=64).eval()  # its repacking needs out % 32 == 0
    x = torch.randn(4, IN_FEATURES)
    with torch.no_grad():
        layer(x)
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit layers only on CPUs with AVX512-BF16")

    ours = from_bitsandbytes(layer, "proj")
    assert layer.weight.quant_state.packing_format_for_cpu  # the bitsandbytes layer is left as it was
    theirs = layer.state_dict()  # bitsandbytes' own inverse of the repacking
    if not double_quant:  # which leaves a plain absmax in its kernel's layout: [in / blocksize, out] bf16
        theirs["weight.absmax"] = theirs["weight.absmax"].t().reshape(-1).float()
    assert_same_state_dict(ours.state_dict(), theirs)
    state = bnb.functional.QuantState.from_dict(
        {key[len("weight.") :]: value for key, value in theirs.items() if key.startswith("weight.")}, device="cpu"
    )
    weight = bnb.functional.dequantize_4bit(theirs["weight"], state)  # what bitsandbytes now holds, dense
    torch.testing.assert_close(ours(x), nn.functional.linear(x, weight, theirs["bias"]), rtol=1e-6, atol=1e-6)


def test_unconvertible_layers_raise_naming_the_module_and_why():
    model = nn.Sequential(bnb_linear4bit("nf4", True), nn.Linear(IN_FEATURES, IN_FEATURES))
    model.append(bnb.nn.Linear4bit(IN_FEATURES, OUT_FEATURES, quant_type="nf4"))  # never moved: not quantized
    with pytest.raises(
        ValueError, match=r"2 \(bitsandbytes\.nn\.modules\.Linear4bit\) cannot convert: .*not quantized"
    ):
        convert_bitsandbytes_modules(model)
    assert type(model[0]) is bnb.nn.Linear4bit  # nothing was replaced, the convertible layer neither

    fp16_weights = nn.ModuleDict({"down": bnb_linear8bit(6.0, has_fp16_weights=True)})
    with pytest.raises(ValueError, match="down .* has_fp16_weights=True"):
        convert_bitsandbytes_modules(fp16_weights)
    not_quantized = nn.ModuleDict({"up": bnb.nn.Linear4bit(IN_FEATURES, OUT_FEATURES, quant_type="nf4")})
    with pytest.raises(ValueError, match="up .* not quantized yet"):
        check_bitsandbytes_modules(not_quantized)

    class OwnForward(bnb.nn.Linear8bitLt):
        pass

    subclass = nn.ModuleDict({"o": OwnForward(IN_FEATURES, OUT_FEATURES, has_fp16_weights=False).to("cpu")})
    with pytest.raises(ValueError, match="o .* subclasses a bitsandbytes layer"):
        convert_bitsandbytes_modules(subclass)
    with pytest.raises(TypeError, match="must be a bitsandbytes"):
        from_bitsandbytes(nn.Linear(4, 4))


# ---- models loaded with BitsAndBytesConfig ------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    directory = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def load(directory, **quantization):
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**quantization)
    # fp32 for what is not quantized: transformers 4.x loads a bitsandbytes model in fp16 unless told
    dtype = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    try:
        return AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu", **dtype)
    except RuntimeError as exc:  # older transformers load bitsandbytes models on accelerators only
        if "are supported by the bitsandbytes version" in str(exc):
            pytest.skip(f"this transformers release cannot load a bitsandbytes model on the CPU ({exc})")
        raise


LOAD_IN_4BIT = dict(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
)


@pytest.fixture
def prepared():
    models = []
    yield models
    for model in models:
        pyfastpeft.unpatch_model(model)  # the module-level RoPE patch_model swapped


def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 128, (2, 12), generator=generator)
    return input_ids, input_ids.clone()


def test_prepare_model_adapts_a_4bit_loaded_llama_without_requantizing(llama_checkpoint, prepared):
    model = load(llama_checkpoint, **LOAD_IN_4BIT)  # in eval mode, as from_pretrained leaves it
    input_ids, labels = batch()
    # the embeddings require grad, so bitsandbytes computes in its compute dtype, not its bf16 CPU kernel
    expected = model(input_ids, labels=labels).loss.detach()
    storage = {
        path: module.weight.data_ptr()
        for path, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    assert len(storage) == 14  # 7 projections x 2 layers; lm_head stays dense
    assert not any(
        getattr(model.get_submodule(path).weight.quant_state, "packing_format_for_cpu", False) for path in storage
    )

    report = pyfastpeft.prepare_model(model, quant="nf4", lora=pyfastpeft.LoraSettings(r=4, lora_alpha=8))
    prepared.append(model)

    assert report.replaced["bitsandbytes"] == 14 and report.replaced["nf4"] == 0 and report.replaced["lora"] == 14
    assert "14 bitsandbytes" in str(report)
    for path, pointer in storage.items():
        layer = model.get_submodule(path)
        assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Linear4bit)
        assert layer.base_layer.weight.data_ptr() == pointer  # the loaded bytes, not requantized
    loss = model(input_ids, labels=labels).loss  # B = 0: the adapters add nothing yet
    # fp32 throughout: the same dequantized weights; fused RMSNorm / SwiGLU / RoPE against transformers' own
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(".lora_A." in key or ".lora_B." in key for key in changed)
    assert any(".lora_B." in key for key in changed)  # B moved off zero: the adapters train


def test_prepare_model_adapts_an_8bit_loaded_llama(llama_checkpoint, prepared):
    model = load(llama_checkpoint, load_in_8bit=True)
    input_ids, labels = batch()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids, labels=labels).loss  # LLM.int8, x through fp16
    report = pyfastpeft.prepare_model(model, quant="int8")
    prepared.append(model)

    assert report.replaced["bitsandbytes"] == 14 and report.replaced["int8"] == 0
    assert all(
        isinstance(module.base_layer, Linear8bitLt) for module in model.modules() if isinstance(module, LoRALinear)
    )
    model.eval()
    with torch.no_grad():
        got = model(input_ids, labels=labels).loss
    # the same int8 codes; x quantized from fp32 here, from fp16 in bitsandbytes: the losses agree to 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_prepare_model_refuses_an_unconvertible_bnb_model_before_changing_it(llama_checkpoint):
    model = load(llama_checkpoint, load_in_4bit=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    model.model.layers[1].self_attn.q_proj = bnb.nn.Linear4bit(q_proj.in_features, q_proj.out_features)  # unquantized
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj .* not quantized"):
        pyfastpeft.prepare_model(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.model.layers[0].self_attn.q_proj is q_proj


def test_a_model_loaded_with_a_quant_storage_prepares_to_the_same_logits(llama_checkpoint):
    """bnb_4bit_quant_storage=torch.bfloat16 (FSDP1's QLoRA recipe) stores the same bytes as uint8: prepared, both
    give the same logits."""
    input_ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for storage in (torch.uint8, torch.bfloat16):
        model = load(llama_checkpoint, load_in_4bit=True, bnb_4bit_quant_storage=storage)
        pyfastpeft.prepare_model(model, lora=False)
        with torch.no_grad():
            logits.append(model(input_ids).logits)
        pyfastpeft.unpatch_model(model)
    assert torch.equal(logits[0], logits[1])


def test_from_peft_converts_a_qlora_model_with_the_same_logits(llama_checkpoint):
    peft = pytest.importorskip("peft")
    model = load(llama_checkpoint, **LOAD_IN_4BIT)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )  # B != 0, so the adapters count in the logits
    peft_model = peft.get_peft_model(model, config)
    peft_model.train()
    input_ids, _ = batch()
    with torch.no_grad():
        expected = peft_model(input_ids).logits

    converted = pyfastpeft.from_peft(peft_model)
    layers = [module for module in converted.modules() if isinstance(module, LoRALinear)]
    assert len(layers) == 6 and all(isinstance(layer.base_layer, Linear4bit) for layer in layers)
    with torch.no_grad():
        got = converted(input_ids).logits
    # fp32, the same dequantized weights and adapters; PEFT adds x A^T B^T to the base output as LoRALinear does
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # the layers PEFT did not adapt are still bitsandbytes': prepare_model converts them, keeping the adapters
    assert sum(isinstance(module, bnb.nn.Linear4bit) for module in converted.modules()) == 14 - 6
    report = pyfastpeft.prepare_model(converted, quant=None, lora=False, patch=False, fused_loss=False)
    assert report.replaced["bitsandbytes"] == 14 - 6
    assert not any(isinstance(module, bnb.nn.Linear4bit) for module in converted.modules())
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_from_peft_converts_a_qlora_dora_model_with_the_same_logits_and_gradients(llama_checkpoint):
    """QLoRA + DoRA (use_dora over load_in_4bit): PEFT dequantizes the 4-bit weight for its norm every forward;
    ours reads the same NF4 bytes a tile of rows at a time."""
    peft = pytest.importorskip("peft")
    model = load(llama_checkpoint, **LOAD_IN_4BIT)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, use_dora=True
    )
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.linspace(0.5, 1.5, parameter.numel()))
    peft_model.train()
    input_ids, labels = batch()
    results = []
    for convert in (False, True):
        if convert:
            pyfastpeft.from_peft(peft_model)
        peft_model.zero_grad()
        out = peft_model(input_ids=input_ids, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    layers = [module for module in peft_model.modules() if isinstance(module, LoRALinear)]
    assert len(layers) == 6 and all(isinstance(layer.base_layer, Linear4bit) for layer in layers)
    assert all(layer.use_dora["default"] for layer in layers)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert sorted(results[1][1]) == sorted(results[0][1])
    for name, want in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float16, torch.float32])
def test_linear4bit_with_a_quant_storage_converts_and_loads(quant_storage):
    """bitsandbytes' quant_storage packs the same bytes under another dtype (FSDP1's QLoRA recipe): the layer converts
    over those very bytes, and its state dict loads into ours."""
    layer = bnb_linear4bit("nf4", True, quant_storage=quant_storage)
    assert layer.weight.dtype == quant_storage
    ours = from_bitsandbytes(layer, "proj")
    assert ours.weight.dtype == torch.uint8 and ours.weight.data_ptr() == layer.weight.data_ptr()
    x = torch.randn(3, IN_FEATURES)
    expected = layer(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)

    loaded = Linear4bit(IN_FEATURES, OUT_FEATURES, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    loaded.load_state_dict(layer.state_dict())
    torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-6)
