import contextlib
import copy
import functools
import pickle

import pytest
import torch
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.olmo2 import modeling_olmo2

import pyfastpeft
from pyfastpeft.integrations import transformers as integration
from pyfastpeft.nn import RMSNorm, SwiGLUMLP

SMALL = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).to(dtype)
    with torch.no_grad():  # trained-looking norms, so a wrong casting order would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def test_patched_llama_matches_unpatched_logits_loss_and_gradients():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 24))
    logits, loss, grads = forward_backward(model, ids)
    report = pyfastpeft.patch_model(model)
    assert len(report.rms_norm) == 5 and len(report.swiglu) == 2 and report.rope == [modeling_llama.__name__]
    assert not report.not_patched
    assert isinstance(model.model.norm, RMSNorm) and isinstance(model.model.layers[0].mlp, SwiGLUMLP)
    p_logits, p_loss, p_grads = forward_backward(model, ids)
    pyfastpeft.unpatch_model(model)
    torch.testing.assert_close(p_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_loss, loss, rtol=1e-6, atol=1e-6)
    assert p_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(p_grads[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_patched_llama_trains_like_unpatched():
    ids = torch.randint(0, 128, (4, 32))

    def losses(patch):
        model = tiny_llama()
        if patch:
            pyfastpeft.patch_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curve = []
        for _ in range(8):
            opt.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            curve.append(loss.item())
        if patch:
            pyfastpeft.unpatch_model(model)
        return curve

    ours, theirs = losses(True), losses(False)
    assert ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-4)


def test_patched_llama_bf16_logits_close():
    model = tiny_llama(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits.float()
        pyfastpeft.patch_model(model)
        ours = model(ids).logits.float()
        pyfastpeft.unpatch_model(model)
    # bf16 MLP: ours rounds silu(g)*u once where eager rounds twice; the difference stays at bf16 noise
    torch.testing.assert_close(ours, ref, rtol=5e-2, atol=5e-2)


def tiny_olmo2(dtype=torch.float32):
    torch.manual_seed(0)
    config = Olmo2Config(**SMALL, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    return Olmo2ForCausalLM(config).to(dtype).eval()


@contextlib.contextmanager
def counting_fused_rope(monkeypatch):
    calls = []
    fused = integration.fused_apply_rotary_pos_emb

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(integration, "fused_apply_rotary_pos_emb", counted)
    yield calls


def test_patch_shares_parameters_and_unpatch_restores_modules():
    model = tiny_llama()
    norm, mlp = model.model.norm, model.model.layers[0].mlp
    params_before = {n: p for n, p in model.named_parameters()}
    pyfastpeft.patch_model(model)
    assert {n: p for n, p in model.named_parameters()}.keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert model.model.layers[0].mlp.gate_proj is mlp.gate_proj
    pyfastpeft.unpatch_model(model)
    assert model.model.norm is norm and model.model.layers[0].mlp is mlp
    assert not isinstance(modeling_llama.apply_rotary_pos_emb, integration.FusedRope)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_olmo2], ids=["llama", "olmo2"])
def test_fused_rope_runs_in_every_attention_and_stops_after_unpatch(make_model, monkeypatch):
    """Llama's apply_rotary_pos_emb is wrapped by the hub-kernels decorator on transformers 5.x (a kernels Func
    module with a (*args, **kwargs) call); OLMo2's is a plain function. Both are recognised and replaced."""
    model = make_model()
    ids = torch.randint(0, 128, (1, 12))
    report = pyfastpeft.patch_model(model)
    assert report.rope == [type(model).__module__] and not report.not_patched
    with counting_fused_rope(monkeypatch) as calls:
        model(ids)
        assert len(calls) == 2  # one per layer
        pyfastpeft.unpatch_model(model)
        model(ids)
        assert len(calls) == 2


def test_fused_rope_survives_mode_switches_of_a_from_pretrained_model(tmp_path, monkeypatch):
    """from_pretrained turns hub kernels on when `kernels` is installed, and each train()/eval() then
    re-kernelizes the model: patch_model turns them off while patched (and unpatch_model back on), so the
    fused RoPE still runs after Trainer's model.train()."""
    tiny_llama().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    kernels_on = getattr(model, "use_kernels", False)
    ids = torch.randint(0, 128, (1, 12))
    expected = model(ids).logits
    report = pyfastpeft.patch_model(model)
    model.train()
    model.eval()
    with counting_fused_rope(monkeypatch) as calls:
        torch.testing.assert_close(model(ids).logits, expected)
        assert len(calls) == 2  # one per layer
    assert bool(report.notes) == kernels_on
    pyfastpeft.unpatch_model(model)
    assert getattr(model, "use_kernels", False) == kernels_on
    torch.testing.assert_close(model(ids).logits, expected)


def test_kernels_wrapped_rope_is_patched_per_model():
    """Where each attention holds a private copy of the kernels-wrapped function, only the patched model changes."""
    patched, other = tiny_llama(), tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    pyfastpeft.patch_model(patched)
    holders = [m for m in patched.modules() if m.__dict__.get("_kernel_funcs")]
    if not holders:
        pyfastpeft.unpatch_model(patched)
        pytest.skip("this transformers does not wrap apply_rotary_pos_emb in a kernels Func")
    wrapper = next(iter(holders[0]._kernel_funcs.values()))
    assert isinstance(wrapper.forward.__func__, integration._RopeForward)
    assert not any(
        isinstance(w.__dict__.get("forward"), type(wrapper.forward))
        for m in other.modules()
        for w in (m.__dict__.get("_kernel_funcs") or {}).values()
    )
    torch.testing.assert_close(patched(ids).logits, other(ids).logits, rtol=1e-5, atol=1e-5)
    pyfastpeft.unpatch_model(patched)
    assert "forward" not in wrapper.__dict__


def test_functools_wrapped_rope_is_recognised():
    original = modeling_olmo2.apply_rotary_pos_emb

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return original(*args, **kwargs)

    replacement, reason = integration._rope_replacement(wrapped)
    assert reason is None and replacement == integration._rope_replacement(original)[0]


def test_global_rope_patch_is_reference_counted_across_models():
    """A plain module-level function (OLMo2's here) is replaced for the whole process while any model uses it."""
    original = modeling_olmo2.apply_rotary_pos_emb
    a, b = tiny_olmo2(), tiny_olmo2()
    pyfastpeft.patch_model(a)
    pyfastpeft.patch_model(b)
    assert isinstance(modeling_olmo2.apply_rotary_pos_emb, integration.FusedRope)
    pyfastpeft.unpatch_model(a)
    assert modeling_olmo2.apply_rotary_pos_emb is not original  # b still uses it
    pyfastpeft.unpatch_model(b)
    assert modeling_olmo2.apply_rotary_pos_emb is original


def test_olmo2_bf16_rope_returns_hf_dtypes():
    """OLMo2 rotates bf16 q/k with fp32 cos/sin and casts back to bf16; Llama's keeps the fp32 promotion."""
    q, k = torch.randn(1, 4, 5, 16, dtype=torch.bfloat16), torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    cos, sin = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    for modeling in (modeling_olmo2, modeling_llama):
        replacement, reason = integration._rope_replacement(modeling.apply_rotary_pos_emb)
        assert reason is None
        got, expected = replacement(q, k, cos, sin), modeling.apply_rotary_pos_emb(q, k, cos, sin)
        assert [t.dtype for t in got] == [t.dtype for t in expected], modeling.__name__
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1.6e-2)


