"""Property-based fuzz of every op family: the native backend against the reference on drawn shapes (0 and odd
sizes included), layouts (storage offsets, padded rows, stepped and transposed views) and dtypes, forward and
backward, with the tolerances of the family's own tests. Elements of an input's storage outside its view hold
NaN (or a sentinel code), so a kernel that reads past its view shows it; no input's storage may change.

CI-sized and reproducible: a fixed number of derandomized examples per property; FUZZ_EXAMPLES=<n> searches
longer on a workstation."""

import os

import pytest
import torch
from helpers import TOLERANCES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyfastpeft
from pyfastpeft.functional import (
    apply_rotary_pos_emb,
    fused_linear_cross_entropy,
    fused_linear_distillation,
    int8_linear,
    lora_linear,
    nf4_linear,
    rms_norm,
    scaled_dot_product_attention,
    swiglu,
)
from pyfastpeft.quant import (
    dequantize,
    dequantize_nf4,
    fake_quantize,
    int8_colwise_quant,
    int8_matmul,
    int8_mm_dequant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    quantize,
    quantize_int8_weight,
    quantize_nf4,
)

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Sums over many terms (matrix products, reductions over rows): the error is relative to the largest magnitude.
SCALED_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LAYOUTS = ("contiguous", "offset", "padded", "stepped", "transposed")
sizes = st.integers(0, 5)  # leading dims, 0 included


# ---- inputs ------------------------------------------------------------------------------------------------


@st.composite
def laid_out(draw, values: torch.Tensor, layouts=LAYOUTS) -> torch.Tensor:
    """values copied into a drawn view of a larger storage whose other elements hold NaN (-77 for integers)."""
    shape = tuple(values.shape)
    layout = draw(st.sampled_from(layouts)) if shape else "contiguous"
    fill = float("nan") if values.is_floating_point() else -77

    def storage(alloc_shape):
        return torch.full(alloc_shape, fill, dtype=values.dtype)

    if layout == "offset":
        offset = draw(st.integers(1, 9))
        view = storage((offset + values.numel() + draw(st.integers(0, 3)),))[offset : offset + values.numel()]
        view = view.view(shape)
    elif layout == "padded":  # rows that start past a gap, as a slice [..., a:a + n] of wider rows
        start, pad = draw(st.integers(0, 3)), draw(st.integers(1, 5))
        view = storage(shape[:-1] + (start + shape[-1] + pad,))[..., start : start + shape[-1]]
    elif layout == "stepped":
        view = storage(shape[:-1] + (2 * shape[-1],))[..., 1::2]
    elif layout == "transposed" and len(shape) >= 2:
        dims = list(range(len(shape)))
        first = draw(st.integers(0, len(shape) - 2))
        dims[first], dims[-1] = dims[-1], dims[first]
        view = storage(tuple(shape[d] for d in dims)).permute(dims)
    else:
        view = storage(shape)
    view.copy_(values)
    return view


def randn(shape, dtype, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(dtype)


seeds = st.integers(0, 2**31 - 1)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).clone()


class Unchanged:
    """Checks that no input's storage (view and surroundings) was written."""

    def __init__(self, *tensors):
        self.tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        self.before = [storage_bytes(t) for t in self.tensors]

    def check(self):
        for t, before in zip(self.tensors, self.before):
            assert torch.equal(storage_bytes(t), before), f"an input {tuple(t.shape)} {t.dtype} was written"


def on(backend, fn, *args, **kwargs):
    with pyfastpeft.use_backend(backend):
        return fn(*args, **kwargs)


def on_both(fn):
    """(fn("native"), fn("reference")), or None when both backends reject the input with the same clear error
    (a ValueError or TypeError: inputs like a 0-feature x that the op refuses by contract)."""
    results, errors = {}, {}
    for backend in ("reference", "native"):
        try:
            results[backend] = fn(backend)
        except (ValueError, TypeError) as exc:
            errors[backend] = exc
    if errors:
        assert set(errors) == {"reference", "native"}, f"only one backend raised: {errors}"
        assert type(errors["native"]) is type(errors["reference"]), errors
        return None
    return results["native"], results["reference"]


def close(actual, expected, dtype=None, **tolerance):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        actual.shape,
        expected.shape,
        actual.dtype,
        expected.dtype,
    )
    torch.testing.assert_close(actual, expected, **(tolerance or TOLERANCES[dtype or expected.dtype]), equal_nan=True)


