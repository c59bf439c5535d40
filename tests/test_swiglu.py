import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    CPU_BF16,
    CPU_ISAS,
    DEVICES,
    DTYPES,
    assert_close,
    assert_no_less_accurate,
    cpu_avx512_bf16,
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


@pytest.mark.parametrize("bf16_stores", CPU_BF16)
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_swiglu_every_cpu_isa_agrees(isa, bf16_stores, dtype):
    gate, up = inputs((3, 1031), dtype)
    dy = torch.randn(gate.shape).to(dtype)
    with cpu_isa(isa), cpu_avx512_bf16(bf16_stores):
        ours = grads_of("native", swiglu, (gate, up), dy)
    for a, b in zip(ours, grads_of("reference", swiglu, (gate, up), dy)):
        assert_close(a, b)


def repeat_to(values, n):
    """values repeated to n elements: the kernels' 32-lane loop and their 16-lane tail both see every value."""
    return torch.tensor(values).repeat(n // len(values) + 1)[:n]


@pytest.mark.parametrize("bf16_stores", CPU_BF16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_saturates_without_overflow(dtype, bf16_stores):
    gate = repeat_to([-1e4, -100.0, -88.5, -20.0, 0.0, 20.0, 88.5, 100.0, 1e4], 75).to(dtype)
    up = torch.ones_like(gate)
    with cpu_avx512_bf16(bf16_stores):
        y = swiglu(gate, up)
    assert_close(y, F.silu(gate.float()).to(dtype))


@pytest.mark.parametrize("bf16_stores", CPU_BF16)
@pytest.mark.parametrize("tiny", ["up", "dy"])
def test_swiglu_bf16_keeps_subnormal_results(bf16_stores, tiny):
    # Results below 2^-126 (y and dg from a tiny up, du and dg from a tiny dy): bf16 holds them, its exponent range
    # being fp32's. vcvtne2ps2bf16 would read them as zero; the kernel rounds such a vector the exact way.
    n = 75
    gate = torch.linspace(0.5, 3.0, n).to(torch.bfloat16)
    up = torch.full((n,), 3e-39 if tiny == "up" else 1.5).to(torch.bfloat16)
    dy = torch.full((n,), 2e-39 if tiny == "dy" else 1.25).to(torch.bfloat16)
    with cpu_avx512_bf16(bf16_stores):
        ours = dict(zip(("y", "dgate", "dup"), grads_of("native", swiglu, (gate, up), dy)))
    g, u, d = gate.double(), up.double(), dy.double()
    s = torch.sigmoid(g)
    exact = dict(y=g * s * u, dgate=d * u * s * (1 + g * (1 - s)), dup=d * g * s)
    for name in ("y", "dgate") if tiny == "up" else ("dup", "dgate"):
        assert (exact[name].abs() < 2**-126).all()
        want = exact[name].to(torch.bfloat16)
        assert (want != 0).all()
        torch.testing.assert_close(ours[name], want, rtol=0, atol=0, msg=name)


@pytest.mark.skipif(CPU_BF16 == [False], reason="this CPU has no AVX512-BF16")
def test_swiglu_bf16_stores_are_bitwise_the_integer_roundings():
    gate, up = inputs((5, 1031), torch.bfloat16)
    dy = torch.randn(gate.shape).to(torch.bfloat16)
    results = []
    for bf16_stores in (True, False):
        with cpu_avx512_bf16(bf16_stores):
            results.append(grads_of("native", swiglu, (gate, up), dy))
    for a, b in zip(*results):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


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


@pytest.mark.parametrize("bf16_stores", CPU_BF16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_propagates_nan_and_inf_like_reference(dtype, bf16_stores):
    inf, nan = float("inf"), float("nan")
    gate = repeat_to([nan, 1.0, inf, -inf, 2.0], 75).to(dtype)
    up = repeat_to([1.0, nan, 1.0, 1.0, inf], 75).to(dtype)
    with cpu_avx512_bf16(bf16_stores):
        y = swiglu(gate, up)
    assert_close(y, (F.silu(gate.float()) * up.float()).to(dtype))


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


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_swiglu_large_outputs_are_bitwise_the_small_ones(isa, dtype):
    # From 16 MiB of output a call, the AVX-512 kernels write by streaming stores (fp16 excepted): the same bits as
    # the same rows in small calls, which stay below that size and store plainly.
    rows, columns = (1025 if dtype == torch.float32 else 2049), 4100
    gate, up, dy = (torch.randn(rows, columns).mul_(3).to(dtype) for _ in range(3))
    with cpu_isa(isa):
        y = torch.ops.pyfastpeft.swiglu_forward(gate, up)
        dgate, dup = torch.ops.pyfastpeft.swiglu_backward(dy, gate, up)
        parts = list(zip(dy.split(128), gate.split(128), up.split(128)))
        y_parts = [torch.ops.pyfastpeft.swiglu_forward(g, u) for _, g, u in parts]
        grad_parts = [torch.ops.pyfastpeft.swiglu_backward(d, g, u) for d, g, u in parts]
    assert y.nbytes >= 16 << 20
    assert torch.equal(y, torch.cat(y_parts))
    assert torch.equal(dgate, torch.cat([p[0] for p in grad_parts]))
    assert torch.equal(dup, torch.cat([p[1] for p in grad_parts]))
