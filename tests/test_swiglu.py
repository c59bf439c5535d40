import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    CPU_ISAS,
    DEVICES,
    DTYPES,
    assert_close,
    assert_no_less_accurate,
    cpu_isa,
    grads_of,
    on_device_unsupported,
    run,
    skip_unsupported,
)
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import pyfastpeft
from pyfastpeft.functional import swiglu
from pyfastpeft.nn import SwiGLUMLP

SHAPES = [(1,), (1000,), (3, 4097), (2, 5, 123)]


def inputs(shape, dtype):
    return (torch.randn(shape).mul_(4).to(dtype), torch.randn(shape).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_forward_and_backward_match_reference(backend, dtype, shape):
    skip_unsupported(backend, dtype, torch.Size(shape).numel())
    gate, up = inputs(shape, dtype)
    dy = torch.randn(shape).to(dtype)
    results = {}
    for name in (backend, "reference"):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        y = run(name, swiglu, g, u)
        y.backward(dy)
        results[name] = (y, g.grad, u.grad)
    for ours, ref in zip(results[backend], results["reference"]):
        assert_close(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_no_less_accurate_than_eager(dtype):
    gate, up = inputs((4, 5000), dtype)
    exact = F.silu(gate.double()) * up.double()
    assert_no_less_accurate(swiglu(gate, up), run("reference", swiglu, gate, up), exact, dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_swiglu_every_cpu_isa_agrees(isa, dtype):
    gate, up = inputs((3, 1031), dtype)
    with cpu_isa(isa):
        y = swiglu(gate, up)
    assert_close(y, run("reference", swiglu, gate, up))


def test_swiglu_saturates_without_overflow():
    gate = torch.tensor([-1e4, -100.0, -88.5, -20.0, 0.0, 20.0, 88.5, 100.0, 1e4])
    up = torch.ones_like(gate)
    assert_close(swiglu(gate, up), F.silu(gate))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_swiglu_gradcheck_float64(backend):
    gate, up = inputs((4, 9), torch.float64)
    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(swiglu, (gate.requires_grad_(), up.requires_grad_()))


def test_swiglu_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        gate, up = inputs((7, 33), dtype)
        torch.library.opcheck(torch.ops.pyfastpeft.swiglu_forward.default, (gate, up))
        torch.library.opcheck(torch.ops.pyfastpeft.swiglu_backward.default, (torch.randn_like(gate), gate, up))


def test_swiglu_saves_only_its_inputs_for_backward():
    gate, up = (t.requires_grad_() for t in inputs((16, 256), torch.float32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(gate, up)
    assert len(saved) == 2 and all(s.data_ptr() in (gate.data_ptr(), up.data_ptr()) for s in saved)


def test_swiglu_mlp_matches_llama_mlp():
    config = LlamaConfig(hidden_size=48, intermediate_size=100, num_attention_heads=4, mlp_bias=False)
    hf = LlamaMLP(config)
    ours = SwiGLUMLP(48, 100)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 7, 48, requires_grad=True)
    y, y_hf = ours(x), hf(x)
    assert_close(y, y_hf)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_hf,) = torch.autograd.grad(y_hf.square().sum(), x)
    assert_close(g, g_hf)


def test_swiglu_mlp_compiles_fullgraph():
    mlp = SwiGLUMLP(16, 40)
    x = torch.randn(3, 16, requires_grad=True)
    y = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    assert_close(y, mlp(x))


@pytest.mark.slow
def test_swiglu_mlp_compiles_with_inductor():
    mlp = SwiGLUMLP(16, 40)
    x = torch.randn(3, 16)
    assert_close(torch.compile(mlp, fullgraph=True)(x), mlp(x))


# --- bad input -------------------------------------------------------------------------------------


def test_swiglu_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"gate has shape \(2, 3\), up has shape \(2, 4\)"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))


def test_swiglu_rejects_dtype_mismatch():
    with pytest.raises(TypeError, match="up has dtype"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float16))


def test_swiglu_rejects_integer_input():
    with pytest.raises(TypeError, match="gate must have dtype"):
        swiglu(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))


def test_swiglu_rejects_device_mismatch():
    with pytest.raises(ValueError, match="up is on meta"):
        swiglu(torch.randn(3), torch.randn(3, device="meta"))


def test_swiglu_non_contiguous_inputs():
    gate, up = torch.randn(40, 30).t(), torch.randn(40, 30).t()
    assert_close(swiglu(gate, up), F.silu(gate) * up)


def test_swiglu_zero_size():
    gate = torch.randn(0, 8, requires_grad=True)
    y = swiglu(gate, torch.randn(0, 8))
    y.sum().backward()
    assert y.shape == (0, 8) and gate.grad.shape == (0, 8)


def test_swiglu_propagates_nan_and_inf_like_reference():
    gate = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf"), 2.0])
    up = torch.tensor([1.0, float("nan"), 1.0, 1.0, float("inf")])
    assert_close(swiglu(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 1001), (4096, 11008)])
def test_swiglu_on_each_device_matches_reference(device, backend, dtype, shape):
    on_device_unsupported(device, backend, dtype, torch.Size(shape).numel())
    gate = (torch.randn(shape, device=device) * 4).to(dtype)
    up, dy = torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)
    for ours, ref in zip(grads_of(backend, swiglu, (gate, up), dy), grads_of("reference", swiglu, (gate, up), dy)):
        assert_close(ours, ref)