def close_scaled(actual, expected, dtype, floor=1e-30, tolerance_dtype=None):
    """max |actual - expected| <= tol * max(max |expected|, floor): sums whose error grows with their terms'
    magnitude; floor is the magnitude of the terms where they can cancel to 0. tol is dtype's, or
    tolerance_dtype's where another input's precision bounds the result."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        actual.shape,
        expected.shape,
        actual.dtype,
        expected.dtype,
    )
    if expected.numel():
        error = (actual.double() - expected.double()).abs().max().item()
        scale = expected.double().abs().max().item()
        assert error <= SCALED_TOLERANCE[tolerance_dtype or dtype] * max(scale, floor), (error, scale)


def grads(backend, fn, leaves, seed=None):
    """fn()'s output on backend and the gradients of leaves (None where one gets none) for a fixed random dy;
    torch's generator seeded first when seed is given (LoRA dropout draws its mask from it)."""
    for t in leaves:
        t.grad = None
    if seed is not None:
        torch.manual_seed(seed)
    with pyfastpeft.use_backend(backend):
        y = fn()
        if y.requires_grad:
            y.backward(randn(y.shape, y.dtype, 1234))
    return y.detach(), [None if t.grad is None else t.grad.clone() for t in leaves]


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """t (a view of a storage that needs no grad) as an autograd leaf."""
    return t.requires_grad_(requires_grad)


# ---- rmsnorm, swiglu, rope -----------------------------------------------------------------------------------


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    lead=st.lists(sizes, max_size=2),
    n=st.integers(1, 300),  # 0: test_rms_norm_backward_of_no_features
    mode=st.sampled_from([("llama", 0.0), ("gemma", 1.0), ("none", 0.0), ("llama", 0.5)]),
    fp32_weight=st.booleans(),
    weight_grad=st.booleans(),
    seed=seeds,
)
def test_rms_norm(data, dtype, lead, n, mode, fp32_weight, weight_grad, seed):
    casting_mode, offset = mode
    weight_dtype = torch.float32 if fp32_weight and dtype in LOW_PRECISION else dtype
    x = leaf(data.draw(laid_out(randn((*lead, n), dtype, seed, 3.0))))
    w = leaf(data.draw(laid_out(randn((n,), weight_dtype, seed + 1, 0.5, 1.0))), weight_grad)
    unchanged = Unchanged(x, w)
    results = on_both(lambda backend: grads(backend, lambda: rms_norm(x, w, 1e-6, offset, casting_mode), [x, w]))
    unchanged.check()
    if results is None:
        return
    (y, (dx, dw)), (y_ref, (dx_ref, dw_ref)) = results
    close(y, y_ref, dtype)  # fp32 y of a 16-bit x (fp32 weight) rounds the normalized row to x's dtype first
    close(dx, dx_ref)
    assert (dw is None) == (dw_ref is None)
    if dw is not None:  # a sum over rows
        close_scaled(dw, dw_ref, weight_dtype)


@FUZZ
@given(data=st.data(), dtype=st.sampled_from(FLOATS), shape=st.lists(st.integers(0, 70), max_size=3), seed=seeds)
def test_swiglu(data, dtype, shape, seed):
    gate = leaf(data.draw(laid_out(randn(shape, dtype, seed, 4.0))))
    up = leaf(data.draw(laid_out(randn(shape, dtype, seed + 1))))
    unchanged = Unchanged(gate, up)
    results = on_both(lambda backend: grads(backend, lambda: swiglu(gate, up), [gate, up]))
    unchanged.check()
    if results is None:
        return
    (y, (dg, du)), (y_ref, (dg_ref, du_ref)) = results
    close(y, y_ref)
    close(dg, dg_ref)
    close(du, du_ref)


