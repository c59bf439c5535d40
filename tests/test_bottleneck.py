"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020) against the paper's formula written eagerly:
outputs and gradients over activations, dtypes and backends, fp64 gradcheck, opcheck, torch.compile; the modules
start as the identity, train alone or beside (Q)LoRA, and reload from their documented state-dict keys; bad
arguments are refused before the model changes."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_DECODER, tiny_llama, train_steps

import pyfastpeft
from pyfastpeft.backend import use_backend
from pyfastpeft.functional import bottleneck_adapter
from pyfastpeft.nn import AdapterLayer

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def parameters(d, r, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((r, d), (r,), (d, r), (d,))
    return [
        (torch.randn(shape, generator=generator, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
        for shape in shapes
    ]


def eager(x, down_weight, down_bias, up_weight, up_bias, scaling, activation):
    """The paper's adapter in fp64: x + s * (act(x W_d^T + b_d) W_u^T + b_u)."""
    c = torch.float64
    h = F.linear(x.to(c), down_weight.to(c), down_bias.to(c))
    return x.to(c) + scaling * F.linear(ACTIVATIONS[activation](h), up_weight.to(c), up_bias.to(c))


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_bottleneck_adapter_matches_the_papers_formula(backend, dtype, activation):
    x = (torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).to(dtype)
    x.requires_grad_()
    params = parameters(40, 5, dtype)
    with use_backend(backend):
        y = bottleneck_adapter(x, *params, scaling=0.8, activation=activation)
    want = eager(x, *params, 0.8, activation)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with use_backend(backend):
        grads = torch.autograd.grad(y, [x, *params], dy.to(dtype))
    want_grads = torch.autograd.grad(want, [x, *params], dy)
    assert y.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), want, **tol)
    for got, expected in zip(grads, want_grads):
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got.double() / scale, expected.double() / scale, **tol)


def test_triton_backend_under_the_interpreter_equals_the_reference():
    x = torch.randn(2, 6, 32, requires_grad=True)
    params = parameters(32, 4, torch.float32)
    results = []
    for backend in ("reference", "triton"):
        with use_backend(backend):
            y = bottleneck_adapter(x, *params, activation="silu")
            results.append((y, *torch.autograd.grad(y.sum(), [x, *params])))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_gradcheck_fp64(backend):
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = parameters(6, 3, torch.float64)
    for activation in ACTIVATIONS:
        with use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda *args, a=activation: bottleneck_adapter(*args, scaling=1.3, activation=a), (x, *params)
            )


def test_opcheck_and_compile():
    x = torch.randn(4, 8)
    down_weight, down_bias, up_weight, up_bias = (p.detach() for p in parameters(8, 2, torch.float32))
    y, h = torch.ops.pyfastpeft.bottleneck_forward(x, down_weight, down_bias, up_weight, up_bias, 1.0, 2)
    for backend in ("reference", "native"):
        with use_backend(backend):
            torch.library.opcheck(
                torch.ops.pyfastpeft.bottleneck_forward, (x, down_weight, down_bias, up_weight, up_bias, 1.0, 2)
            )
            torch.library.opcheck(
                torch.ops.pyfastpeft.bottleneck_backward,
                (torch.randn(4, 8), x, down_weight, up_weight, h, 1.0, 2, True),
            )
    compiled = torch.compile(
        lambda t: bottleneck_adapter(t, down_weight, down_bias, up_weight, up_bias, 0.5, "gelu"),
        fullgraph=True,
        backend="aot_eager",
    )
    torch.testing.assert_close(
        compiled(x), bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, 0.5, "gelu")
    )


def gemma_tiny():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    return GemmaForCausalLM(GemmaConfig(**TINY_DECODER, head_dim=16)).eval()


MODELS = {"llama": tiny_llama, "gemma": gemma_tiny}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("placement, count", [("houlsby", 4), ("pfeiffer", 2)])
def test_adapters_start_as_the_identity_train_and_reload_from_their_keys(name, placement, count):
    model = MODELS[name]()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    report = pyfastpeft.add_adapters(
        model, reduction_factor=8, placement=placement, activation="silu", train_norms=True
    )
    assert len(report.wrapped) == count and report.norms
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapters.default.adapter_" in n or "norm" in n for n in trainable)
    key = "model.layers.0.mlp.down_proj.adapters.default.adapter_down.0.weight"
    assert model.state_dict()[key].shape == (64 // 8, 64)
    losses = train_steps(model, ids, 10, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fresh = MODELS[name]()
    pyfastpeft.add_adapters(fresh, reduction_factor=8, placement=placement, activation="silu", train_norms=True)
    missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert not unexpected
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_prepare_model_puts_adapters_beside_qlora_and_reports_them():
    model = tiny_llama()
    settings = pyfastpeft.AdapterSettings(reduction_factor=16, placement="houlsby")
    report = pyfastpeft.prepare_model(model, quant="nf4", lora=pyfastpeft.LoraSettings(r=4), adapters=settings)
    assert report.replaced["bottleneck adapters"] == 4
    assert set(report.trainable_by_method) == {"lora", "bottleneck adapters"}
    assert isinstance(model.model.layers[1].self_attn.o_proj, AdapterLayer)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    down = model.model.layers[0].mlp.down_proj.adapters["default"].adapter_up.weight
    assert down.grad is not None and down.grad.abs().sum() > 0
    pyfastpeft.unpatch_model(model)


def test_bad_arguments_are_refused_before_the_model_changes():
    x = torch.randn(2, 8)
    params = [p.detach() for p in parameters(8, 2, torch.float32)]
    with pytest.raises(ValueError, match="activation must be one of"):
        bottleneck_adapter(x, *params, activation="tanh")
    with pytest.raises(ValueError, match=r"up_weight is \(8, 3\), expected \[8, 2\]"):
        bottleneck_adapter(x, params[0], params[1], torch.randn(8, 3), params[3])
    with pytest.raises(ValueError, match=r"down_bias has shape \(3,\), expected \[2\]"):
        bottleneck_adapter(x, params[0], torch.randn(3), *params[2:])
    with pytest.raises(TypeError, match="up_bias"):
        bottleneck_adapter(x, *params[:3], params[3].double())
    with pytest.raises(ValueError, match="h has shape"):
        torch.ops.pyfastpeft.bottleneck_backward(x, x, params[0], params[2], torch.randn(3, 2), 1.0, 0, True)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.pyfastpeft.bottleneck_forward(x, *params, 1.0, 7)
    model = tiny_llama()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="reduction_factor must be an int >= 1"):
        pyfastpeft.add_adapters(model, reduction_factor=0)
    with pytest.raises(ValueError, match="no module matches placement"):
        pyfastpeft.add_adapters(model, placement=["missing"])
    with pytest.raises(ValueError, match="no module matches placement"):
        pyfastpeft.prepare_model(model, quant="nf4", adapters=pyfastpeft.AdapterSettings(placement=["missing"]))
    assert [n for n, _ in model.named_modules()] == names
    assert math.isfinite(model(input_ids=torch.tensor([[1, 2]])).logits.sum().item())
