"""General affine quantization: codes against the written formulas and torch's quantized tensors, native
against reference on every instruction set, non-finite inputs, observers, and fake_quantize's gradient."""

import math

import pytest
import torch
from helpers import CPU_ISAS, cpu_isa, edge_rows, run

import pyfastpeft
from pyfastpeft.quant import MinMaxObserver, PercentileObserver, QuantizedTensor, dequantize, fake_quantize, quantize

GRANULARITIES = [dict(), dict(axis=0), dict(axis=1), dict(axis=-1), dict(blocksize=64), dict(blocksize=7)]
SCHEMES = ["absmax", "zeropoint"]
BACKENDS = ["native", "reference"]
# torch's quantized tensors, the oracle of two tests, warn that they are deprecated.
TORCH_QUANTIZED_DEPRECATED = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")


def group_ids(shape, axis=None, blocksize=None):
    """Group of each element of a tensor of `shape`, flattened: 0, its index along axis, or i // blocksize."""
    n = math.prod(shape)
    if blocksize is not None:
        return torch.arange(n) // blocksize
    if axis is None:
        return torch.zeros(n, dtype=torch.long)
    index = torch.arange(shape[axis]).view([-1 if d == axis % len(shape) else 1 for d in range(len(shape))])
    return index.expand(shape).reshape(-1)


def formula_quantize(x, bits, scheme, axis=None, blocksize=None):
    """(codes, scale, zero_point) from the formulas written out one group at a time, in fp32."""
    flat, ids = x.float().reshape(-1), group_ids(x.shape, axis, blocksize)
    codes = torch.empty(flat.numel(), dtype=torch.int32)
    scales, zero_points = [], []
    for g in range(int(ids.max()) + 1 if ids.numel() else 0):
        v = flat[ids == g]
        if scheme == "absmax":
            qmax = 2 ** (bits - 1) - 1
            absmax = v.abs().max()
            scale = absmax / qmax
            multiplier = torch.tensor(float(qmax)) / absmax if absmax > 0 else torch.tensor(0.0)
            code, zero_point = torch.round(v * multiplier).clamp(-qmax, qmax), torch.tensor(0.0)
        else:
            qmax = 2**bits - 1
            lo, hi = v.min().clamp(max=0), v.max().clamp(min=0)
            scale = (hi - lo) / qmax
            if scale > 0:
                zero_point = torch.round(-lo / scale).clamp(0, qmax)
                code = (torch.round(v / scale) + zero_point).clamp(0, qmax)
            else:
                zero_point, code = torch.tensor(0.0), torch.zeros_like(v)
        codes[ids == g] = code.int()
        scales.append(scale)
        zero_points.append(zero_point)
    return codes.view(x.shape), torch.stack(scales), torch.stack(zero_points).int()


def check_same(a: QuantizedTensor, b: QuantizedTensor):
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.scale, b.scale, rtol=0, atol=0, equal_nan=True)
    assert (a.zero_point is None) == (b.zero_point is None)
    if a.zero_point is not None:
        assert torch.equal(a.zero_point, b.zero_point)


# ---- the formulas --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [8, 4])
def test_codes_follow_the_written_formulas(backend, granularity, scheme, bits):
    x = torch.randn(13, 29) * torch.rand(13, 1) * 3 + 0.2
    x[3, 5] = x[4, 0] = 0.0
    qt = run(backend, quantize, x, bits, scheme, **granularity)
    codes, scale, zero_point = formula_quantize(x, bits, scheme, **granularity)
    assert qt.codes.dtype == (torch.int8 if scheme == "absmax" else torch.uint8)
    assert qt.scale.dtype == torch.float32 and qt.shape == x.shape and qt.dtype == x.dtype
    assert torch.equal(qt.codes.int(), codes)
    assert torch.equal(qt.scale.reshape(-1), scale)
    if scheme == "zeropoint":
        assert qt.zero_point.dtype == torch.int32 and torch.equal(qt.zero_point.reshape(-1), zero_point)
    else:
        assert qt.zero_point is None
    expected_shape = () if not granularity else (scale.numel(),)
    assert qt.scale.shape == expected_shape