@st.composite
def hf_layout(draw, values):
    """q or k as HF attention hands them over (a transposed view of [B, S, H, D]), or any drawn layout."""
    if draw(st.booleans()):
        return draw(laid_out(values))
    view = torch.full(values.transpose(1, 2).shape, float("nan"), dtype=values.dtype).transpose(1, 2)
    return view.copy_(values)


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    batch=st.integers(0, 2),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    seq=st.integers(0, 6),
    half_dim=st.integers(1, 40),
    interleaved=st.booleans(),
    positions=st.booleans(),
    seed=seeds,
)
def test_rope(data, dtype, batch, kv_heads, group, seq, half_dim, interleaved, positions, seed):
    dim = 2 * half_dim
    rot = 2 * data.draw(st.integers(1, half_dim))  # partial rotary below dim
    q = leaf(data.draw(hf_layout(randn((batch, kv_heads * group, seq, dim), dtype, seed))))
    k = leaf(data.draw(hf_layout(randn((batch, kv_heads, seq, dim), dtype, seed + 1))))
    if positions:  # a table of positions indexed by position_ids [B, S]
        table = data.draw(st.integers(1, 8))
        angles = randn((table, rot), torch.float32, seed + 2, 3.0)
        position_ids = torch.randint(0, table, (batch, seq), generator=torch.Generator().manual_seed(seed))
    else:
        angles = randn((batch, seq, rot), torch.float32, seed + 2, 3.0)
        position_ids = None
    cos = data.draw(laid_out(angles.cos().to(dtype)))
    sin = data.draw(laid_out(angles.sin().to(dtype)))
    unchanged = Unchanged(q, k, cos, sin)

    def forward_backward(backend):
        q.grad = k.grad = None
        with pyfastpeft.use_backend(backend):
            q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved, position_ids=position_ids)
            dq, dk = randn(q_out.shape, dtype, 7), randn(k_out.shape, dtype, 8)
            torch.autograd.backward((q_out, k_out), (dq, dk))
        return q_out.detach(), k_out.detach(), q.grad, k.grad

    results = on_both(forward_backward)
    unchanged.check()
    if results is None:
        return
    for got, want in zip(*results):
        close(got, want)


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    batch=st.integers(0, 2),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    q_len=st.integers(0, 70),
    kv_len=st.integers(0, 70),
    dim=st.integers(1, 40),
    causal=st.booleans(),
    seed=seeds,
)
def test_attention(data, dtype, batch, kv_heads, group, q_len, kv_len, dim, causal, seed):
    """Sequences across the kernel's 64-wide blocks, causal masks with q_len != kv_len, HF's transposed views."""
    q = leaf(data.draw(hf_layout(randn((batch, kv_heads * group, q_len, dim), dtype, seed))))
    k = leaf(data.draw(hf_layout(randn((batch, kv_heads, kv_len, dim), dtype, seed + 1))))
    v = leaf(data.draw(hf_layout(randn((batch, kv_heads, kv_len, dim), dtype, seed + 2))))
    unchanged = Unchanged(q, k, v)

    def forward_backward(backend):
        q.grad = k.grad = v.grad = None
        with pyfastpeft.use_backend(backend):
            out = scaled_dot_product_attention(q, k, v, is_causal=causal)
            out.backward(randn(out.shape, dtype, 7))
        return out.detach(), q.grad, k.grad, v.grad

    results = on_both(forward_backward)
    unchanged.check()
    if results is None:
        return
    for got, want in zip(*results):
        close_scaled(got, want, dtype, floor=1.0)


# ---- nf4 -----------------------------------------------------------------------------------------------------


def nf4_states_equal(ours, ref):
    assert torch.equal(ours.absmax, ref.absmax) and torch.equal(ours.code, ref.code)
    assert (ours.shape, ours.blocksize, ours.quant_type, ours.dtype) == (
        ref.shape,
        ref.blocksize,
        ref.quant_type,
        ref.dtype,
    )
    assert ours.nested == ref.nested
    if ours.nested:
        assert torch.equal(ours.offset, ref.offset)
        nf4_states_equal(ours.state2, ref.state2)


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    out_features=st.integers(0, 40),
    in_features=st.integers(0, 150),
    blocksize=st.sampled_from([32, 64, 128, 256, 4096]),
    double_quant=st.booleans(),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    seed=seeds,
)
def test_nf4_quantize_and_dequantize(data, dtype, out_features, in_features, blocksize, double_quant, quant_type, seed):
    w = data.draw(laid_out(randn((out_features, in_features), dtype, seed)))
    unchanged = Unchanged(w)
    (packed, state), (packed_ref, state_ref) = on_both(
        lambda backend: on(backend, quantize_nf4, w, blocksize, double_quant, quant_type)
    )
    unchanged.check()
    assert torch.equal(packed, packed_ref)
    nf4_states_equal(state, state_ref)
    packed_view = data.draw(laid_out(packed_ref))
    unchanged = Unchanged(packed_view, state_ref.absmax)
    close(*on_both(lambda backend: on(backend, dequantize_nf4, packed_view, state_ref)), rtol=0, atol=0)
    unchanged.check()


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    lead=st.lists(sizes, min_size=1, max_size=2),
    out_features=st.integers(1, 40),  # 0: test_a_layer_of_no_output_features_is_refused_on_every_backend
    in_features=st.integers(1, 150),  # 0: test_nf4_linear_of_no_input_features
    blocksize=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    bias=st.booleans(),
    seed=seeds,
)
def test_nf4_linear(data, dtype, lead, out_features, in_features, blocksize, double_quant, bias, seed):
    packed, state = quantize_nf4(randn((out_features, in_features), torch.float32, seed), blocksize, double_quant)
    x = leaf(data.draw(laid_out(randn((*lead, in_features), dtype, seed + 1))))
    b = leaf(data.draw(laid_out(randn((out_features,), dtype, seed + 2)))) if bias else None
    leaves = [x] + ([b] if bias else [])
    unchanged = Unchanged(x, b, packed)
    results = on_both(lambda backend: grads(backend, lambda: nf4_linear(x, packed, state, b), leaves))
    unchanged.check()
    if results is None:
        return
    (y, g), (y_ref, g_ref) = results
    close_scaled(y, y_ref, dtype)
    for ours, ref in zip(g, g_ref):
        close_scaled(ours, ref, dtype)


