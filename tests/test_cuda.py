"""GPU checks: the CUDA and Triton backends against the reference on CUDA tensors (skipped without a GPU)."""
import pytest
import torch

import pyfastpeft
from pyfastpeft.functional import apply_rotary_pos_emb, rms_norm, swiglu
from helpers import HAS_TRITON, assert_close, run

pytestmark = pytest.mark.cuda

GPU_BACKENDS = ["native"] + (["triton"] if HAS_TRITON else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def grads_of(backend, fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = run(backend, fn, *leaves)
    torch.autograd.backward(out, dy)
    return (out if isinstance(out, tuple) else (out,)) + tuple(t.grad for t in leaves)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,offset", [("llama", 0.0), ("gemma", 1.0), ("none", 0.0)])
@pytest.mark.parametrize("shape", [(1, 123), (4097, 64), (3, 4096), (2, 11008), (5, 20000)])
def test_rms_norm_gpu_matches_reference(backend, dtype, mode, offset, shape):
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    w = (torch.randn(shape[-1], device="cuda") * 0.5 + 1).to(dtype)
    dy = torch.randn(shape, device="cuda").to(dtype)
    fn = lambda a, b: rms_norm(a, b, 1e-6, offset, mode)  # noqa: E731
    ours, ref = grads_of(backend, fn, (x, w), dy), grads_of("reference", fn, (x, w), dy)
    assert_close(ours[0], ref[0])
    assert_close(ours[1], ref[1])
    torch.testing.assert_close(ours[2].float(), ref[2].float(), rtol=2e-2, atol=2e-2 * shape[0] ** 0.5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 1001), (4096, 11008)])
def test_swiglu_gpu_matches_reference(backend, dtype, shape):
    gate, up = (torch.randn(shape, device="cuda") * 4).to(dtype), torch.randn(shape, device="cuda").to(dtype)
    dy = torch.randn(shape, device="cuda").to(dtype)
    for ours, ref in zip(grads_of(backend, swiglu, (gate, up), dy), grads_of("reference", swiglu, (gate, up), dy)):
        assert_close(ours, ref)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("case", [(1, 32, 8, 2048, 128, 128), (2, 4, 1, 7, 64, 32), (1, 3, 3, 1, 80, 80)])
def test_rope_gpu_matches_reference(backend, dtype, interleaved, case):
    batch, hq, hk, seq, dim, rot = case
    q = torch.randn(batch, seq, hq, dim, device="cuda").to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, hk, dim, device="cuda").to(dtype).transpose(1, 2)
    cos, sin = torch.randn(batch, seq, rot, device="cuda").to(dtype), torch.randn(batch, seq, rot, device="cuda").to(dtype)
    dy = (torch.randn(q.shape, device="cuda").to(dtype), torch.randn(k.shape, device="cuda").to(dtype))
    fn = lambda a, b: apply_rotary_pos_emb(a, b, cos, sin, interleaved=interleaved)  # noqa: E731
    ours, ref = grads_of(backend, fn, (q, k), dy), grads_of("reference", fn, (q, k), dy)
    assert ours[0].stride() == q.stride()
    for a, b in zip(ours, ref):
        assert_close(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_ops_capture_in_cuda_graphs_on_the_current_stream(backend):
    x, w = torch.randn(64, 4096, device="cuda"), torch.randn(4096, device="cuda")
    gate, up = torch.randn(64, 11008, device="cuda"), torch.randn(64, 11008, device="cuda")
    with pyfastpeft.use_backend(backend):
        rms_norm(x, w), swiglu(gate, up)  # warm-up (Triton compiles outside the capture)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                y, h = rms_norm(x, w), swiglu(gate, up)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
    assert_close(y, run("reference", rms_norm, x, w))
    assert_close(h, run("reference", swiglu, gate, up))


def test_ops_run_on_the_tensors_device_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, w = torch.randn(8, 64, device="cuda:1"), torch.randn(64, device="cuda:1")
    with torch.cuda.device(0):
        y = rms_norm(x, w)
    assert y.device == x.device
    assert_close(y, run("reference", rms_norm, x, w))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 8, 40])
@pytest.mark.parametrize("in_features", [64, 100])
def test_int8_gpu_matches_reference(backend, dtype, rows, in_features):
    from pyfastpeft.functional import int8_linear
    from pyfastpeft.quant import int8_colwise_quant, int8_vectorwise_quant, quantize_int8_weight

    torch.manual_seed(rows)
    x = torch.randn(rows, in_features, device="cuda")
    x[:, 3] *= 10
    x = x.to(dtype)
    codes, scb = quantize_int8_weight(torch.randn(48, in_features, device="cuda"))
    bias = torch.randn(48, device="cuda").to(dtype)
    for quant in (int8_vectorwise_quant, int8_colwise_quant):
        ours, ref = run(backend, quant, x, 6.0), run("reference", quant, x, 6.0)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1]) and torch.equal(ours[2], ref[2])
    dy = torch.randn(rows, 48, device="cuda").to(dtype)
    fn = lambda a, b: int8_linear(a, codes, scb, b, 6.0)  # noqa: E731
    ours, ref = grads_of(backend, fn, (x, bias), dy), grads_of("reference", fn, (x, bias), dy)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
