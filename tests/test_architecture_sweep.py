"""Every causal LM the installed transformers ships, built tiny from its config: where patch_model replaces
anything, the patched model gives the logits, loss, gradients and greedy tokens of the model's own forward;
where it replaces nothing, the report says why. Then prepare_model (LoRA on all linears, patched blocks, fused
loss) against transformers + PEFT with the same adapters, on the decoder families users fine-tune.

A model whose tiny config does not build, or whose own forward fails on it, is skipped with the reason: the
sweep tests our patching, not transformers' configs."""

import copy
import resource
import warnings

import pytest
import torch
import transformers
from helpers import TINY_DECODER
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import pyfastpeft

SMALL = dict(
    TINY_DECODER,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # MoE configs under their several names: 4 small experts, 2 per token
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)
MAX_PARAMETERS = 5_000_000  # configs that ignore SMALL (nested text configs, fixed vocabularies) are skipped


@pytest.fixture(autouse=True)
def memory_ceiling():
    """Some tiny configs still make their own forward allocate tens of GiB (a Mamba scan at its default chunk
    and state sizes): cap the address space a few GiB above what the process holds, so such a model raises
    (and is skipped) instead of taking the host down."""
    try:
        with open("/proc/self/statm") as statm:
            held = int(statm.read().split()[0]) * resource.getpagesize()
    except OSError:  # no /proc (not Linux): run without the ceiling
        yield
        return
    previous = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (held + (6 << 30), previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, previous)


def _build(model_type, extra=None):
    config_name, model_name = CONFIG_MAPPING_NAMES.get(model_type), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    if not (hasattr(transformers, config_name or "") and hasattr(transformers, model_name)):
        pytest.skip(f"{model_type}: no public config/model class")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = getattr(transformers, config_name)(**{**SMALL, **(extra or {})})
            if getattr(config, "is_encoder_decoder", False):
                pytest.skip(f"{model_type}: encoder-decoder")
            with torch.device("meta"):
                size = sum(p.numel() for p in getattr(transformers, model_name)(config).parameters())
            if size > MAX_PARAMETERS:
                pytest.skip(f"{model_type}: {size} parameters with the tiny config")
            torch.manual_seed(0)
            return getattr(transformers, model_name)(config).eval()
        except pytest.skip.Exception:
            raise
        except Exception as error:  # noqa: BLE001 - any config failure is transformers', not ours
            pytest.skip(f"{model_type}: the tiny config does not build ({type(error).__name__}: {error})")


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 100, (2, 12), generator=generator)


def _loss_and_grads(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, **kwargs)
    out.loss.backward()
    grads = {
        name.removeprefix("base_model.model."): p.grad for name, p in model.named_parameters() if p.grad is not None
    }
    return out, grads


def assert_same_greedy_tokens(model, reference, prompt, new_tokens=6):
    """Greedy generation (KV cache, RoPE at growing offsets) gives the reference's tokens. Where they part, the
    reference's own logits at that step must tie within fp32 noise: a near-tie is not a defect of ours."""
    if not hasattr(reference, "generate"):
        return  # a model class without GenerationMixin (deprecated ones in transformers 4.x)
    with torch.no_grad():
        try:
            theirs = reference.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        except Exception:  # noqa: BLE001 - its own generate fails on the tiny config: nothing to compare
            return
        ours = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if torch.equal(ours, theirs):
            return
        step = int((ours != theirs).nonzero()[0, 1])
        logits = reference(input_ids=ours[:, :step]).logits[0, -1]
    gap = (logits.max() - logits[ours[0, step]]).item()
    assert gap <= 1e-5 * logits.abs().max().item(), f"tokens part at {step} with a logit gap of {gap}"


def assert_same_loss_gradients_and_tokens(model, reference, ids, ours, theirs):
    """The loss to 1e-5, every gradient to 1e-4 of its largest element, and the greedy tokens."""
    (ours, our_grads), (theirs, their_grads) = ours, theirs
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        bound = 1e-4 * grad.abs().max().item() + 1e-6
        torch.testing.assert_close(our_grads[name], grad, rtol=0, atol=bound, msg=name)
    assert_same_greedy_tokens(model, reference, ids[:1, :6])


def _swept_types():
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", _swept_types())
def test_patched_causal_lm_matches_its_own_forward(model_type):
    model = _build(model_type)
    ids = _inputs()
    reference = copy.deepcopy(model)  # before any forward: some models keep graph tensors as attributes
    try:
        theirs, their_grads = _loss_and_grads(reference, ids)
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"{model_type}: its own forward fails on the tiny config ({type(error).__name__})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # patch_model warns its report
        report = pyfastpeft.patch_model(model)
    if report.total == 0:
        assert report.not_patched, "a model with nothing replaced must say why"
        return
    ours, our_grads = _loss_and_grads(model, ids)
    scale = theirs.logits.abs().max().item()
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5 * scale + 1e-6)
    assert_same_loss_gradients_and_tokens(model, reference, ids, (ours, our_grads), (theirs, their_grads))


# The families users fine-tune (dense, MoE, scaled or soft-capped logits), with what sets each apart.
FINE_TUNED = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {},
    "phi3": {},
    "olmo2": {},
    "olmo3": {},
    "smollm3": {},
    "exaone4": {},
    "seed_oss": {},
    "starcoder2": {},
    "granite": dict(logits_scaling=8.0),
    "cohere": dict(logit_scale=0.0625),
    "mixtral": {},
    "qwen2_moe": {},
    "qwen3_moe": {},
}


@pytest.mark.parametrize("model_type", sorted(FINE_TUNED))
def test_prepared_model_equals_transformers_and_peft(model_type):
    pytest.importorskip("peft")
    from real_stack_helpers import LORA, in_peft_names, load_adapters, peft_reference, peft_twin

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"{model_type} is not in this transformers")
    base = _build(model_type, FINE_TUNED[model_type])
    model = copy.deepcopy(base)
    report = pyfastpeft.prepare_model(model, quant=None, lora=LORA)
    # PEFT's all-linear; on a transformers 5.x MoE model, PEFT holding what we adapt (linear layers, 3-D experts and
    # routers: PEFT's all-linear adapts those on some MoE models only, test_architectures.py compares the two)
    moe = any(p.dim() == 3 for p in base.parameters())
    reference, adapters = peft_twin(base, model) if moe else peft_reference(base)
    load_adapters(model, adapters)
    assert report.replaced["lora"] > 0 and report.replaced["fused loss"] == 1
    model.eval(), reference.eval()
    ids = _inputs()
    ours, our_grads = _loss_and_grads(model, ids)
    theirs, their_grads = _loss_and_grads(reference, ids)
    our_grads = in_peft_names(model, our_grads)
    assert_same_loss_gradients_and_tokens(model, reference, ids, (ours, our_grads), (theirs, their_grads))