# ---- int8 ----------------------------------------------------------------------------------------------------


def inner_dims(largest):
    """Inner dims 0 and 1..largest (K == 1 once met a torch._int_mm bug: test_int8_matmul_of_one_input_column)."""
    return st.one_of(st.just(0), st.integers(1, largest))


@st.composite
def with_outliers(draw, shape, dtype, seed):
    """N(0, 1) values, some columns scaled past the LLM.int8 threshold, rarely a NaN or an inf."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if shape[-1]:
        for column in draw(st.lists(st.integers(0, shape[-1] - 1), max_size=3)):
            values[..., column] *= draw(st.sampled_from([4.0, 10.0, 100.0]))
        if values.numel() and draw(st.integers(0, 9)) == 0:
            values.view(-1)[draw(st.integers(0, values.numel() - 1))] = draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf")])
            )
    return values.to(dtype)


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    lead=st.lists(sizes, min_size=1, max_size=2),
    k=st.integers(1, 300),
    threshold=st.sampled_from([0.0, 6.0, 0.5, 2.5]),
    seed=seeds,
)
def test_int8_vectorwise_and_colwise_quant(data, dtype, lead, k, threshold, seed):
    x = data.draw(laid_out(data.draw(with_outliers((*lead, k), dtype, seed))))
    unchanged = Unchanged(x)
    for quant in (int8_vectorwise_quant, int8_colwise_quant):
        (q, stats, cols), (q_ref, stats_ref, cols_ref) = on_both(lambda backend: on(backend, quant, x, threshold))
        assert torch.equal(q, q_ref)
        close(stats, stats_ref, rtol=0, atol=0)
        assert (cols is None) == (cols_ref is None)
        if cols is not None:
            assert torch.equal(cols, cols_ref)
    unchanged.check()
    q, stats, _ = on("reference", int8_vectorwise_quant, x, 0.0)
    q_view, stats_view = data.draw(laid_out(q)), data.draw(laid_out(stats))
    unchanged = Unchanged(q_view, stats_view)
    for axis in (0, 1):
        stats_axis = stats_view if axis == 0 else data.draw(laid_out(randn((k,), torch.float32, seed).abs()))
        close(*on_both(lambda backend: on(backend, int8_vectorwise_dequant, q_view, stats_axis, axis)))
    unchanged.check()


@FUZZ
@given(
    data=st.data(),
    m=st.integers(0, 20),
    n=st.integers(0, 40),
    k=inner_dims(300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    bias=st.booleans(),
    seed=seeds,
)
def test_int8_matmul_and_mm_dequant(data, m, n, k, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    a = data.draw(laid_out(torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)))
    b = data.draw(laid_out(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)))
    unchanged = Unchanged(a, b)
    c, c_ref = on_both(lambda backend: on(backend, int8_matmul, a, b))
    assert torch.equal(c, c_ref)
    unchanged.check()
    c = data.draw(laid_out(c))
    row_stats = data.draw(laid_out(torch.rand(m, generator=g) * 4))
    col_stats = data.draw(laid_out(torch.rand(n, generator=g) * 4))
    b_vec = data.draw(laid_out(randn((n,), dtype, seed))) if bias else None
    unchanged = Unchanged(c, row_stats, col_stats, b_vec)
    close(*on_both(lambda backend: on(backend, int8_mm_dequant, c, row_stats, col_stats, dtype, b_vec)))
    unchanged.check()


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    lead=st.lists(sizes, min_size=1, max_size=2),
    out_features=st.integers(1, 40),  # 0: test_a_layer_of_no_output_features_is_refused_on_every_backend
    in_features=inner_dims(200),
    threshold=st.sampled_from([0.0, 6.0, 1.5]),
    bias=st.booleans(),
    seed=seeds,
)
def test_int8_linear(data, dtype, lead, out_features, in_features, threshold, bias, seed):
    if in_features:
        codes, weight_stats = quantize_int8_weight(randn((out_features, in_features), torch.float32, seed))
    else:
        codes, weight_stats = torch.zeros((out_features, 0), dtype=torch.int8), torch.ones(out_features)
    codes, weight_stats = data.draw(laid_out(codes)), data.draw(laid_out(weight_stats))
    x = leaf(data.draw(laid_out(randn((*lead, in_features), dtype, seed + 1, 2.0))))
    b = leaf(data.draw(laid_out(randn((out_features,), dtype, seed + 2)))) if bias else None
    leaves = [x] + ([b] if bias else [])
    unchanged = Unchanged(x, b, codes, weight_stats)
    results = on_both(lambda backend: grads(backend, lambda: int8_linear(x, codes, weight_stats, b, threshold), leaves))
    unchanged.check()
    if results is None:
        return
    (y, g), (y_ref, g_ref) = results
    close_scaled(y, y_ref, dtype)
    for ours, ref in zip(g, g_ref):
        close_scaled(ours, ref, dtype)


# ---- general affine quantization ------------------------------------------------------------------------------


@st.composite
def granularities(draw, shape):
    kind = draw(st.sampled_from(["tensor", "axis", "block"] if shape else ["tensor", "block"]))
    if kind == "axis":
        return dict(axis=draw(st.integers(-len(shape), len(shape) - 1)))
    if kind == "block":
        return dict(blocksize=draw(st.integers(1, 70)))
    return dict()


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    shape=st.lists(st.integers(0, 40), max_size=3),
    bits=st.sampled_from([4, 8]),
    scheme=st.sampled_from(["absmax", "zeropoint"]),
    nan=st.booleans(),
    seed=seeds,
)
def test_quantize_dequantize_and_fake_quantize(data, dtype, shape, bits, scheme, nan, seed):
    granularity = data.draw(granularities(shape))
    values = randn(shape, dtype, seed, 4.0, data.draw(st.sampled_from([0.0, 1.0])))
    if nan and values.numel() > 3:
        values.view(-1)[3] = float("nan")  # one poisoned group
    x = leaf(data.draw(laid_out(values)))
    unchanged = Unchanged(x)
    results = on_both(lambda backend: on(backend, quantize, x, bits, scheme, **granularity))
    if results is None:
        unchanged.check()
        return
    qt, qt_ref = results
    assert torch.equal(qt.codes, qt_ref.codes)
    close(qt.scale, qt_ref.scale, rtol=0, atol=0)
    assert (qt.zero_point is None) == (qt_ref.zero_point is None)
    if qt.zero_point is not None:
        assert torch.equal(qt.zero_point, qt_ref.zero_point)
    close(*on_both(lambda backend: on(backend, dequantize, qt_ref)), rtol=0, atol=0)
    results = on_both(lambda backend: grads(backend, lambda: fake_quantize(x, bits, scheme, **granularity), [x]))
    unchanged.check()
    (y, (dx,)), (y_ref, (dx_ref,)) = results
    close(y, y_ref, rtol=0, atol=0)
    close(dx, dx_ref, rtol=0, atol=0)


# ---- lora ----------------------------------------------------------------------------------------------------


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    lead=st.lists(sizes, min_size=1, max_size=2),
    in_features=st.integers(0, 70),
    out_features=st.integers(1, 40),  # 0: test_a_layer_of_no_output_features_is_refused_on_every_backend
    rank=st.integers(0, 16),
    base=st.sampled_from(["dense", "nf4", "int8"]),
    bias=st.sampled_from([None, "grad", "frozen"]),
    dropout_p=st.sampled_from([0.0, 0.25, 0.6]),
    training=st.booleans(),
    scaling=st.sampled_from([0.5, 2.0, 16.0]),
    seed=seeds,
)
def test_lora_linear(
    data, dtype, lead, in_features, out_features, rank, base, bias, dropout_p, training, scaling, seed
):
    dense = randn((out_features, in_features), torch.float32, seed, max(in_features, 1) ** -0.5)
    if base == "dense":
        weight = data.draw(laid_out(dense.to(dtype)))
        base_tensors = [weight]
    elif base == "nf4":
        weight = quantize_nf4(dense.to(dtype), blocksize=64)
        base_tensors = [weight[0]]
    elif in_features:
        weight = tuple(data.draw(laid_out(t)) for t in quantize_int8_weight(dense))
        base_tensors = list(weight)
    else:
        weight = (torch.zeros((out_features, 0), dtype=torch.int8), torch.ones(out_features))
        base_tensors = list(weight)
    x = leaf(data.draw(laid_out(randn((*lead, in_features), dtype, seed + 1))))
    lora_A = leaf(data.draw(laid_out(randn((rank, in_features), dtype, seed + 2, max(in_features, 1) ** -0.5))))
    lora_B = leaf(data.draw(laid_out(randn((out_features, rank), dtype, seed + 3, max(rank, 1) ** -0.5 / scaling))))
    b = None if bias is None else leaf(data.draw(laid_out(randn((out_features,), dtype, seed + 4))), bias == "grad")
    leaves = [t for t in (x, b, lora_A, lora_B) if t is not None]
    unchanged = Unchanged(x, b, lora_A, lora_B, *base_tensors)
    results = on_both(
        lambda backend: grads(
            backend, lambda: lora_linear(x, weight, b, lora_A, lora_B, scaling, dropout_p, training), leaves, seed=seed
        )
    )
    unchanged.check()
    if results is None:
        return
    (y, g), (y_ref, g_ref) = results
    # y = x W^T + b + s (x_d A^T) B^T is a sum whose terms each round to the dtype: where they cancel, an element
    # is off by roundings of the terms, not of itself (bf16: 0.022 at |y| 0.1 beside terms near 3)
    close_scaled(y, y_ref, dtype)
    for ours, ref in zip(g, g_ref):
        assert (ours is None) == (ref is None)
        if ours is not None:  # dA, dB and dbias sum over rows
            close_scaled(ours, ref, dtype)


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    lead=st.lists(st.integers(0, 4), min_size=1, max_size=2),  # 0 to 16 rows: both sides of the GEMV's 8
    in_features=st.integers(0, 70),
    out_features=st.integers(1, 40),
    rank=st.integers(0, 16),
    bias=st.booleans(),
    dropout_p=st.sampled_from([0.0, 0.25]),
    training=st.booleans(),
    seed=seeds,
)
def test_lora_linear_over_nf4_without_grad(data, dtype, lead, in_features, out_features, rank, bias, dropout_p,
                                           training, seed):  # fmt: skip
    """The decode step of a LoRA layer over NF4 at inference: nothing to differentiate, so a few contiguous rows
    run the kernel without the op's dispatch (ops/lora.py: lora_nf4_no_grad); any other layout takes the op."""
    scaling = 2.0
    dense = randn((out_features, in_features), torch.float32, seed, max(in_features, 1) ** -0.5)
    weight = quantize_nf4(dense.to(dtype), blocksize=64)
    x = data.draw(laid_out(randn((*lead, in_features), dtype, seed + 1)))
    lora_A = data.draw(laid_out(randn((rank, in_features), dtype, seed + 2, max(in_features, 1) ** -0.5)))
    lora_B = data.draw(laid_out(randn((out_features, rank), dtype, seed + 3, max(rank, 1) ** -0.5 / scaling)))
    b = data.draw(laid_out(randn((out_features,), dtype, seed + 4))) if bias else None
    unchanged = Unchanged(x, b, lora_A, lora_B, weight[0])

    def decode(backend):
        torch.manual_seed(seed)
        with torch.no_grad():
            return on(backend, lora_linear, x, weight, b, lora_A, lora_B, scaling, dropout_p, training)

    results = on_both(decode)
    unchanged.check()
    if results is not None:
        close_scaled(*results, dtype)


