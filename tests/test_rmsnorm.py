import pytest
import torch
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
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import pyfastpeft
from pyfastpeft.functional import rms_norm
from pyfastpeft.nn import RMSNorm

MODES = [("llama", 0.0), ("gemma", 1.0), ("none", 0.0), ("llama", 0.5)]
SHAPES = [(1, 123), (4097, 64), (3, 5, 4096), (2, 1), (3, 9000), (7, 20000)]  # 9000: fused forward, looped backward


def inputs(shape, dtype, weight_dtype=None):
    x = torch.randn(shape, dtype=torch.float32).mul_(3).to(dtype)
    w = torch.randn(shape[-1], dtype=torch.float32).mul_(0.5).add_(1).to(weight_dtype or dtype)
    return x, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,offset", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_forward_matches_reference(backend, dtype, mode, offset, shape):
    skip_unsupported(backend, dtype, torch.Size(shape).numel())
    x, w = inputs(shape, dtype)
    y = run(backend, rms_norm, x, w, 1e-6, offset, mode)
    y_ref = run("reference", rms_norm, x, w, 1e-6, offset, mode)
    assert y.dtype == y_ref.dtype and y.shape == x.shape
    assert_close(y, y_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_llama_mode_matches_hf_within_one_rounding(dtype):
    """In llama mode ours rounds where HF does (normalized row to x's dtype, then times w); only the
    fp32 sum-of-squares order differs, which moves a few results by one unit in the last place."""
    x, w = inputs((64, 4096), dtype)
    hf = LlamaRMSNorm(4096, eps=1e-6).to(dtype)
    hf.weight.data.copy_(w)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(rms_norm(x, w), hf(x), rtol=eps, atol=eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,offset", MODES)
def test_rms_norm_no_less_accurate_than_reference(dtype, mode, offset):
    x, w = inputs((257, 1000), dtype)
    exact = run("reference", rms_norm, x.double(), w.double(), 1e-6, offset, "gemma")
    ours = rms_norm(x, w, 1e-6, offset, mode)
    ref = run("reference", rms_norm, x, w, 1e-6, offset, mode)
    assert_no_less_accurate(ours, ref, exact, dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_rms_norm_every_cpu_isa_agrees(isa, dtype):
    x, w = inputs((33, 517), dtype)
    dy = torch.randn_like(x)
    with cpu_isa(isa):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = rms_norm(xg, wg, 1e-5, 0.0, "llama")
        y.backward(dy)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = run("reference", rms_norm, xr, wr, 1e-5, 0.0, "llama")
    y_ref.backward(dy)
    assert_close(y, y_ref)
    assert_close(xg.grad, xr.grad)
    assert_close(wg.grad, wr.grad, dtype=torch.float32 if dtype == torch.float64 else dtype)


@pytest.mark.skipif("avx512" not in CPU_ISAS, reason="this CPU has no AVX-512")
@pytest.mark.parametrize("mode,offset", MODES)
def test_rms_norm_bf16_avx512_is_bitwise_the_avx2_build(mode, offset):
    # The AVX-512 backward takes rows two at a time (one load of w and of dW's partial row for both, row order kept);
    # the AVX2 build takes one, adding each row into dW with the same multiply-add (the scalar build contracts
    # none): dW is the same bits. An odd row count runs pairs and a last single row.
    x = torch.randn(37, 517).mul_(3).to(torch.bfloat16)
    w = torch.randn(517)
    dy = torch.randn(37, 517)
    results = []
    for isa in ("avx512", "avx2"):
        with cpu_isa(isa):
            results.append(grads_of("native", lambda a, b: rms_norm(a, b, 1e-6, offset, mode), (x, w), dy))
    (y, dx, dw), (y2, dx2, dw2) = results
    assert torch.equal(bits(dw), bits(dw2))
    assert_close(y, y2)
    assert_close(dx, dx2)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,offset", MODES)
@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_forward_of_many_rows_is_bitwise_each_row_alone(isa, dtype, mode, offset, threads):
    # Each row's sum of squares accumulates inside the previous row's normalize pass (AVX-512): y and rstd must be
    # the bits of the same row normalized on its own, on any thread count (a thread's first row is summed alone).
    # 517 columns: full vectors and a masked tail.
    from pyfastpeft.ops import rmsnorm as rmsnorm_ops

    x, w = inputs((37, 517), dtype)
    x[5].mul_(1e-3)
    x[6].zero_()

    def forward(rows):
        y, rstd = torch.empty_like(rows), torch.empty(rows.shape[0])
        rmsnorm_ops.forward_into(rows, w, y, rstd, 1e-6, offset, mode)
        return y, rstd

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with cpu_isa(isa):
            y, rstd = forward(x)
            alone = [forward(x[i : i + 1].clone()) for i in range(x.shape[0])]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(bits(y), bits(torch.cat([a[0] for a in alone])))
    assert torch.equal(bits(rstd), bits(torch.cat([a[1] for a in alone])))


def bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


@pytest.mark.skipif(CPU_BF16 == [False], reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("mode,offset", MODES)
@pytest.mark.parametrize("scale", [1.0, 1e-39])
def test_rms_norm_bf16_stores_are_bitwise_the_integer_roundings(mode, offset, scale):
    # Both round to nearest even: y, dx (and dw, from xn's rounding) agree bit for bit. A weight and dy of scale
    # 1e-39 make y and dx subnormal, which the instruction would read as zero.
    x = torch.randn(7, 517).to(torch.bfloat16)
    w = (torch.randn(517) * scale).to(torch.bfloat16)
    dy = (torch.randn(7, 517) * scale).to(torch.bfloat16)
    results = []
    for bf16_stores in (True, False):
        with cpu_avx512_bf16(bf16_stores):
            results.append(grads_of("native", lambda a, b: rms_norm(a, b, 1e-6, offset, mode), (x, w), dy))
    for a, b in zip(*results):
        assert torch.equal(bits(a), bits(b))
    if scale < 1 and mode == "llama" and offset == 0:
        assert (results[0][0] != 0).any() and (results[0][0].abs() < 2**-126).all()


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("bf16_stores", CPU_BF16)
@pytest.mark.parametrize("mode,offset", MODES)
def test_rms_norm_bf16_forward_rounds_each_element_as_its_formula(isa, bf16_stores, mode, offset):
    # Given the kernel's own rstd, each y element is its mode's formula with its roundings to bf16, whatever lane
    # order the rows run in (the AVX-512 rows take 32 elements a step in a lane order of their own, then 16, then a
    # masked tail: 517 columns hold all three). Weights of 1e-39 give subnormal products.
    x = torch.randn(9, 517).mul_(3).to(torch.bfloat16)
    w = torch.randn(517).to(torch.bfloat16)
    w[100:140] = 1e-39
    with cpu_isa(isa), cpu_avx512_bf16(bf16_stores):
        y, rstd = torch.ops.pyfastpeft.rms_norm_forward(x, w, 1e-6, offset, mode)
    xf, r, wf = x.float(), rstd[:, None], w.float() + offset

    def rounded(v):
        return v.bfloat16().float()

    if mode == "llama":
        expected = wf * rounded(xf * r)
    elif mode == "gemma":
        expected = xf * r * wf
    else:
        expected = rounded(rounded(xf * rounded(r)) * rounded(wf))
    assert torch.equal(bits(y), bits(expected.bfloat16()))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype, rows", [(torch.bfloat16, 2050), (torch.float32, 1025)])
@pytest.mark.parametrize("columns", [4096, 4100])
def test_rms_norm_large_outputs_are_bitwise_the_small_ones(isa, dtype, rows, columns):
    # From 16 MiB of output a call, y and dx go out by streaming stores where a vector's address is aligned (4100
    # columns misalign most rows): the same bits as the row chunks' plain stores, which stay below that size.
    x = torch.randn(rows, columns).mul_(3).to(dtype)
    w = torch.randn(columns).to(dtype)
    dy = torch.randn(rows, columns).to(dtype)
    with cpu_isa(isa):
        y, rstd = torch.ops.pyfastpeft.rms_norm_forward(x, w, 1e-6, 0.0, "llama")
        dx, _ = torch.ops.pyfastpeft.rms_norm_backward(dy, x, w, rstd, 0.0, "llama", True)
        chunks = [torch.ops.pyfastpeft.rms_norm_forward(part, w, 1e-6, 0.0, "llama") for part in x.split(256)]
        dx_chunks = [
            torch.ops.pyfastpeft.rms_norm_backward(g, part, w, r, 0.0, "llama", False)[0]
            for g, part, (_, r) in zip(dy.split(256), x.split(256), chunks)
        ]
    assert y.nbytes >= 16 << 20
    assert torch.equal(bits(y), bits(torch.cat([c[0] for c in chunks])))
    assert torch.equal(bits(rstd), bits(torch.cat([c[1] for c in chunks])))
    assert torch.equal(bits(dx), bits(torch.cat(dx_chunks)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,offset", MODES)
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 256)])
def test_rms_norm_backward_matches_reference(backend, dtype, mode, offset, shape):
    skip_unsupported(backend, dtype, 1)
    x, w = inputs(shape, dtype)
    dy = torch.randn(shape, dtype=torch.float32)
    grads = {}
    for name in (backend, "reference"):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = run(name, rms_norm, xg, wg, 1e-6, offset, mode)
        y.backward(dy.to(y.dtype))
        grads[name] = (xg.grad, wg.grad)
    assert_close(grads[backend][0], grads["reference"][0])
    # dw sums over rows: allow for the longer accumulation in low precision
    torch.testing.assert_close(grads[backend][1].float(), grads["reference"][1].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 17, 300, 5000])  # one partial, two, 19, the cap of 256
def test_rms_norm_weight_grad_is_bitwise_the_same_on_any_thread_count(isa, dtype, rows):
    x = torch.randn(rows, 96).to(dtype)
    weight = torch.randn(96).to(dtype).requires_grad_()
    dy = torch.randn(rows, 96).to(dtype)
    previous = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            with cpu_isa(isa):
                grads.append(torch.autograd.grad(run("native", rms_norm, x, weight), weight, dy)[0])
    finally:
        torch.set_num_threads(previous)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for grad in grads[1:]:
        assert torch.equal(grad.view(bits), grads[0].view(bits))


def test_rms_norm_frozen_weight_gets_no_gradient():
    x, w = inputs((4, 64), torch.float32)
    x.requires_grad_()
    rms_norm(x, w).sum().backward()
    assert x.grad is not None and w.grad is None


def test_rms_norm_fp32_weight_with_bf16_input_promotes_like_hf():
    x, w = inputs((8, 96), torch.bfloat16, weight_dtype=torch.float32)
    hf = LlamaRMSNorm(96)
    hf.weight.data.copy_(w)
    y = rms_norm(x, w)
    assert y.dtype == torch.float32
    assert torch.equal(y, hf(x))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("mode,offset", MODES)
def test_rms_norm_gradcheck_float64(backend, mode, offset):
    x, w = inputs((3, 17), torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6, offset, mode), (x, w))


def test_rms_norm_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        x, w = inputs((6, 40), dtype)
        y, rstd = torch.ops.pyfastpeft.rms_norm_forward(x, w, 1e-6, 0.0, "llama")
        torch.library.opcheck(torch.ops.pyfastpeft.rms_norm_forward.default, (x, w, 1e-6, 0.0, "llama"))
        for weight_grad in (True, False):
            torch.library.opcheck(
                torch.ops.pyfastpeft.rms_norm_backward.default,
                (torch.randn_like(y), x, w, rstd, 0.0, "llama", weight_grad),
            )


def test_rms_norm_module_matches_hf_and_loads_its_state_dict():
    hf = LlamaRMSNorm(123, eps=1e-5)
    hf.weight.data.normal_()
    ours = RMSNorm(123, eps=1e-5)
    ours.load_state_dict(hf.state_dict())
    assert ours.variance_epsilon == hf.variance_epsilon
    x = torch.randn(2, 9, 123)
    assert_close(ours(x), hf(x))


def test_rms_norm_gemma_module_matches_hf():
    hf = GemmaRMSNorm(64, eps=1e-6)
    hf.weight.data.normal_()
    ours = RMSNorm(64, eps=1e-6, offset=1.0, casting_mode="gemma").to(torch.bfloat16)
    ours.weight.data.copy_(hf.weight.data)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(ours(x), hf.to(torch.bfloat16)(x))


def test_rms_norm_module_compiles_fullgraph():
    module = RMSNorm(64)
    x = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    assert_close(y, module(x))


@pytest.mark.slow
def test_rms_norm_module_compiles_with_inductor():
    module = RMSNorm(64)
    x = torch.randn(4, 64)
    assert_close(torch.compile(module, fullgraph=True)(x), module(x))


# --- bad input -------------------------------------------------------------------------------------


def test_rms_norm_rejects_integer_input():
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4))


