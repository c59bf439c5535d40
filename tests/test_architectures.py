"""The fused causal-LM loss on architectures that change their logits or add losses: every model gets the loss
(and gradients) its own forward gives, or keeps its own forward, reported. Tiny models built from configs."""

import copy

import pytest
import torch
import transformers
from helpers import TINY_DECODER

import pyfastpeft
from pyfastpeft.integrations.prepare import FusedLossForward, install_fused_loss

SMALL = dict(TINY_DECODER, bos_token_id=None, eos_token_id=1, pad_token_id=0)

# (config, model, what sets it apart)
ARCHITECTURES = {
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=8.0)),  # logits / 8
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.0625)),  # logits * 0.0625
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, final_logit_softcapping=2.0)),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",  # + 0.02 * router aux loss
        dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            output_router_logits=True,
            router_aux_loss_coef=0.02,
        ),
    ),
}


def tiny(name):
    config_name, model_name, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**SMALL, **extra))


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("num_items", [None, 20], ids=["mean", "num_items_in_batch"])
def test_fused_loss_and_gradients_equal_the_models_own(name, num_items):
    model = tiny(name)
    reference = copy.deepcopy(model)
    assert install_fused_loss(model) is None
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 16), generator=generator)
    labels = ids.clone()
    labels[0, :5] = -100
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    torch.manual_seed(2)  # the same dropout / router jitter draws on both sides
    ours, our_grads = loss_and_grads(model, ids, labels, **extra)
    torch.manual_seed(2)
    theirs, their_grads = loss_and_grads(reference, ids, labels, **extra)
    assert ours.logits is None and type(ours) is type(theirs)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    if getattr(theirs, "aux_loss", None) is not None:
        torch.testing.assert_close(ours.aux_loss, theirs.aux_loss)
    assert our_grads.keys() == their_grads.keys()
    for key in their_grads:
        torch.testing.assert_close(our_grads[key], their_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_prepare_model_reports_the_fused_loss_on_a_scaled_architecture():
    report = pyfastpeft.prepare_model(tiny("granite"), quant=None, lora=False, patch=False)
    assert report.replaced["fused loss"] == 1


class DoubledLogitsLlama(transformers.LlamaForCausalLM):
    """A causal LM whose forward changes the logits in a way no config field says (remote code does this)."""

    def forward(self, *args, logits_to_keep=0, labels=None, **kwargs):
        out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
        logits = out.logits * 2
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def test_a_model_the_probe_cannot_prove_equal_keeps_its_own_loss_and_says_so():
    torch.manual_seed(0)
    model = DoubledLogitsLlama(transformers.LlamaConfig(**SMALL))
    reference = copy.deepcopy(model)
    report = pyfastpeft.prepare_model(model, quant=None, lora=False, patch=False)
    assert "fused loss" not in report.replaced
    assert any("own loss is kept" in reason for reason in report.not_patched)
    assert not isinstance(model.__dict__.get("forward"), FusedLossForward)
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss)


MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
}


def tiny_moe(name):
    config_name, model_name, extra = MOE[name]
    if not hasattr(transformers, model_name):
        pytest.skip(f"{model_name} is not in this transformers")
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**SMALL, **extra))


def stacked_experts(model) -> set[str]:
    return {
        path for path, module in model.named_modules() if any(p.dim() == 3 for p in module.parameters(recurse=False))
    }


def with_dequantized_weights(reference, quantized):
    """reference (a copy of the model before quantization) with every weight quantized holds replaced by its
    dequantized value: the dense model the quantized one must equal."""
    from pyfastpeft.nn import Linear4bit, QuantizedExperts

    with torch.no_grad():
        for path, module in quantized.named_modules():
            if isinstance(module, QuantizedExperts):
                dense = reference.get_submodule(path.removesuffix(".base_layer"))  # under a LoRAExperts
                for name in (module.up_name, "down_proj"):
                    weights = torch.stack([layer.dequantize() for layer in getattr(module, name)])
                    getattr(dense, name).copy_(weights.transpose(1, 2) if dense.is_transposed else weights)
            elif isinstance(module, Linear4bit) and not any(
                isinstance(m, QuantizedExperts) for m in _ancestors(quantized, path)
            ):
                reference.get_submodule(path.removesuffix(".base_layer")).weight.copy_(module.dequantize())
    return reference