# ---- fused linear cross-entropy -------------------------------------------------------------------------------


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    lead=st.lists(st.integers(0, 12), min_size=1, max_size=2),
    hidden=st.integers(1, 48),  # 0: test_flce_of_no_hidden_features
    vocab=st.integers(1, 150),
    bias=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    softcap=st.sampled_from([None, 5.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    chunk_size=st.sampled_from([None, 1, 5, 16]),
    ignored=st.floats(0.0, 1.0),
    class_weighted=st.booleans(),
    lse_square_scale=st.sampled_from([0.0, 1e-3]),
    seed=seeds,
)
def test_fused_linear_cross_entropy(
    data,
    dtype,
    lead,
    hidden,
    vocab,
    bias,
    label_smoothing,
    softcap,
    reduction,
    chunk_size,
    ignored,
    class_weighted,
    lse_square_scale,
    seed,
):
    h = leaf(data.draw(laid_out(randn((*lead, hidden), dtype, seed))))
    w = leaf(data.draw(laid_out(randn((vocab, hidden), dtype, seed + 1, 2 * hidden**-0.5))))
    b = leaf(data.draw(laid_out(randn((vocab,), dtype, seed + 2, 0.5)))) if bias else None
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, tuple(lead), generator=g)
    labels[torch.rand(tuple(lead), generator=g) < ignored] = -100
    labels = data.draw(laid_out(labels))
    class_weight = data.draw(laid_out(torch.rand(vocab, generator=g) + 0.5)) if class_weighted else None
    leaves = [t for t in (h, w, b) if t is not None]
    unchanged = Unchanged(h, w, b, labels)

    def forward_backward(backend):
        for t in leaves:
            t.grad = None
        with pyfastpeft.use_backend(backend):
            loss, lse = fused_linear_cross_entropy(
                h,
                w,
                labels,
                b,
                label_smoothing=label_smoothing,
                softcap=softcap,
                reduction=reduction,
                return_lse=True,
                chunk_size=chunk_size,
                class_weight=class_weight,
                lse_square_scale=lse_square_scale,
            )
            loss.backward(torch.rand(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(1)) + 0.5)
        return [loss.detach(), lse] + [t.grad for t in leaves]

    results = on_both(forward_backward)
    unchanged.check()
    if results is None:
        return
    for ours, ref in zip(*results):
        # a loss of one class (or of logits all equal) is lse - logit, exactly 0 in the reference and a rounding
        # of the logits' size here
        close_scaled(ours, ref, dtype, floor=0.1)