def test_patched_olmo2_bf16_runs_and_matches_and_other_olmo2_models_still_run():
    model, other = tiny_olmo2(torch.bfloat16), tiny_olmo2(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        reference = model(ids).logits.float()
        report = pyfastpeft.patch_model(model)
        assert report.rope == [modeling_olmo2.__name__]
        logits, other_logits = model(ids).logits, other(ids).logits  # other runs the replaced global unpatched
    pyfastpeft.unpatch_model(model)
    assert logits.dtype == other_logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(other_logits.float(), reference, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_olmo2], ids=["llama", "olmo2"])
def test_patched_model_pickles_and_the_copy_stays_patched(make_model, monkeypatch):
    model = make_model()
    ids = torch.randint(0, 128, (1, 12))
    pyfastpeft.patch_model(model)
    copy = pickle.loads(pickle.dumps(model))
    pyfastpeft.unpatch_model(model)
    expected = model(ids).logits
    with counting_fused_rope(monkeypatch) as calls:
        torch.testing.assert_close(copy(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2
    pyfastpeft.unpatch_model(copy)
    assert not isinstance(modeling_olmo2.apply_rotary_pos_emb, integration.FusedRope)


def test_a_deleted_patched_model_stops_holding_the_global_rope():
    import copy
    import gc

    original = modeling_olmo2.apply_rotary_pos_emb  # OLMo2's RoPE is replaced module-wide (Llama's per model)
    model = tiny_olmo2()
    pyfastpeft.patch_model(model)
    copied = copy.deepcopy(model)  # a second user of the same replacement
    assert isinstance(modeling_olmo2.apply_rotary_pos_emb, integration.FusedRope)
    del model
    gc.collect()
    assert isinstance(modeling_olmo2.apply_rotary_pos_emb, integration.FusedRope)
    del copied
    gc.collect()
    assert modeling_olmo2.apply_rotary_pos_emb is original


def test_patch_twice_is_an_error():
    model = tiny_llama()
    pyfastpeft.patch_model(model)
    with pytest.raises(RuntimeError, match="already patched"):
        pyfastpeft.patch_model(model)
    pyfastpeft.unpatch_model(model)
    with pytest.raises(RuntimeError, match="not patched"):
        pyfastpeft.unpatch_model(model)


@pytest.mark.parametrize("config_cls,model_cls", [(MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)])
def test_other_llama_family_architectures_patch_with_no_new_code(config_cls, model_cls):
    torch.manual_seed(0)
    model = model_cls(config_cls(**SMALL)).eval()
    ids = torch.randint(0, 128, (1, 12))
    ref = model(ids).logits
    report = pyfastpeft.patch_model(model)
    assert len(report.rms_norm) == 5 and len(report.swiglu) == 2 and len(report.rope) == 1
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    pyfastpeft.unpatch_model(model)


def test_gemma_norms_patched_in_gemma_mode_and_gelu_mlp_reported():
    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(**SMALL, head_dim=16)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    ids = torch.randint(0, 128, (1, 12))
    ref = model(ids).logits
    with pytest.warns(UserWarning, match="activation is not SiLU"):
        report = pyfastpeft.patch_model(model)
    assert len(report.rms_norm) == 5 and not report.swiglu
    assert all(m.casting_mode == "gemma" and m.offset == 1.0 for m in model.modules() if isinstance(m, RMSNorm))
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    pyfastpeft.unpatch_model(model)


def test_unknown_architecture_is_reported_not_silently_skipped():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU())
    with pytest.warns(UserWarning, match="no RMSNorm-like module"):
        report = pyfastpeft.patch_model(model)
    assert report.total == 0
    assert any("rope" in line for line in report.not_patched)
    pyfastpeft.unpatch_model(model)


def test_patch_model_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pyfastpeft.patch_model("llama")


# ---- attention ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def counting_attention(monkeypatch):
    calls = []
    fused = integration.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return fused(*args, **kwargs)

    monkeypatch.setattr(integration, "scaled_dot_product_attention", counted)
    yield calls


def test_attention_runs_where_sdpa_would_and_unpatch_gives_sdpa_back(monkeypatch):
    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 128, (2, 24))
    logits, loss, grads = forward_backward(model, ids)
    report = pyfastpeft.patch_model(model, rms_norm=False, swiglu=False, rope=False)
    assert report.attention == ["LlamaConfig"] and model.config._attn_implementation == integration.ATTENTION_NAME
    with counting_attention(monkeypatch) as calls:
        p_logits, p_loss, p_grads = forward_backward(model, ids)
        assert calls == [True, True]  # one causal call per layer
    torch.testing.assert_close(p_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_loss, loss, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(p_grads[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)
    pyfastpeft.unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"
    with counting_attention(monkeypatch) as calls:
        model(ids)
        assert calls == []


def test_attention_leaves_padding_masks_dropout_and_decoding_steps_to_what_sdpa_computes(monkeypatch):
    """A padded batch has a mask: sdpa runs it. Attention dropout in training: sdpa. generate's one-token steps over
    the cache: ours without the causal mask (sdpa's is_causal is off for one query); the tokens are the same."""
    model = tiny_llama().eval()
    reference = copy.deepcopy(model)
    ids = torch.randint(2, 128, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    pyfastpeft.patch_model(model, rms_norm=False, swiglu=False, rope=False)
    with counting_attention(monkeypatch) as calls:
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits, rtol=0, atol=0
        )
        assert calls == []
        generated = model.generate(ids[1:], max_new_tokens=4, do_sample=False)
        assert calls == [True, True] + [False, False] * 3
        torch.testing.assert_close(generated, reference.generate(ids[1:], max_new_tokens=4, do_sample=False))
    model.config.attention_dropout = reference.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    with counting_attention(monkeypatch) as calls:
        model(ids).logits.sum().backward()
        assert calls == []
    pyfastpeft.unpatch_model(model)


def test_attention_is_not_switched_from_an_implementation_the_user_chose(monkeypatch):
    model = LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation="eager"))
    with pytest.warns(UserWarning, match=r"attention: no config asks for sdpa \(found \['eager'\]\)"):
        report = pyfastpeft.patch_model(model)
    assert report.attention == [] and model.config._attn_implementation == "eager"
    with counting_attention(monkeypatch) as calls:
        model(torch.randint(0, 128, (1, 8)))
        assert calls == []
    pyfastpeft.unpatch_model(model)


def test_attention_under_bf16_autocast_matches_sdpa_over_an_fp32_model():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 24))
    pyfastpeft.patch_model(model, rms_norm=False, swiglu=False, rope=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(ids, labels=ids), reference(ids, labels=ids)
    ours.loss.backward()
    theirs.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=5e-3, atol=5e-3)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=3e-2 * scale, msg=name)
    pyfastpeft.unpatch_model(model)


def test_patched_attention_pickles(monkeypatch):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    pyfastpeft.patch_model(model, rms_norm=False, swiglu=False, rope=False)
    clone = pickle.loads(pickle.dumps(model))
    with counting_attention(monkeypatch) as calls:
        torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=0, atol=0)
        assert len(calls) == 4
    pyfastpeft.unpatch_model(clone)
    assert clone.config._attn_implementation == "sdpa" and model.config._attn_implementation != "sdpa"
    pyfastpeft.unpatch_model(model)