def _ancestors(model, path):
    parts = path.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


@pytest.mark.parametrize("name", sorted(MOE))
def test_nf4_experts_equal_the_dense_model_of_their_dequantized_weights(name):
    """transformers 5.x keeps a MoE block's experts as 3-D parameters: quantize_model makes each expert's
    projections NF4 layers (QuantizedExperts), and the model computes what the dense model holding the
    dequantized weights computes: logits, loss and the gradients of everything that trains (router included)."""
    from pyfastpeft.nn import QuantizedExperts

    model = tiny_moe(name)
    stacked = stacked_experts(model)
    reference = copy.deepcopy(model)
    report = pyfastpeft.quantize_model(model, "nf4")
    assert set(report.experts) == stacked and not report.experts_left
    assert not stacked_experts(model)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert stacked  # older transformers build nn.Linear experts, quantized as any linear layer
    reference = with_dequantized_weights(reference, model)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ours, our_grads = loss_and_grads(model, ids, ids)
    theirs, their_grads = loss_and_grads(reference, ids, ids)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    for key, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    assert all(not p.requires_grad for m in model.modules() if isinstance(m, QuantizedExperts) for p in m.parameters())
    from pyfastpeft.integrations.quantize import model_bytes

    for path in stacked:  # fp32 experts -> 4 bits, absmax per 64 and per-layer tables: 4x fewer bytes at this size
        assert model_bytes(model.get_submodule(path)) < model_bytes(reference.get_submodule(path)) / 3.5


def test_int8_experts_run_close_to_the_dense_model():
    model = tiny_moe("mixtral")
    reference = copy.deepcopy(model)
    report = pyfastpeft.quantize_model(model, "int8")
    assert len(report.experts) == len(stacked_experts(reference))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


def synthetic_experts(transposed_with_bias: bool, experts_count: int = 4, hidden: int = 16, inner: int = 24):
    """(a transformers experts block built by its use_experts_implementation decorator, seeded, with
    expert-parallel sentinels on, (experts, hidden, inner)): [E, out, in] weights, or transposed [E, in, out] ones
    with biases."""
    moe = pytest.importorskip("transformers.integrations.moe", reason="transformers < 5 has no 3-D experts")

    @moe.use_experts_implementation(is_transposed=transposed_with_bias, has_bias=transposed_with_bias)
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = experts_count
            shapes = [(2 * inner, hidden), (hidden, inner)]
            if transposed_with_bias:
                shapes = [(b, a) for a, b in shapes]
            self.gate_up_proj = torch.nn.Parameter(torch.randn(experts_count, *shapes[0]) * 0.2)
            self.down_proj = torch.nn.Parameter(torch.randn(experts_count, *shapes[1]) * 0.2)
            if transposed_with_bias:
                self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(experts_count, 2 * inner))
                self.down_proj_bias = torch.nn.Parameter(torch.randn(experts_count, hidden))
            self.act_fn = torch.nn.SiLU()

    torch.manual_seed(0)
    experts = Experts(transformers.PretrainedConfig())
    experts._is_expert_parallel = True  # the batched reference then masks the sentinel pairs
    return experts, (experts_count, hidden, inner)


@pytest.mark.parametrize("transposed_with_bias", [False, True], ids=["mixtral-layout", "transposed-with-bias"])
def test_quantized_experts_keep_transformers_experts_contract(transposed_with_bias):
    """With each expert kept dense (an identity `quantize`), QuantizedExperts computes what transformers' own
    batched experts implementation computes, for [E, out, in] and transposed [E, in, out] weights with biases,
    and expert-parallel sentinel ids (== num_experts) add nothing."""
    moe = pytest.importorskip("transformers.integrations.moe", reason="transformers < 5 has no 3-D experts")
    from pyfastpeft.nn import QuantizedExperts

    experts, (experts_count, hidden, _) = synthetic_experts(transposed_with_bias)
    ours = QuantizedExperts(experts, quantize=lambda linear: linear)
    x = torch.randn(7, hidden, requires_grad=True)
    index = torch.randint(0, experts_count, (7, 2))
    index[2, 1] = experts_count  # a sentinel
    weights = torch.rand(7, 2)
    expected = moe.batched_mm_experts_forward(experts, x, index, weights)
    torch.testing.assert_close(ours(x, index, weights), expected, rtol=1e-5, atol=1e-5)