# ---- fused linear distillation --------------------------------------------------------------------------------


@FUZZ
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    lead=st.lists(st.integers(0, 12), min_size=1, max_size=2),
    student_hidden=st.integers(1, 40),
    teacher_hidden=st.integers(1, 40),
    vocab=st.integers(1, 150),
    bias=st.booleans(),
    loss=st.sampled_from(["kl", "reverse_kl", "jsd"]),
    beta=st.sampled_from([0.0, 0.3, 1.0]),
    temperature=st.sampled_from([1.0, 2.5]),
    hard_label_weight=st.sampled_from([0.0, 0.4]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    chunk_size=st.sampled_from([None, 1, 5, 16]),
    ignored=st.floats(0.0, 1.0),
    seed=seeds,
)
def test_fused_linear_distillation(
    data,
    dtype,
    lead,
    student_hidden,
    teacher_hidden,
    vocab,
    bias,
    loss,
    beta,
    temperature,
    hard_label_weight,
    reduction,
    chunk_size,
    ignored,
    seed,
):
    h = leaf(data.draw(laid_out(randn((*lead, student_hidden), dtype, seed))))
    w = leaf(data.draw(laid_out(randn((vocab, student_hidden), dtype, seed + 1, 2 * student_hidden**-0.5))))
    b = leaf(data.draw(laid_out(randn((vocab,), dtype, seed + 2, 0.5)))) if bias else None
    t_dtype = data.draw(st.sampled_from(FLOATS))  # the teacher's dtype is its own
    g_t = data.draw(laid_out(randn((*lead, teacher_hidden), t_dtype, seed + 3)))
    u = data.draw(laid_out(randn((vocab, teacher_hidden), t_dtype, seed + 4, 2 * teacher_hidden**-0.5)))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, tuple(lead), generator=gen)
    labels[torch.rand(tuple(lead), generator=gen) < ignored] = -100
    labels = data.draw(laid_out(labels))
    leaves = [t for t in (h, w, b) if t is not None]
    unchanged = Unchanged(h, w, b, g_t, u, labels)

    def forward_backward(backend):
        for t in leaves:
            t.grad = None
        with pyfastpeft.use_backend(backend):
            value = fused_linear_distillation(
                h,
                w,
                g_t,
                u,
                labels,
                loss=loss,
                beta=beta,
                temperature=temperature,
                hard_label_weight=hard_label_weight,
                student_bias=b,
                reduction=reduction,
                chunk_size=chunk_size,
            )
            value.backward(torch.rand(value.shape, dtype=value.dtype, generator=torch.Generator().manual_seed(1)) + 0.5)
        return [value.detach()] + [t.grad for t in leaves]

    results = on_both(forward_backward)
    unchanged.check()
    if results is None:
        return
    # on the CPU a half-precision teacher's logits round to its dtype (as its lm_head's output would)
    coarser = max(dtype, t_dtype, key=lambda d: torch.finfo(d).eps)
    for ours, ref in zip(*results):
        close_scaled(ours, ref, dtype, floor=0.1, tolerance_dtype=coarser)


