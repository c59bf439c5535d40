"""LLM.int8 and vector-wise int8 quantization: exact codes, outliers, epilogue, int8_linear, Linear8bitLt."""

import pytest
import torch
from helpers import (
    BACKENDS,
    CPU_AMX,
    CPU_ISAS,
    DEVICES,
    HAS_TRITON,
    cpu_amx,
    cpu_isa,
    edge_rows,
    grads_of,
    on_device_unsupported,
    run,
    skip_unsupported,
    tiny_llama,
)
from torch import nn

import pyfastpeft
from pyfastpeft import _native
from pyfastpeft.functional import int8_linear
from pyfastpeft.nn import Linear8bitLt
from pyfastpeft.ops import int8 as int8_ops
from pyfastpeft.quant import (
    int8_colwise_quant,
    int8_double_quant,
    int8_matmul,
    int8_mm_dequant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    quantize_int8_weight,
)
from pyfastpeft.reference import int8 as int8_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 7), (5, 37), (64, 300), (9, 1024), (3, 2, 65)]


def with_outliers(shape, dtype, columns=(3,), scale=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for c in columns:
        if c < shape[-1]:
            x[..., c] *= scale
    return x.to(dtype)


def formula_rowwise(x, threshold):
    """The contract written out: stats over the non-outlier elements, codes in fp32, outlier columns zeroed."""
    x2d = x.reshape(-1, x.shape[-1]).float()
    outliers = (x2d.abs() >= threshold) if threshold > 0 else torch.zeros_like(x2d, dtype=torch.bool)
    cols = outliers.any(0).nonzero().view(-1)
    stats = x2d.abs().masked_fill(outliers, 0).amax(1)
    q = torch.round(x2d * (127.0 / stats)[:, None]).to(torch.int8)
    q[:, cols] = 0
    return q.view(x.shape), stats, cols


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorwise_quant_codes_are_exact(dtype, shape, threshold, isa):
    x = with_outliers(shape, dtype)
    expected_q, expected_stats, expected_cols = formula_rowwise(x, threshold)
    with cpu_isa(isa):
        q, stats, cols = int8_vectorwise_quant(x, threshold)
    ref_q, ref_stats, ref_cols = run("reference", int8_vectorwise_quant, x, threshold)
    assert torch.equal(q, expected_q) and torch.equal(ref_q, expected_q)
    assert torch.equal(stats, expected_stats) and torch.equal(ref_stats, expected_stats)
    if threshold == 0:
        assert cols is None and ref_cols is None
    else:
        assert torch.equal(cols, expected_cols) and torch.equal(ref_cols, expected_cols)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("shape", [(5, 37), (64, 300), (1, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_colwise_quant_matches_reference_and_formula(dtype, shape, threshold):
    x = with_outliers(shape, dtype)
    q, stats, cols = int8_colwise_quant(x, threshold)
    ref_q, ref_stats, ref_cols = run("reference", int8_colwise_quant, x, threshold)
    assert torch.equal(q, ref_q) and torch.equal(stats, ref_stats)
    x2d = x.float()
    outliers = (x2d.abs() >= threshold) if threshold > 0 else torch.zeros_like(x2d, dtype=torch.bool)
    expected_stats = x2d.abs().masked_fill(outliers, 0).amax(0)
    expected = torch.round((x2d * 127.0) / expected_stats).masked_fill(outliers, 0).to(torch.int8)
    assert torch.equal(stats, expected_stats) and torch.equal(q, expected)
    if threshold:
        assert torch.equal(cols, ref_cols)


def test_double_quant_returns_both_halves():
    x = with_outliers((16, 40), torch.float32)
    q_row, q_col, row_stats, col_stats, cols = int8_double_quant(x, 6.0)
    assert torch.equal(q_row, int8_vectorwise_quant(x, 6.0)[0]) and torch.equal(q_col, int8_colwise_quant(x, 6.0)[0])
    assert row_stats.shape == (16,) and col_stats.shape == (40,) and cols.tolist() == [3]


def test_planted_outlier_columns_are_found_and_zeroed():
    x = torch.randn(32, 128) * 0.5
    planted = [5, 77, 100]
    x[7, 5], x[0, 77], x[31, 100] = 9.0, -6.0, 100.0  # -6.0 sits on the threshold: |x| >= 6 counts
    q, stats, cols = int8_vectorwise_quant(x, 6.0)
    assert cols.tolist() == planted
    assert (q[:, planted] == 0).all()
    # the stats skip the outlier elements only (bitsandbytes), not the rest of their columns
    assert torch.equal(stats, x.abs().masked_fill(x.abs() >= 6.0, 0).amax(1))


def test_rows_of_zeros_give_zero_codes_and_no_nan():
    x = torch.randn(4, 50)
    x[1] = 0
    for backend in ("native", "reference"):
        q, stats, _ = run(backend, int8_vectorwise_quant, x)
        assert stats[1] == 0 and (q[1] == 0).all()
        q_col, col_stats, _ = run(backend, int8_colwise_quant, torch.zeros(3, 5))
        assert (q_col == 0).all() and (col_stats == 0).all()
        w, scb = quantize_int8_weight(torch.zeros(3, 8))
        out = run(backend, int8_linear, torch.zeros(2, 8), w, scb)
        assert not out.isnan().any()


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_nonfinite_inputs_code_zero_and_poison_only_their_row(backend):
    x = torch.randn(3, 40)
    x[0, 5] = float("inf")
    x[1, 7] = float("nan")
    q, stats, _ = run(backend, int8_vectorwise_quant, x)
    assert stats[0] == float("inf") and stats[1].isnan() and stats[2].isfinite()
    assert q[0, 5] == 0 and q[1, 7] == 0
    assert torch.equal(q[2], formula_rowwise(x[2:], 0.0)[0][0])
    # with the decomposition on, inf is an outlier (>= threshold), NaN is not
    q, stats, cols = run(backend, int8_vectorwise_quant, x, 6.0)
    assert cols.tolist() == [5] and stats[0].isfinite() and stats[1].isnan()


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("k", [70, 129])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorwise_quant_edge_rows_match_the_reference_on_every_isa(dtype, k, threshold, isa):
    x = edge_rows(k).to(dtype)
    expected = run("reference", int8_vectorwise_quant, x, threshold)
    with cpu_isa(isa):
        ours = run("native", int8_vectorwise_quant, x, threshold)
    assert torch.equal(ours[0], expected[0])
    torch.testing.assert_close(ours[1], expected[1], rtol=0, atol=0, equal_nan=True)
    assert (ours[2] is None and expected[2] is None) or torch.equal(ours[2], expected[2])


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("threshold", [6.0, 6.01, 1e-40, 3.4e38])
def test_bf16_values_straddling_the_threshold_give_the_reference_outliers(threshold, isa):
    """bf16 rows meet the threshold as 16-bit magnitudes (AVX-512): the bf16 values just below, at and above it (it
    need not be a bf16 itself), both signs, inf, NaN and subnormals give the reference's stats, codes and columns."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 97, generator=generator).to(torch.bfloat16)
    nearest = torch.tensor(threshold).to(torch.bfloat16).view(torch.int16).item()
    around = torch.tensor([nearest + d for d in range(-2, 3) if 0 <= nearest + d <= 0x7F80], dtype=torch.int16)
    special = torch.tensor([float("inf"), float("nan"), 1e-40, 0.0], dtype=torch.bfloat16)
    values = torch.cat((around.view(torch.bfloat16), special))
    for i, value in enumerate(values):
        x[i % 5, (7 * i + 3) % 97] = value if i % 2 else -value
    expected = run("reference", int8_vectorwise_quant, x, threshold)
    with cpu_isa(isa):
        ours = run("native", int8_vectorwise_quant, x, threshold)
    assert torch.equal(ours[0], expected[0])
    torch.testing.assert_close(ours[1], expected[1], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ours[2], expected[2])


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_outlier_product_equals_the_reference(dtype, rows, isa):
    """The CPU outlier product gathers W's outlier columns with a native kernel: the same bits as
    ref.outlier_product (W[:, cols] dequantized, then x's compute dtype), columns at both edges included."""
    codes, scb = quantize_int8_weight(torch.randn(37, 129))
    x = torch.randn(rows, 129).to(dtype)
    cols = torch.tensor([0, 5, 64, 127, 128])
    with cpu_isa(isa):
        ours = int8_ops.outlier_product(x, codes, scb, cols)
        into = int8_ops.outlier_product(x, codes, scb, cols, out=torch.empty(rows, 37))
    expected = int8_ref.outlier_product(x, codes, scb, cols)
    assert ours.dtype == torch.float32 and torch.equal(ours, expected) and torch.equal(into, expected)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_fuses_the_outlier_product(dtype, rows, isa):
    """The CPU GEMV reads W's outlier columns as it streams W (a band of rows at a time, here three bands and a
    part): its output is the one the reference's outlier product gives as an addend, up to the order of the
    outlier sums (fp32 there; rounded to bf16 after them for bf16 x, as torch's bf16 matmul does)."""
    torch.manual_seed(rows)
    codes, scb = quantize_int8_weight(torch.randn(201, 129))
    x2d = torch.randn(rows, 129)
    x2d[0, [0, 5, 64, 128]] = torch.tensor([9.0, -12.0, 7.5, 30.0])  # beyond the threshold 6.0 in one row
    x2d = x2d.to(dtype)
    q = torch.empty(x2d.shape, dtype=torch.int8)
    row_stats = torch.empty(rows)
    cols = int8_ops._flags_to_cols(int8_ops.quantize_into(x2d, q, row_stats, 0, 6.0), 6.0)
    assert cols.tolist() == [0, 5, 64, 128]
    bias = torch.randn(201).to(dtype)
    fused, expected = torch.empty(rows, 201, dtype=dtype), torch.empty(rows, 201, dtype=dtype)
    with cpu_isa(isa):
        int8_ops.gemv_into(q, row_stats, codes, scb, bias, None, fused, int8_ops.gemv_outliers(x2d, cols))
        addend = int8_ref.outlier_product(x2d, codes, scb, cols)
        int8_ops.gemv_into(q, row_stats, codes, scb, bias, addend, expected)
    # fp32: a few ulps of the largest outlier term (30 * |w| <= about 9); else one ulp of the rounded output
    tolerance = dict(rtol=1e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(fused.float(), expected.float(), **tolerance)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("rows", [1, 8])
def test_decode_rows_take_the_gemv_only_with_vnni(monkeypatch, rows, isa):
    """Without VNNI the GEMV's portable loop is slower than torch._int_mm: the layer's few rows go there instead."""
    calls = []
    gemv_into = int8_ops.gemv_into
    monkeypatch.setattr(int8_ops, "gemv_into", lambda *args: calls.append(1) or gemv_into(*args))
    x = with_outliers((rows, 200), torch.float32, columns=(3, 150))
    codes, scb = quantize_int8_weight(torch.randn(70, 200))
    with cpu_isa(isa):
        vnni = _native.cpu.avx512_vnni_in_use()
        out = run("native", int8_linear, x, codes, scb, None, 6.0)
    assert bool(calls) == vnni
    torch.testing.assert_close(out, run("reference", int8_linear, x, codes, scb, None, 6.0), rtol=1e-5, atol=1e-4)


def test_gemv_refuses_outlier_columns_outside_the_weight_or_beside_an_addend():
    codes, scb = quantize_int8_weight(torch.randn(7, 129))
    q, row_stats, out = torch.zeros(2, 129, dtype=torch.int8), torch.ones(2), torch.empty(2, 7)
    for column in (-1, 129):
        outliers = (torch.tensor([3, column]), torch.ones(2, 2), False)
        with pytest.raises(ValueError, match="outlier column lies outside the weight"):
            int8_ops.gemv_into(q, row_stats, codes, scb, None, None, out, outliers)
    outliers = (torch.tensor([3]), torch.ones(2, 1), False)
    with pytest.raises(ValueError, match="an addend or outlier columns, not both"):
        int8_ops.gemv_into(q, row_stats, codes, scb, None, torch.zeros(2, 7), out, outliers)


@pytest.mark.parametrize("column", [-1, 129])
def test_outlier_columns_outside_the_weight_are_refused(column):
    codes, scb = quantize_int8_weight(torch.randn(7, 129))
    with pytest.raises(ValueError, match="outside the weight"):
        int8_ops.outlier_product(torch.randn(2, 129), codes, scb, torch.tensor([3, column]))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_colwise_nonfinite_without_threshold_is_no_outlier(backend):
    x = torch.randn(4, 6)
    x[2, 1] = float("inf")
    q, stats, cols = run(backend, int8_colwise_quant, x)
    assert cols is None and stats[1] == float("inf") and (q[:, 1] == 0).all()


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", [1, 63, 64, 65, 200, 4109])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_native_gemv_products_are_exact(rows, k, threads, isa):
    """The fused GEMV's int32 products equal torch's exact ones at every row count, with whole 64-byte steps and
    tails, an odd weight row count (the last row without its pair) and the extreme codes -128 and 127 (the
    correction by 128 * sum(q) must not overflow): its epilogue then gives the bits int8_mm_dequant gives."""
    generator = torch.Generator().manual_seed(rows * 10000 + k)
    q = torch.randint(-128, 128, (rows, k), generator=generator, dtype=torch.int8)
    codes = torch.randint(-128, 128, (37, k), generator=generator, dtype=torch.int8)
    q[0, : min(k, 40)], codes[0, : min(k, 40)] = -128, -128  # the extremes, where the correction is largest
    codes[1, : min(k, 40)] = 127
    row_stats = torch.rand(rows, generator=generator) * 10
    col_stats = torch.rand(37, generator=generator) * 10
    exact = (q.long() @ codes.long().t()).to(torch.int32)
    expected = torch.empty(rows, 37)
    int8_ops.mm_dequant_into(exact, row_stats, col_stats, None, None, expected)
    out = torch.empty(rows, 37)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with cpu_isa(isa):
            int8_ops.gemv_into(q, row_stats, codes, col_stats, None, None, out)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_matches_reference(dtype, rows, isa):
    torch.manual_seed(rows)
    x = with_outliers((rows, 200), dtype, columns=(3, 150))
    weight = torch.randn(70, 200)
    codes, scb = quantize_int8_weight(weight)
    bias = torch.randn(70).to(dtype)
    for threshold in (0.0, 6.0):
        with cpu_isa(isa):
            ours = int8_linear(x, codes, scb, bias, threshold)
        ref = run("reference", int8_linear, x, codes, scb, bias, threshold)
        assert ours.dtype == dtype
        # the int32 products are exact; the fp32 epilogue and outlier GEMM may differ in the last place
        torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-5, atol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("shape", [(1, 7), (5, 37), (40, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_quantization_codes_are_exact(dtype, shape, threshold):
    x = with_outliers(shape, dtype)
    x[min(1, shape[0] - 1), 2] = float("nan")
    for quant in (int8_vectorwise_quant, int8_colwise_quant):
        ours = run("triton", quant, x, threshold)
        expected = run("reference", quant, x, threshold)
        assert torch.equal(ours[0], expected[0])
        torch.testing.assert_close(ours[1], expected[1], rtol=0, atol=0, equal_nan=True)
        assert (ours[2] is None) == (expected[2] is None)
        if threshold:
            assert torch.equal(ours[2], expected[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 9, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_and_grad_input_on_every_backend(backend, rows, dtype):
    skip_unsupported(backend, dtype, 0)
    torch.manual_seed(rows)
    x = with_outliers((rows, 100), dtype, columns=(3, 70)).requires_grad_()
    codes, scb = quantize_int8_weight(torch.randn(50, 100))
    bias = torch.randn(50).to(dtype)
    dy = torch.randn(rows, 50).to(dtype)
    results = []
    for name in (backend, "reference"):
        x.grad = None
        with pyfastpeft.use_backend(name):
            y = int8_linear(x, codes, scb, bias, 6.0)
            y.backward(dy)
        results.append((y.detach().float(), x.grad.float()))
    (y, dx), (y_ref, dx_ref) = results
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)
    a = torch.randint(-127, 128, (rows, 100), dtype=torch.int8)
    assert torch.equal(run(backend, int8_matmul, a, codes), run("reference", int8_matmul, a, codes))


def test_int8_linear_decomposition_recovers_outliers():
    torch.manual_seed(0)
    x = torch.randn(16, 256)
    x[:, 10] *= 40  # one hot channel, as in LLM activations
    weight = torch.randn(64, 256) * 0.05
    codes, scb = quantize_int8_weight(weight)
    dense = x @ (codes.float() * scb[:, None] / 127).t()
    err_with = (int8_linear(x, codes, scb, threshold=6.0) - dense).abs().mean()
    err_without = (int8_linear(x, codes, scb, threshold=0.0) - dense).abs().mean()
    assert err_with < err_without / 4, (err_with, err_without)


def test_int8_matmul_is_exact_at_the_int32_bound():
    k = 65536
    a = torch.full((2, k), 127, dtype=torch.int8)
    b = torch.full((3, k), -127, dtype=torch.int8)
    b[1] = 127
    c = int8_matmul(a, b)
    assert c.dtype == torch.int32
    assert c[0, 0].item() == -127 * 127 * k and c[0, 1].item() == 127 * 127 * k


@pytest.mark.parametrize("amx", CPU_AMX)
@pytest.mark.parametrize(
    "m,n,k",
    [(32, 32, 64), (33, 31, 127), (64, 8, 128), (40, 70, 1000), (513, 33, 192), (96, 300, 4096), (1, 17, 65)],
)
def test_native_int8_matmul_is_exact_on_every_path(m, n, k, amx):
    """The native GEMM (AMX tiles where the CPU has them, a portable loop otherwise) against exact integer sums,
    over edges of every tile dimension (rows of 32, columns of 32, reduction steps of 64) and the full int8 range."""
    generator = torch.Generator().manual_seed(m * n + k)
    a = torch.randint(-128, 128, (m, k), generator=generator, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
    out = torch.full((m, n), -1, dtype=torch.int32)
    with cpu_amx(amx):
        _native.launch("int8_matmul", a, a, b, out, m, n, k)
    assert torch.equal(out, (a.long() @ b.long().t()).int())


@pytest.mark.parametrize("amx", CPU_AMX)
def test_int8_matmul_from_amx_rows_is_exact_at_the_int32_bound(amx):
    k = 65536
    a = torch.full((40, k), -128, dtype=torch.int8)
    b = torch.full((33, k), -128, dtype=torch.int8)
    b[1] = 127
    with cpu_amx(amx):
        c = int8_matmul(a, b)
    assert c[0, 0].item() == 128 * 128 * k and c[39, 1].item() == -128 * 127 * k and c[5, 32].item() == 128 * 128 * k


def test_int8_matmul_refuses_a_reduction_past_the_int32_bound():
    a = torch.ones((2, 65537), dtype=torch.int8)
    with pytest.raises(ValueError, match="int8_matmul: K is 65537"):
        int8_matmul(a, a)


@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (9, 64, 48), (16, 13, 5), (17, 8, 8), (40, 1001, 11)])
def test_padded_int8_matmul_for_cuda_shapes_is_exact(m, k, n):
    """CUDA's int8 GEMM takes M > 16 and K, N multiples of 8; other shapes are zero-padded to it (not
    multiplied in fp64). The padding is device-independent, so it is checked here on the CPU."""
    from pyfastpeft.ops.int8 import _padded_int_mm

    generator = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-127, 128, (m, k), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    out = _padded_int_mm(a, b)
    assert out.shape == (m, n) and out.dtype == torch.int32
    assert torch.equal(out, (a.long() @ b.long().t()).int())


@pytest.mark.parametrize("rows", [1, 8, 20])
def test_int8_linear_has_no_int32_overflow_at_65536_inputs(rows):
    k = 65536
    x = torch.ones(rows, k)
    codes = torch.full((4, k), 127, dtype=torch.int8)
    codes[1] = -127
    codes[2, ::2] = -127
    scb = torch.ones(4)
    out = int8_linear(x, codes, scb, threshold=0.0)
    expected = torch.tensor([k, -k, 0, k], dtype=torch.float32)
    torch.testing.assert_close(out, expected.expand(rows, 4), rtol=1e-5, atol=1e-2)


def test_bf16_output_above_fp16_range_does_not_overflow():
    x = torch.full((2, 64), 300.0, dtype=torch.bfloat16)
    codes = torch.full((3, 64), 127, dtype=torch.int8)
    scb = torch.full((3,), 20.0)
    out = int8_linear(x, codes, scb, threshold=0.0)  # 64 * 300 * 20 = 384000 > 65504
    assert out.isfinite().all()
    torch.testing.assert_close(out.float(), torch.full((2, 3), 384000.0), rtol=1e-2, atol=0)
    c = torch.full((1, 2), 127 * 127 * 64, dtype=torch.int32)
    assert int8_mm_dequant(c, torch.tensor([300.0]), torch.tensor([20.0, 20.0]), torch.bfloat16).isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_mm_dequant_and_dequant_match_reference(dtype):
    c = torch.randint(-(2**20), 2**20, (9, 33), dtype=torch.int32)
    row, col, bias = torch.rand(9) * 3, torch.rand(33) * 3, torch.randn(33).to(dtype)
    ours = int8_mm_dequant(c, row, col, dtype, bias)
    ref = run("reference", int8_mm_dequant, c, row, col, dtype, bias)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    q = torch.randint(-127, 128, (9, 33), dtype=torch.int8)
    torch.testing.assert_close(
        int8_vectorwise_dequant(q, row), run("reference", int8_vectorwise_dequant, q, row), rtol=0, atol=0
    )
    torch.testing.assert_close(int8_vectorwise_dequant(q, col, axis=1), q.float() * col * (1 / 127), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_int8_linear_gradcheck(backend):
    torch.manual_seed(0)
    codes, scb = quantize_int8_weight(torch.randn(6, 10))
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, b: int8_linear(x, codes, scb, b), (x, bias))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_grad_input_is_dy_times_dequantized_weight(dtype):
    torch.manual_seed(1)
    codes, scb = quantize_int8_weight(torch.randn(300, 40))
    x = torch.randn(2, 5, 40, dtype=dtype, requires_grad=True)
    int8_linear(x, codes, scb).backward(torch.ones(2, 5, 300, dtype=dtype))
    expected = torch.ones(10, 300) @ (codes.float() * scb[:, None] / 127)
    # bf16 rounds the dequantized weight (~0.4%) before a 300-term sum of size ~10
    atol = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 0.15}[dtype]
    torch.testing.assert_close(x.grad.float().view(10, 40), expected, rtol=1e-2, atol=atol)


def test_int8_ops_opcheck():
    x = with_outliers((6, 40), torch.float32)
    codes, scb = quantize_int8_weight(torch.randn(24, 40))
    ops = torch.ops.pyfastpeft
    for backend in ("native", "reference"):
        with pyfastpeft.use_backend(backend):
            torch.library.opcheck(ops.int8_vectorwise_quant.default, (x, 6.0))
            torch.library.opcheck(ops.int8_colwise_quant.default, (x, 6.0))
            torch.library.opcheck(ops.int8_vectorwise_dequant.default, (codes, scb, 0))
            torch.library.opcheck(ops.int8_matmul.default, (codes[:6], codes))
            torch.library.opcheck(
                ops.int8_mm_dequant.default,
                (
                    torch.randint(-999, 999, (6, 24), dtype=torch.int32),
                    torch.rand(6),
                    scb,
                    torch.randn(24),
                    torch.bfloat16,
                ),
            )
            torch.library.opcheck(ops.int8_linear.default, (x, codes, scb, torch.randn(24), 6.0))
            torch.library.opcheck(ops.int8_linear_grad_input.default, (torch.randn(6, 24), codes, scb))


def test_linear8bitlt_compiles_fullgraph():
    layer = Linear8bitLt.from_linear(nn.Linear(40, 24), threshold=0.0)
    x = torch.randn(5, 40)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_linear8bitlt_from_linear_is_close_to_the_dense_layer():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    layer = Linear8bitLt.from_linear(linear)
    x = torch.randn(7, 128)
    assert layer.weight.dtype == torch.int8 and layer.SCB.dtype == torch.float32
    torch.testing.assert_close(layer.dequantize(), linear.weight, rtol=0, atol=linear.weight.abs().max().item() / 127)
    rel = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert rel < 0.02, rel
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16


def test_linear8bitlt_state_dict_round_trip_and_dtype_casts():
    layer = Linear8bitLt.from_linear(nn.Linear(32, 16))
    state = layer.state_dict()
    assert set(state) == {"weight", "SCB", "weight_format", "bias"} and state["weight_format"].item() == 0
    other = Linear8bitLt(32, 16)
    other.load_state_dict(state)
    x = torch.randn(3, 32)
    assert torch.equal(other(x), layer(x))
    other.half()
    assert other.weight.dtype == torch.int8 and other.SCB.dtype == torch.float32
    with pytest.raises(RuntimeError, match="only the row-major weight_format"):
        Linear8bitLt(32, 16).load_state_dict({**state, "weight_format": torch.tensor(1, dtype=torch.uint8)})
    with pytest.raises(RuntimeError, match="must hold int8 codes"):
        Linear8bitLt(32, 16).load_state_dict({**state, "weight": torch.randn(16, 32)})


def _bitsandbytes():
    try:
        import bitsandbytes

        return bitsandbytes
    except Exception:
        return None


bnb = _bitsandbytes()


@pytest.mark.skipif(bnb is None, reason="bitsandbytes is not importable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_and_stats_equal_bitsandbytes(dtype):
    x = with_outliers((33, 130), dtype, columns=(3, 64))
    for threshold in (0.0, 6.0):
        theirs = bnb.functional.int8_vectorwise_quant(x.clone(), threshold=threshold)
        ours = int8_vectorwise_quant(x, threshold)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        if threshold:
            assert torch.equal(ours[2], theirs[2])


@pytest.mark.skipif(bnb is None, reason="bitsandbytes is not importable")
def test_linear8bitlt_checkpoints_load_both_ways_with_bitsandbytes():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    theirs = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False, threshold=6.0)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # quantizes
    state = theirs.state_dict()
    # bitsandbytes quantizes the weight from fp16: from that copy the codes and stats are the same
    codes, scb = quantize_int8_weight(linear.weight.detach().half())
    assert torch.equal(state["weight"], codes) and torch.equal(state["SCB"], scb)
    loaded = Linear8bitLt(64, 48)
    loaded.load_state_dict(state)
    assert torch.equal(loaded.weight, codes) and torch.equal(loaded.SCB, scb)
    x = torch.randn(5, 64)
    # bitsandbytes' CPU forward multiplies x unquantized by the dequantized weight: ours differs by the int8
    # rounding of x alone
    assert (loaded(x) - theirs(x)).norm() / theirs(x).norm() < 0.01
    ours = Linear8bitLt.from_linear(linear)
    back = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False).to("cpu")
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.state_dict()["weight"], ours.weight) and torch.equal(back.state_dict()["SCB"], ours.SCB)
    assert (back(x) - ours(x)).norm() / ours(x).norm() < 0.01


def test_quantize_model_int8_replaces_linears_and_keeps_logits_close():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        reference = model(ids).logits
    report = pyfastpeft.quantize_model(model, "int8")
    assert len(report.replaced) == 2 * 7 and isinstance(model.model.layers[1].mlp.down_proj, Linear8bitLt)
    assert report.bytes_after < report.bytes_before
    with torch.no_grad():
        logits = model(ids).logits
    similarity = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    assert similarity > 0.995, similarity


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda w, s: int8_linear(torch.randn(2, 31), w, s), ValueError, "in_features is 32"),
        (lambda w, s: int8_linear(torch.randn(2, 32), w.float(), s), TypeError, "weight must be an int8"),
        (lambda w, s: int8_linear(torch.randn(2, 32), w, s[:3]), ValueError, "weight_stats has 3 elements"),
        (lambda w, s: int8_linear(torch.randn(2, 32), w, s.double()), TypeError, "weight_stats must have dtype"),
        (lambda w, s: int8_linear(torch.randn(2, 32), w, s, torch.randn(5)), ValueError, "bias has 5 elements"),
        (lambda w, s: int8_linear(torch.randn(2, 32), w, s, threshold=-1.0), ValueError, "threshold must be"),
        (lambda w, s: int8_linear(torch.ones(2, 32, dtype=torch.int8), w, s), TypeError, "x must have dtype"),
        (lambda w, s: int8_vectorwise_quant(torch.randn(3, 4), threshold=float("nan")), ValueError, "threshold"),
        (lambda w, s: int8_vectorwise_dequant(w, s, axis=2), ValueError, "axis must be 0"),
        (lambda w, s: int8_vectorwise_dequant(w, s, axis=1), ValueError, "stats has 8 elements, q has 32 columns"),
        (lambda w, s: int8_matmul(w, w[:, :5]), ValueError, "a has 32 columns, b has 5"),
        (lambda w, s: int8_mm_dequant(torch.ones(2, 8, dtype=torch.int32), s[:3], s), ValueError, "row_stats has 3"),
        (lambda w, s: Linear8bitLt(0, 4), ValueError, "in_features and out_features must be >= 1"),
        (lambda w, s: Linear8bitLt(70000, 4), ValueError, "at most 65536"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    codes, scb = quantize_int8_weight(torch.randn(8, 32))
    with pytest.raises(error, match=match):
        call(codes, scb)


def test_empty_inputs_give_empty_results():
    codes, scb = quantize_int8_weight(torch.randn(8, 32))
    assert int8_linear(torch.randn(0, 32), codes, scb).shape == (0, 8)
    q, stats, cols = int8_vectorwise_quant(torch.randn(0, 32), 6.0)
    assert q.shape == (0, 32) and stats.shape == (0,) and cols.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 8, 12, 40])
@pytest.mark.parametrize("in_features,out_features", [(64, 48), (100, 48), (100, 45)])
def test_int8_on_each_device_matches_reference(device, backend, dtype, rows, in_features, out_features):
    """Row- and column-wise quantization bit for bit, and int8_linear's output and gradients (GEMV and GEMM row
    counts, an outlier column), against the reference on the same device. On CUDA 12 rows, 100 inputs and 45
    outputs pad the int8 GEMM's M, K and N (cuBLASLt takes M > 16 and multiples of 8)."""
    on_device_unsupported(device, backend, dtype, rows * in_features)
    torch.manual_seed(rows)
    x = torch.randn(rows, in_features, device=device)
    x[:, 3] *= 10
    x = x.to(dtype)
    codes, scb = quantize_int8_weight(torch.randn(out_features, in_features, device=device))
    bias = torch.randn(out_features, device=device).to(dtype)
    for quant in (int8_vectorwise_quant, int8_colwise_quant):
        ours, ref = run(backend, quant, x, 6.0), run("reference", quant, x, 6.0)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1]) and torch.equal(ours[2], ref[2])
    dy = torch.randn(rows, out_features, device=device).to(dtype)
    fn = lambda a, b: int8_linear(a, codes, scb, b, 6.0)  # noqa: E731
    ours, ref = grads_of(backend, fn, (x, bias), dy), grads_of("reference", fn, (x, bias), dy)
    for a, b in zip(ours, ref):
        # normwise: dx sums out_features terms of size ~1, so a half-precision element near 0 carries the terms'
        # rounding (2^-8 each in bf16), not its own
        scale = max(1.0, b.float().abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * scale)