def test_rms_norm_rejects_weight_of_wrong_size():
    with pytest.raises(ValueError, match="weight has 4095 elements, x's last dim is 4096"):
        rms_norm(torch.randn(2, 4096), torch.ones(4095))


def test_rms_norm_rejects_device_mismatch():
    with pytest.raises(ValueError, match="weight is on meta"):
        rms_norm(torch.randn(2, 4), torch.ones(4, device="meta"))


def test_rms_norm_rejects_unknown_casting_mode():
    with pytest.raises(ValueError, match="casting_mode"):
        rms_norm(torch.randn(2, 4), torch.ones(4), casting_mode="fp8")


def test_rms_norm_non_contiguous_input():
    x = torch.randn(64, 10).t()
    w = torch.randn(64)
    assert_close(rms_norm(x, w), run("reference", rms_norm, x, w))


def test_rms_norm_zero_size_input():
    x = torch.randn(0, 16, requires_grad=True)
    y = rms_norm(x, torch.ones(16, requires_grad=True))
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


def test_rms_norm_propagates_nan_and_inf_like_reference():
    x = torch.randn(4, 32)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    w = torch.ones(32)
    y, y_ref = rms_norm(x, w), run("reference", rms_norm, x, w)
    assert torch.equal(y.isnan(), y_ref.isnan())
    assert_close(y[[0, 3]], y_ref[[0, 3]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,offset", MODES)
@pytest.mark.parametrize("shape", [(1, 123), (4097, 64), (3, 4096), (2, 11008), (5, 20000)])
def test_rms_norm_on_each_device_matches_reference(device, backend, dtype, mode, offset, shape):
    """Forward and both gradients against the reference on the same device, model-sized rows included."""
    on_device_unsupported(device, backend, dtype, shape[0] * shape[1])
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    w = (torch.randn(shape[-1], device=device) * 0.5 + 1).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    fn = lambda a, b: rms_norm(a, b, 1e-6, offset, mode)  # noqa: E731
    ours, ref = grads_of(backend, fn, (x, w), dy), grads_of("reference", fn, (x, w), dy)
    assert_close(ours[0], ref[0])
    assert_close(ours[1], ref[1])
    torch.testing.assert_close(ours[2].float(), ref[2].float(), rtol=2e-2, atol=2e-2 * shape[0] ** 0.5)