# ---- what the properties above found --------------------------------------------------------------------------


def test_int8_matmul_of_one_input_column():
    """torch._int_mm on the CPU returns uninitialized int32 for K == 1 and N >= 2 (torch 2.13): that size takes
    the exact product."""
    a = torch.tensor([[67]], dtype=torch.int8)
    b = torch.tensor([[-73], [106]], dtype=torch.int8)
    assert torch.equal(on("native", int8_matmul, a, b), torch.tensor([[-4891, 7102]], dtype=torch.int32))


@pytest.mark.parametrize("rows", [1, 9])
def test_int8_linear_of_one_input_feature(rows):
    codes, weight_stats = quantize_int8_weight(torch.tensor([[0.5], [-2.0], [1.0]]))
    x = torch.linspace(-1, 1, rows).view(rows, 1)
    close_scaled(
        on("native", int8_linear, x, codes, weight_stats, None, 0.0),
        on("reference", int8_linear, x, codes, weight_stats, None, 0.0),
        torch.float32,
    )


def raises_on_both_backends(call, match):
    for backend in ("reference", "native"):
        with pytest.raises(ValueError, match=match):
            on(backend, call)


def test_nf4_linear_of_no_input_features_is_refused_on_every_backend():
    packed, state = quantize_nf4(torch.randn(4, 0))
    raises_on_both_backends(lambda: nf4_linear(torch.randn(3, 0), packed, state), "both must be >= 1")


