"""GPU checks: the CUDA and Triton backends against the reference on CUDA tensors (skipped without a GPU)."""

import pytest
import torch
from helpers import (
    HAS_TRITON,
    assert_close,
    random_weight_state,
    run,
    special_blocks_weight,
    with_planted_ties,
)

import pyfastpeft
from pyfastpeft.functional import apply_rotary_pos_emb, rms_norm, swiglu
from pyfastpeft.ops import nf4 as nf4_ops
from pyfastpeft.reference import nf4 as nf4_reference

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
    fn = lambda a, b: rms_norm(a, b, 1e-6, offset, mode)
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
    cos, sin = (
        torch.randn(batch, seq, rot, device="cuda").to(dtype),
        torch.randn(batch, seq, rot, device="cuda").to(dtype),
    )
    dy = (torch.randn(q.shape, device="cuda").to(dtype), torch.randn(k.shape, device="cuda").to(dtype))
    fn = lambda a, b: apply_rotary_pos_emb(a, b, cos, sin, interleaved=interleaved)
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
    from pyfastpeft.quant import (
        int8_colwise_quant,
        int8_vectorwise_quant,
        quantize_int8_weight,
    )

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
    fn = lambda a, b: int8_linear(a, codes, scb, b, 6.0)
    ours, ref = grads_of(backend, fn, (x, bias), dy), grads_of("reference", fn, (x, bias), dy)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


# ---- NF4: the CUDA kernels (quantize, dequantize, GEMV; dequantize + torch matmul above 8 rows) and Triton's ----

NF4_CODES = nf4_reference.QUANT_TABLES
# Products of the same dequantized weight, fp32 sums; bf16/fp16 may round the weight to x's dtype first.
NF4_PRODUCT_TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def nf4_weight_on_gpu(n, k, blocksize, seed):
    """(packed [(n*k + 1) // 2, 1], absmax, code) on the GPU, and the weight dequantized in fp64 [n, k]."""
    packed, absmax = random_weight_state(n, k, blocksize, torch.Generator().manual_seed(seed))
    code = NF4_CODES["nf4"]
    weight = nf4_reference.dequantize_4bit(packed, absmax, code, blocksize, n * k, torch.float64).view(n, k)
    return packed.view(-1, 1).cuda(), absmax.cuda(), code.cuda(), weight.cuda()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(7, 33), (40, 96), (1024, 1024)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_nf4_quantize_gpu_matches_reference_bytes(backend, quant_type, blocksize, shape, dtype):
    code = NF4_CODES[quant_type]
    w = with_planted_ties(shape, blocksize, code, torch.Generator().manual_seed(shape[0])).to(dtype)
    packed, absmax = run(backend, nf4_ops.nf4_quantize, w.cuda(), code.cuda(), blocksize)
    expected_packed, expected_absmax = nf4_reference.quantize_4bit(w, blocksize, code)
    assert torch.equal(packed.cpu(), expected_packed)
    assert torch.equal(absmax.cpu(), expected_absmax)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("numel", [4 * 64 + 10, 4 * 64 + 9])
def test_nf4_quantize_gpu_zero_nan_inf_blocks_like_reference(backend, numel):
    code = NF4_CODES["nf4"]
    w = special_blocks_weight(numel)
    for case in (w, torch.cat([w[:256], torch.full((numel - 256,), float("nan"))])):
        packed, absmax = run(backend, nf4_ops.nf4_quantize, case.cuda(), code.cuda(), 64)
        expected_packed, expected_absmax = nf4_reference.quantize_4bit(case, 64, code)
        assert torch.equal(packed.cpu(), expected_packed)
        torch.testing.assert_close(absmax.cpu(), expected_absmax, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize(
    "numel, blocksize, byte_offset",
    [
        (96 * 40, 64, 0),  # a [40, 96] weight: blocks straddle rows
        (33 * 7, 128, 0),  # odd numel, partial last block
        (11008 * 64 + 5, 4096, 0),  # many vector groups and a scalar tail
        (2 * 1000, 64, 1),  # packed one byte past an aligned address: the element-wise path
    ],
)
def test_nf4_dequantize_gpu_matches_reference_exactly(backend, dtype, numel, blocksize, byte_offset):
    packed, absmax = random_weight_state(1, numel + 2 * byte_offset, blocksize, torch.Generator().manual_seed(numel))
    absmax = absmax[: -(-numel // blocksize)]
    packed = packed[byte_offset:]
    code = NF4_CODES["nf4"]
    out = run(backend, nf4_ops.nf4_dequantize, packed.cuda(), absmax.cuda(), code.cuda(), blocksize, numel, dtype)
    assert torch.equal(out.cpu(), nf4_reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 3, 8, 17])  # fused GEMV up to 8 rows
@pytest.mark.parametrize(
    "n, k, blocksize",
    [
        (40, 96, 64),  # 16-byte rows, blocks straddle rows: the uint4 path
        (512, 4096, 64),  # the uint4 path, several loads per lane
        (33, 33, 32),  # odd k: odd rows start on a low nibble, the element-wise path
        (24, 200, 128),  # k % 32 != 0: the element-wise path
        (5, 70, 4096),  # one block for the whole weight
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_nf4_linear_gpu_matches_dequantized_matmul(backend, m, n, k, blocksize, dtype, with_bias):
    packed, absmax, code, weight = nf4_weight_on_gpu(n, k, blocksize, n * k + m)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
    out = run(backend, nf4_ops.nf4_linear_op, x, packed, absmax, code, bias, blocksize, n, k)
    exact = x.double() @ weight.T + (bias.double() if with_bias else 0)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.double(), exact, **NF4_PRODUCT_TOLERANCES[dtype])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("n, k, blocksize", [(40, 96, 64), (33, 33, 32), (300, 4096, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_grad_input_gpu_is_dy_times_dequantized_weight(backend, m, n, k, blocksize, dtype):
    packed, absmax, code, weight = nf4_weight_on_gpu(n, k, blocksize, n * k + m)
    dy = torch.randn(2, m, n, device="cuda").to(dtype)
    dx = run(backend, nf4_ops.nf4_linear_grad_input, dy, packed, absmax, code, blocksize, n, k)
    assert dx.dtype == dtype and dx.shape == (2, m, k)
    torch.testing.assert_close(dx.double(), dy.double() @ weight, **NF4_PRODUCT_TOLERANCES[dtype])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_nf4_gemv_captures_in_cuda_graphs_on_the_current_stream(backend):
    packed, absmax, code, weight = nf4_weight_on_gpu(256, 512, 64, 0)
    x, bias = torch.randn(2, 512, device="cuda"), torch.randn(256, device="cuda")
    with pyfastpeft.use_backend(backend):
        nf4_ops.nf4_linear_op(x, packed, absmax, code, bias, 64, 256, 512)  # warm-up (Triton compiles here)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                y = nf4_ops.nf4_linear_op(x, packed, absmax, code, bias, 64, 256, 512)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
    expected = x.double() @ weight.T + bias.double()
    torch.testing.assert_close(y.double(), expected, **NF4_PRODUCT_TOLERANCES[torch.float32])
