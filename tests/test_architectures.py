"""The fused causal-LM loss on architectures that change their logits or add losses: every model gets the loss
(and gradients) its own forward gives, or keeps its own forward, reported. Tiny models built from configs."""
import copy

import pytest
import torch
import transformers

import pyfastpeft
from pyfastpeft.integrations.prepare import FusedLossForward, install_fused_loss

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, bos_token_id=None, eos_token_id=1, pad_token_id=0)

# (config, model, what sets it apart)
ARCHITECTURES = {
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=8.0)),  # logits / 8
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.0625)),  # logits * 0.0625
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, final_logit_softcapping=2.0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",  # + 0.02 * router aux loss
                dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, output_router_logits=True, router_aux_loss_coef=0.02)),
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


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_experts_the_report_does_not_cover_are_named(name):
    """transformers 5.x keeps a MoE block's experts as 3-D parameters, not nn.Linear modules: prepare_model
    leaves them dense and frozen and says so per module (older transformers' nn.Linear experts are adapted)."""
    model = tiny(name)
    report = pyfastpeft.prepare_model(model, quant="nf4")
    stacked = {path for path, module in model.named_modules()
               if any(p.dim() == 3 for p in module.parameters(recurse=False))}
    named = {line.split(" ")[0] for line in report.not_patched if "expert weights" in line}
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert stacked  # fused experts on transformers 5.x
    assert named == stacked
    assert all(not p.requires_grad for path, module in model.named_modules() if path in stacked
               for p in module.parameters(recurse=False))