def test_flce_of_no_hidden_features_is_refused_on_every_backend():
    h, w, labels = torch.randn(3, 0), torch.randn(5, 0), torch.tensor([1, 2, 3])
    raises_on_both_backends(lambda: fused_linear_cross_entropy(h, w, labels), "hidden size")


@pytest.mark.parametrize("rows", [3, 0])
def test_rms_norm_of_no_features_is_refused_on_every_backend(rows):
    raises_on_both_backends(lambda: rms_norm(torch.randn(rows, 0), torch.ones(0)), "hidden size")


def no_output_features(base):
    x = torch.randn(3, 8, requires_grad=True)
    if base == "nf4":
        return x, lambda: nf4_linear(x, *quantize_nf4(torch.randn(0, 8)))
    if base == "int8":
        return x, lambda: int8_linear(x, torch.zeros(0, 8, dtype=torch.int8), torch.ones(0))
    lora_A, lora_B = torch.randn(2, 8, requires_grad=True), torch.randn(0, 2, requires_grad=True)
    return x, lambda: lora_linear(x, torch.randn(0, 8), None, lora_A, lora_B, 1.0)


@pytest.mark.parametrize("base", ["nf4", "int8", "lora"])
def test_a_layer_of_no_output_features_is_refused_on_every_backend(base):
    _, layer = no_output_features(base)
    raises_on_both_backends(layer, "both must be >= 1")


def test_layouts_cover_views_with_offsets_and_strides():
    """The layouts above are what they claim: a non-zero storage offset, rows not contiguous, a stride in the
    last dim, a transposed view."""
    values = torch.arange(12.0).view(3, 4)

    @given(st.data())
    @settings(max_examples=40, derandomize=True, database=None)
    def collect(data):
        view = data.draw(laid_out(values))
        assert torch.equal(view, values)
        seen.add((view.storage_offset() > 0, view.is_contiguous(), view.stride(-1)))

    seen = set()
    collect()
    assert any(offset for offset, _, _ in seen) and any(not contiguous for _, contiguous, _ in seen)
    assert {2, 3} <= {stride for _, _, stride in seen}