@TORCH_QUANTIZED_DEPRECATED
@pytest.mark.parametrize("backend", BACKENDS)
def test_absmax_per_tensor_matches_torch_quantize_per_tensor(backend):
    # scale = 2^-3 exactly (absmax 127 / 8), so x * (qmax / absmax) and torch's x * (1 / scale) are the same
    # exact products, and the planted ties (k + 0.5) / 8 must round half to even alike.
    steps = torch.cat([torch.randint(-126, 127, (500,)).float(), torch.arange(-126, 126) + 0.5, torch.tensor([127.0])])
    x = steps[torch.randperm(steps.numel())] / 8
    qt = run(backend, quantize, x, 8, "absmax")
    assert qt.scale.item() == 0.125
    expected = torch.quantize_per_tensor(x, 0.125, 0, torch.qint8).int_repr()
    assert torch.equal(qt.codes, expected)


@TORCH_QUANTIZED_DEPRECATED
@pytest.mark.parametrize("backend", BACKENDS)
def test_zeropoint_per_channel_matches_torch_quantize_per_channel(backend):
    # Each column spans [-100, 155] * 2^-k, so scale = 2^-k exactly and zero_point = 100.
    k = torch.tensor([2, 3, 5, 1])
    steps = torch.cat(
        [torch.randint(-100, 156, (200, 4)).float(), (torch.arange(-99, 154) + 0.5)[:200, None].expand(200, 4)]
    )
    x = torch.cat([steps, torch.tensor([[-100.0] * 4, [155.0] * 4])]) / 2.0**k
    qt = run(backend, quantize, x, 8, "zeropoint", axis=1)
    assert torch.equal(qt.scale, 2.0 ** -k.float()) and torch.equal(
        qt.zero_point, torch.full((4,), 100, dtype=torch.int32)
    )
    expected = torch.quantize_per_channel(x, qt.scale.double(), qt.zero_point.long(), 1, torch.quint8).int_repr()
    assert torch.equal(qt.codes, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_at_most_half_a_step(backend, granularity, scheme, bits):
    x = torch.randn(17, 40) * torch.logspace(-3, 2, 40)
    qt = run(backend, quantize, x, bits, scheme, **granularity)
    x_hat = run(backend, dequantize, qt)
    assert x_hat.dtype == x.dtype and x_hat.shape == x.shape
    ids = group_ids(x.shape, **granularity)
    half_step = qt.scale.reshape(-1)[ids].view(x.shape) / 2
    assert ((x_hat - x).abs() <= half_step * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_four_bit_codes_span_their_range(backend, scheme):
    x = torch.randn(8, 64)
    qt = run(backend, quantize, x, 4, scheme, axis=0)
    qmin, qmax = (-7, 7) if scheme == "absmax" else (0, 15)
    assert int(qt.codes.min()) >= qmin and int(qt.codes.max()) <= qmax
    assert qmax in qt.codes.int().amax(dim=1).tolist() and qmin in qt.codes.int().amin(dim=1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_rows_of_zeros_get_scale_zero_and_dequantize_to_zero(backend, scheme):
    x = torch.randn(5, 33)
    x[1] = 0.0
    x[4] = -0.0
    qt = run(backend, quantize, x, 8, scheme, axis=0)
    assert qt.scale[1] == 0 and qt.scale[4] == 0
    assert (qt.codes[[1, 4]] == 0).all()
    if scheme == "zeropoint":
        assert (qt.zero_point[[1, 4]] == 0).all()
    x_hat = run(backend, dequantize, qt)
    assert not x_hat.isnan().any() and (x_hat[[1, 4]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_nan_and_inf_poison_only_their_own_group(backend, scheme):
    x = torch.randn(4, 20)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3, 0] = -float("inf")
    qt = run(backend, quantize, x, 8, scheme, axis=0)
    x_hat = run(backend, dequantize, qt)
    assert qt.scale[1].isnan() and qt.scale[2].isinf() and qt.scale[3].isinf()
    zero_point = qt.zero_point if qt.zero_point is not None else torch.zeros(4, dtype=torch.int32)
    assert (qt.codes[1:].int() == zero_point[1:, None]).all()  # every code of a poisoned row is its zero point
    assert x_hat[1:].isnan().all()
    clean = run(backend, quantize, x[:1], 8, scheme, axis=0)
    assert torch.equal(qt.codes[:1], clean.codes) and torch.equal(x_hat[:1], run(backend, dequantize, clean))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "granularity,shape", [(dict(), (0,)), (dict(axis=1), (0, 5)), (dict(blocksize=4), (3, 0))], ids=str
)
def test_empty_tensors_give_empty_codes(backend, granularity, shape):
    x = torch.empty(shape)
    qt = run(backend, quantize, x, 8, "zeropoint", **granularity)
    assert qt.codes.shape == shape
    assert torch.equal(qt.scale, torch.zeros(5)) if granularity.get("axis") == 1 else qt.scale.numel() <= 1
    assert run(backend, dequantize, qt).shape == shape


# ---- native against the reference ------------------------------------------------------------------------

ODD_CASES = [
    ((37, 53), dict()),
    ((37, 53), dict(axis=0)),
    ((37, 53), dict(axis=1)),
    ((3, 4100), dict(axis=1)),
    ((5, 3, 4000), dict(axis=1)),
    ((5, 7, 9), dict(axis=-1)),
    ((2, 3, 5), dict(axis=0)),
    ((50001,), dict()),
    ((1001,), dict(blocksize=64)),
    ((50001,), dict(blocksize=20000)),
    ((41, 3), dict(blocksize=5)),
    ((), dict()),
    ((7, 1), dict(axis=1)),
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape,granularity", ODD_CASES, ids=str)
def test_native_matches_reference_exactly(isa, dtype, scheme, shape, granularity):
    x = (torch.randn(shape) * 4).to(dtype)
    if x.numel() > 10:
        x.view(-1)[3] = float("nan")  # one poisoned group
    with cpu_isa(isa):
        native = run("native", quantize, x, 8, scheme, **granularity)
        native_hat = run("native", dequantize, native)
    reference = run("reference", quantize, x, 8, scheme, **granularity)
    check_same(native, reference)
    torch.testing.assert_close(native_hat, run("reference", dequantize, reference), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_per_tensor_codes_every_chunk_of_a_large_tensor_once(isa, scheme, threads):
    # Per tensor, the coding pass takes each thread's chunks of 4096 elements backwards in runs of 64: enough chunks
    # for several runs a thread, a short run at each thread's end (taken first) and a short last chunk.
    x = torch.randn(4096 * (64 * 5 + 37) + 123) * 3
    x[-1] = 40.0  # the range's end in the short last chunk
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with cpu_isa(isa):
            native = run("native", quantize, x, 8, scheme)
    finally:
        torch.set_num_threads(previous)
    check_same(native, run("reference", quantize, x, 8, scheme))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("granularity", [dict(axis=0), dict(blocksize=70), dict()], ids=str)
def test_native_absmax_matches_reference_on_edge_rows(isa, dtype, bits, granularity):
    x = edge_rows(70 if granularity else 129).to(dtype)
    if not granularity:  # per tensor: one group, so each edge row in turn beside plain rows
        cases = [torch.cat([x[8:], x[i : i + 1]]) for i in range(8)]
    else:
        cases = [x]
    for case in cases:
        with cpu_isa(isa):
            native = run("native", quantize, case, bits, "absmax", **granularity)
        check_same(native, run("reference", quantize, case, bits, "absmax", **granularity))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape,granularity", ODD_CASES[:8], ids=str)
def test_native_static_quantize_matches_reference(isa, scheme, shape, granularity):
    x = torch.randn(shape).bfloat16()
    params = quantize(x * 0.5, 8, scheme, **granularity)  # half the range: many values clamp
    scale = params.scale.clone()
    scale.view(-1)[0] = 0.0  # one group that codes everything as its zero point
    with cpu_isa(isa):
        native = run("native", fake_quantize, x, 8, scheme, scale=scale, zero_point=params.zero_point, **granularity)
    reference = run("reference", fake_quantize, x, 8, scheme, scale=scale, zero_point=params.zero_point, **granularity)
    assert torch.equal(native, reference)


# ---- observers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("axis", [None, 1])
def test_minmax_observer_over_batches_equals_the_concatenation(scheme, axis):
    batches = [torch.randn(6, 10) * s + s for s in (0.5, 2.0, 1.0)]
    observer = MinMaxObserver(8, scheme, axis)
    for batch in batches:
        observer.observe(batch)
    everything = torch.cat(batches)
    dynamic = quantize(everything, 8, scheme, axis=axis)
    scale, zero_point = observer.quant_params()
    assert torch.equal(scale, dynamic.scale)
    if scheme == "zeropoint":
        assert torch.equal(zero_point, dynamic.zero_point)
        check_same(observer.quantize(everything), dynamic)  # static coding of the zeropoint scheme is the dynamic one
    else:
        assert zero_point is None
        assert (observer.quantize(everything).codes.int() - dynamic.codes.int()).abs().max() <= 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_percentile_observer_clips_an_outlier(scheme):
    percentile, minmax = PercentileObserver(8, scheme, percentile=99.0), MinMaxObserver(8, scheme)
    for _ in range(3):
        batch = torch.randn(2000)
        batch[17] = 1000.0
        percentile.observe(batch)
        minmax.observe(batch)
    assert percentile.quant_params()[0] < minmax.quant_params()[0] / 100
    qt = percentile.quantize(torch.tensor([1000.0, -1000.0, 0.0]))
    qmin, qmax = (-127, 127) if scheme == "absmax" else (0, 255)
    assert qt.codes.int().tolist()[:2] == [qmax, qmin]  # clamped to the calibrated range
    assert dequantize(qt)[0] < 10


def test_observer_needs_a_batch_and_matching_channels():
    observer = MinMaxObserver(axis=0)
    with pytest.raises(RuntimeError, match="observe"):
        observer.quant_params()
    observer.observe(torch.randn(4, 3))
    with pytest.raises(ValueError, match="channels"):
        observer.observe(torch.randn(5, 3))


# ---- fake_quantize ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fake_quantize_is_dequantize_of_quantize(backend, granularity, scheme):
    x = torch.randn(9, 70).bfloat16()
    expected = run(backend, lambda: dequantize(quantize(x, 8, scheme, **granularity)))
    assert torch.equal(run(backend, fake_quantize, x, 8, scheme, **granularity), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_gradient_matches_torch_fake_quantize(backend):
    x = (torch.linspace(-3, 3, 301) + 0.003).requires_grad_()
    y = run(backend, fake_quantize, x, 8, "absmax", scale=torch.tensor(1 / 64))
    y.backward(torch.full_like(x, 2.0))
    inside = x.detach().abs() <= 127.5 / 64
    assert torch.equal(x.grad, 2.0 * inside)
    assert 0 < inside.sum() < x.numel()
    x_torch = x.detach().clone().requires_grad_()
    y_torch = torch.fake_quantize_per_tensor_affine(x_torch, 1 / 64, 0, -127, 127)
    y_torch.backward(torch.full_like(x, 2.0))
    assert torch.equal(y, y_torch.detach()) and torch.equal(x.grad, x_torch.grad)


def test_dynamic_fake_quantize_passes_every_finite_gradient():
    x = torch.randn(6, 50, requires_grad=True)
    fake_quantize(x, 4, "zeropoint", axis=0).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fake_quantize_gradcheck_fp64():
    # The straight-through gradient is by design not the derivative of the (piecewise constant) forward, so
    # gradcheck checks the backward map dy -> dx = dy * mask in fp64 against its numerical Jacobian.
    x = (torch.randn(5, 8, dtype=torch.float64) * 2).requires_grad_()
    scale = torch.full((5,), 1 / 64)
    dy = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)

    def backward_map(grad_out):
        y = fake_quantize(x, 8, "absmax", axis=0, scale=scale)
        assert y.dtype == torch.float64
        return torch.autograd.grad(y, x, grad_out, create_graph=True)[0]

    assert torch.autograd.gradcheck(backward_map, (dy,))
    assert torch.autograd.gradgradcheck(lambda v: fake_quantize(v, 8, "zeropoint", blocksize=8), (x,))


def test_fake_quantize_compiles_fullgraph():
    class FakeQuantizedLinear(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.linear(x, fake_quantize(self.weight, 8, "absmax", axis=0), self.bias)

    layer = FakeQuantizedLinear(32, 16)
    x = torch.randn(4, 32)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer(x))
    assert layer.weight.grad is not None and torch.equal(layer.weight.grad, torch.ones(16, 4) @ x)


# ---- ops -------------------------------------------------------------------------------------------------------


def test_quantize_ops_opcheck():
    ops = torch.ops.pyfastpeft
    x = torch.randn(6, 10)
    for zeropoint in (False, True):
        for axis, blocksize in ((-1, 0), (0, 0), (1, 0), (-1, 16)):
            codes, scale, zero_point = ops.quantize_affine(x, 8, zeropoint, axis, blocksize)
            torch.library.opcheck(ops.quantize_affine.default, (x, 8, zeropoint, axis, blocksize))
            torch.library.opcheck(ops.quantize_static.default, (x, scale, zero_point, 4, zeropoint, axis, blocksize))
            torch.library.opcheck(
                ops.dequantize_affine.default, (codes, scale, zero_point, axis, blocksize, torch.bfloat16)
            )


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(bits=6), ValueError, "bits"),
        (dict(bits=True), ValueError, "bits"),
        (dict(scheme="minmax"), ValueError, "scheme"),
        (dict(axis=2), ValueError, "axis"),
        (dict(axis=-3), ValueError, "axis"),
        (dict(axis=1.0), TypeError, "axis"),
        (dict(axis=0, blocksize=4), ValueError, "axis and blocksize"),
        (dict(blocksize=0), ValueError, "blocksize"),
        (dict(blocksize=-8), ValueError, "blocksize"),
    ],
    ids=str,
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    x = torch.randn(4, 4)
    with pytest.raises(error, match=match):
        quantize(x, **kwargs)
    with pytest.raises(error, match=match):
        fake_quantize(x, **kwargs)


def test_bad_tensors_and_static_params_raise():
    with pytest.raises(TypeError, match="x must have dtype"):
        quantize(torch.arange(4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="qt"):
        dequantize(torch.zeros(3))
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="scale must have shape"):
        fake_quantize(x, axis=0, scale=torch.ones(6))
    with pytest.raises(ValueError, match="needs zero_point"):
        fake_quantize(x, scheme="zeropoint", scale=0.1)
    with pytest.raises(ValueError, match="takes no zero_point"):
        fake_quantize(x, scale=0.1, zero_point=3)
    with pytest.raises(ValueError, match="without scale"):
        fake_quantize(x, zero_point=3)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=0)
    with pytest.raises(ValueError, match="bits"):
        MinMaxObserver(bits=16)


def test_quantize_is_exported_from_the_package():
    assert pyfastpeft.quant.quantize is quantize and pyfastpeft.quant.QuantizedTensor is QuantizedTensor
