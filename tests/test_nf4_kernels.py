"""NF4 kernels against the PyTorch reference: the CPU kernels (pyfastpeft._C nf4_quantize / nf4_dequantize /
nf4_gemv) on every instruction set this CPU runs, called directly through the helpers below, below the ops
layer; and the Triton kernels through the ops on the "triton" backend."""

import contextlib

import pytest
import torch
from helpers import (
    BACKENDS,
    CPU_ISAS,
    DEVICES,
    HAS_TRITON,
    cpu_amx,
    cpu_avx512_bf16,
    cpu_isa,
    on_device_unsupported,
    random_weight_state,
    run,
    special_blocks_weight,
    with_planted_ties,
)

import pyfastpeft
from pyfastpeft import _native
from pyfastpeft.ops import nf4 as nf4_ops
from pyfastpeft.reference import nf4 as ref

CODES = ref.QUANT_TABLES  # {"nf4": NF4_CODE, "fp4": FP4_CODE}
NATIVE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def native_quantize(w, blocksize, code):
    flat = w.reshape(-1).contiguous()
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    _native.cpu.nf4_quantize(
        flat.data_ptr(),
        _native.dtype_code(flat),
        packed.data_ptr(),
        absmax.data_ptr(),
        n,
        blocksize,
        code.data_ptr(),
        torch.get_num_threads(),
    )
    return packed, absmax


def native_dequantize(packed, absmax, code, blocksize, start, count, dtype):
    out = torch.empty(count, dtype=dtype)
    _native.cpu.nf4_dequantize(
        packed.data_ptr(),
        absmax.data_ptr(),
        code.data_ptr(),
        out.data_ptr(),
        _native.dtype_code(out),
        start,
        count,
        blocksize,
        torch.get_num_threads(),
    )
    return out


def native_gemv(x, packed, absmax, code, bias, n, blocksize):
    m, k = x.shape
    out = torch.empty(m, n, dtype=x.dtype)
    _native.cpu.nf4_gemv(
        x.data_ptr(),
        _native.dtype_code(x),
        packed.data_ptr(),
        absmax.data_ptr(),
        code.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        0 if bias is None else _native.dtype_code(bias),
        out.data_ptr(),
        m,
        n,
        k,
        blocksize,
        torch.get_num_threads(),
    )
    return out


# ---- quantize ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("shape", [(1024, 1024), (7, 33), (4096, 11), (3, 64)])
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
def test_quantize_matches_reference_bytes_with_planted_ties(isa, quant_type, blocksize, shape, dtype):
    code = CODES[quant_type]
    w = with_planted_ties(shape, blocksize, code, torch.Generator().manual_seed(hash(shape) % 1000)).to(dtype)
    with cpu_isa(isa):
        packed, absmax = native_quantize(w, blocksize, code)
    expected_packed, expected_absmax = ref.quantize_4bit(w, blocksize, code)
    assert torch.equal(packed, expected_packed.view(-1))
    assert torch.equal(absmax, expected_absmax)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_float64_rounds_to_float32_first(isa, quant_type):
    code = CODES[quant_type]
    w = with_planted_ties((33, 40), 64, code, torch.Generator().manual_seed(3)).double()
    w += torch.randn(w.shape, dtype=torch.float64) * 1e-9  # below fp32 resolution of most values: rounds away
    with cpu_isa(isa):
        packed, absmax = native_quantize(w, 64, code)
    expected_packed, expected_absmax = ref.quantize_4bit(w, 64, code)
    assert torch.equal(packed, expected_packed.view(-1))
    assert torch.equal(absmax, expected_absmax)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("numel", [4 * 64 + 10, 4 * 64 + 9])  # a partial last block, of even and odd length
def test_quantize_zero_nan_inf_blocks_like_reference(isa, quant_type, numel):
    """Block 0 all zeros (absmax 0), block 1 one NaN (absmax NaN, all codes as the reference's NaN), block 2 one
    +inf, block 3 one -inf, the partial block all zeros (stored absmax float32(1e-38)); then the partial block
    NaN too."""
    code = CODES[quant_type]
    w = special_blocks_weight(numel)
    for case in (w, torch.cat([w[:256], torch.full((numel - 256,), float("nan"))])):
        with cpu_isa(isa):
            packed, absmax = native_quantize(case, 64, code)
        expected_packed, expected_absmax = ref.quantize_4bit(case, 64, code)
        assert torch.equal(packed, expected_packed.view(-1))
        torch.testing.assert_close(absmax, expected_absmax, rtol=0, atol=0, equal_nan=True)
    assert absmax[0] == 0 and absmax[1].isnan() and absmax[2] == float("inf") and absmax[3] == float("inf")


# ---- dequantize --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", NATIVE_DTYPES + [torch.float64])
@pytest.mark.parametrize(
    "numel, blocksize, start, count",
    [
        (64 * 1024, 64, 0, 64 * 1024),  # everything
        (64 * 1024 + 33, 128, 0, 64 * 1024 + 33),  # odd numel, partial last block
        (100 * 96, 64, 5 * 96, 30 * 96),  # a tile of rows [5, 35) of a [100, 96] weight: blocks straddle rows
        (33 * 33, 32, 7 * 33, 9 * 33),  # odd k: the tile starts on a low nibble
        (50_001, 32, 12_345, 37_000),  # odd start and count, several decode chunks
        (4096, 4096, 4001, 1),  # one element, a low nibble
    ],
)
def test_dequantize_matches_reference_exactly(isa, quant_type, dtype, numel, blocksize, start, count):
    code = CODES[quant_type]
    packed, absmax = random_weight_state(1, numel, blocksize, torch.Generator().manual_seed(numel))
    with cpu_isa(isa):
        out = native_dequantize(packed, absmax, code, blocksize, start, count, dtype)
    expected = ref.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)[start : start + count]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_of_special_absmax_is_the_same_on_every_isa_and_the_reference(dtype):
    """16-bit outputs come from a per-block table of rounded codes on AVX-512 and from fp32 values rounded one by
    one elsewhere: the same bits for NaN, infinite, zero, negative, subnormal and overflowing absmax (an untrusted
    checkpoint's), and the reference's values (NaN where it has NaN)."""
    blocksize = 64
    absmax = torch.tensor([float("nan"), float("inf"), 0.0, -1.5, 1e-40, 3e38, 7e4, 0.02] * 4)
    packed = torch.randint(0, 256, (absmax.numel() * blocksize // 2, 1), dtype=torch.uint8)
    code = CODES["nf4"]
    outputs = []
    for isa in CPU_ISAS:
        with cpu_isa(isa):
            outputs.append(native_dequantize(packed, absmax, code, blocksize, 3, absmax.numel() * blocksize - 5, dtype))
    for out in outputs[1:]:
        assert torch.equal(out.view(torch.int16), outputs[0].view(torch.int16))
    expected = ref.dequantize_4bit(packed, absmax, code, blocksize, absmax.numel() * blocksize, dtype)[3:-2]
    assert torch.equal(outputs[0].isnan(), expected.isnan())
    assert torch.equal(outputs[0].nan_to_num(0.0, 1e38), expected.nan_to_num(0.0, 1e38))


# ---- gemv --------------------------------------------------------------------------------------------------


def gemv_error_bound(x, weight, bias, out_dtype, k):
    """Bound on |ours - exact| per output, exact = x @ weight^T + bias in fp64 from the same inputs.
    Our sums (fp32; fp64 for fp64 x) add at most k/16 products in sequence per partial sum, then fold partial
    sums pairwise (<= 5 steps) and add the bias: at most k/16 + 8 roundings of unit u, each below
    u * (sum |x w| + |bias|). The fast path scales a 16-lane partial sum of code * x by absmax, one more rounding
    per term. Then one rounding to out_dtype: u_out * |result|."""
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    u, u_out = torch.finfo(compute).eps / 2, torch.finfo(out_dtype).eps / 2
    magnitude = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    accumulation = (k / 16 + 9) * u * magnitude
    return accumulation * (1 + u_out), u_out


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize(
    "n, k, blocksize",
    [
        (64, 64, 64),  # one block per row
        (64, 384, 128),  # whole blocks and spans: the AVX-512 fast path
        (40, 256, 32),  # fast path, four blocks per span
        (16, 384, 96),  # an even blocksize, not a power of two (the C++ contract): spans would cross blocks
        (100, 96, 64),  # blocks straddle rows
        (33, 33, 32),  # odd k: rows start on low nibbles
        (4096, 4096, 64),
    ],
)
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
def test_gemv_matches_dequantized_matmul(isa, m, n, k, blocksize, dtype):
    # The bias is added in the epilogue, apart from the row-count, layout and ISA paths swept above: each case
    # takes one of no bias / bf16 / fp32 in turn, so every (ISA, x dtype) meets all three over the shapes (the full
    # cross product was 486 cases, three times these, for no path more).
    bias_dtype = (None, torch.bfloat16, torch.float32)[(m + n + k) % 3]
    generator = torch.Generator().manual_seed(n * k + m)
    packed, absmax = random_weight_state(n, k, blocksize, generator)
    code = CODES["nf4"]
    x = torch.randn(m, k, generator=generator).to(dtype)
    bias = None if bias_dtype is None else torch.randn(n, generator=generator).to(bias_dtype)
    with cpu_isa(isa):
        out = native_gemv(x, packed, absmax, code, bias, n, blocksize)
    weight = ref.dequantize_4bit(packed, absmax, code, blocksize, n * k, torch.float32).view(n, k)
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    accumulation, u_out = gemv_error_bound(x, weight, bias, dtype, k)
    error = (out.double() - exact).abs()
    assert out.dtype == dtype
    assert bool((error <= accumulation + u_out * exact.abs()).all()), error.max()


@pytest.mark.parametrize("blocksize", [0, -64, 63])
def test_gemv_refuses_a_blocksize_outside_its_contract(blocksize):
    """The ops refuse these first; the kernel itself must not divide by zero or misread blocks either."""
    packed, absmax = random_weight_state(4, 128, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="blocksize must be even and >= 2"):
        native_gemv(torch.randn(1, 128), packed, absmax, CODES["nf4"], None, 4, blocksize)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_gemv_float64_sums_in_float64(isa):
    generator = torch.Generator().manual_seed(0)
    packed, absmax = random_weight_state(48, 256, 64, generator)
    code = CODES["fp4"]
    x = torch.randn(2, 256, dtype=torch.float64, generator=generator)
    bias = torch.randn(48, dtype=torch.float64, generator=generator)
    with cpu_isa(isa):
        out = native_gemv(x, packed, absmax, code, bias, 48, 64)
    weight = ref.dequantize_4bit(packed, absmax, code, 64, 48 * 256, torch.float64).view(48, 256)
    torch.testing.assert_close(out, x @ weight.T + bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_gemv_identity_weight_reproduces_x(isa):
    """W = I (code 1.0 on the diagonal, 0.0 elsewhere, absmax 1): x @ W^T is x itself, exactly."""
    k = 256
    code = CODES["nf4"]
    nibbles = torch.full((k, k), 7, dtype=torch.uint8)  # NF4_CODE[7] == 0.0, NF4_CODE[15] == 1.0
    nibbles.fill_diagonal_(15)
    flat = nibbles.view(-1)
    packed = (flat[0::2] << 4) | flat[1::2]
    absmax = torch.ones(k * k // 64)
    x = torch.randn(5, k)
    with cpu_isa(isa):
        assert torch.equal(native_gemv(x, packed, absmax, code, None, k, 64), x)


# ---- bf16 GEMM on AMX tiles, or by AVX512-BF16's dot products ----------------------------------------------------

AMX = pytest.mark.skipif(not _native.cpu.amx_supported(), reason="this CPU has no AMX tiles")
# nf4_matmul's engines this CPU has: AMX tiles, and AVX512-BF16's dot products (with AMX switched off)
MATMUL_ENGINES = (["amx"] if _native.cpu.amx_supported() else []) + (
    ["dots"] if _native.cpu.avx512_bf16_supported() else []
)
MATMUL = pytest.mark.skipif(not MATMUL_ENGINES, reason="this CPU has neither AMX tiles nor AVX512-BF16")


@contextlib.contextmanager
def matmul_engine(engine):
    """The CPU's switches set so that nf4_matmul runs on `engine` ("amx", "dots") or refuses (None)."""
    with cpu_amx(engine == "amx"), cpu_avx512_bf16(engine is not None and _native.cpu.avx512_bf16_supported()):
        yield


def assert_bf16_product_within_fp32_sum_bound(out, a, b):
    """out (bf16) is a @ b summed in fp32 in any order from exact products, rounded once: within
    K u |a||b| (1 + u_bf16) + u_bf16 |a @ b| of the exact product, K the sum's length."""
    a, b = a.double(), b.double()
    exact = a @ b
    u, u_out = torch.finfo(torch.float32).eps / 2, torch.finfo(torch.bfloat16).eps / 2
    bound = a.shape[1] * u * (a.abs() @ b.abs()) * (1 + u_out) + u_out * exact.abs()
    assert bool(((out.double() - exact).abs() <= bound).all())


def native_matmul(x, packed, absmax, code, n, blocksize):
    out = torch.full((x.shape[0], n), float("nan"), dtype=torch.bfloat16)
    _native.launch("nf4_matmul", x, x, packed, absmax, code, out, x.shape[0], n, x.shape[1], blocksize)
    return out


@MATMUL
@pytest.mark.parametrize("engine", MATMUL_ENGINES)
@pytest.mark.parametrize(
    "m,n,k,blocksize",
    [
        (9, 32, 64, 64),
        (33, 70, 96, 32),  # a step of 32 elements per block, k not a multiple of 64
        (100, 96, 64, 128),  # blocks straddle rows
        (513, 33, 256, 256),  # row and column edges of every tile
        (40, 300, 4096, 64),
        (70, 200, 1088, 64),  # the dot products' passes of 16 steps and a partial one; 7 panels: pairs and one alone
    ],
)
def test_matmul_matches_the_bf16_dequantized_product(engine, m, n, k, blocksize):
    """fp32 sums of exact bf16 products (the weight as nf4_dequantize gives it in bf16), one rounding to bf16."""
    generator = torch.Generator().manual_seed(m * n + k)
    packed, absmax = random_weight_state(n, k, blocksize, generator)
    code = CODES["nf4"]
    x = torch.randn(m, k, generator=generator).bfloat16()
    with matmul_engine(engine):
        out = native_matmul(x, packed, absmax, code, n, blocksize)
    weight = ref.dequantize_4bit(packed, absmax, code, blocksize, n * k, torch.bfloat16).view(n, k)
    assert_bf16_product_within_fp32_sum_bound(out, x, weight.T)


@MATMUL
@pytest.mark.parametrize("engine", MATMUL_ENGINES)
def test_matmul_identity_weight_reproduces_x(engine):
    k = 128
    nibbles = torch.full((k, k), 7, dtype=torch.uint8)  # NF4_CODE[7] == 0.0, NF4_CODE[15] == 1.0
    nibbles.fill_diagonal_(15)
    flat = nibbles.view(-1)
    x = torch.randn(40, k).bfloat16()
    with matmul_engine(engine):
        out = native_matmul(x, (flat[0::2] << 4) | flat[1::2], torch.ones(k * k // 64), CODES["nf4"], k, 64)
    assert torch.equal(out, x)


@MATMUL
@pytest.mark.parametrize("engine", MATMUL_ENGINES)
def test_nf4_linear_takes_the_matmul_for_bf16_rows(monkeypatch, engine):
    """The op's CPU path above GEMV_MAX_ROWS rows: nf4_matmul (AMX tiles, or the dot products) and the
    dequantized-tile GEMM agree to bf16 rounding, bias included; with neither engine the layer takes the tiles and
    the native kernel refuses rather than compute without them."""
    generator = torch.Generator().manual_seed(0)
    packed, absmax = random_weight_state(96, 256, 64, generator)
    code = CODES["nf4"]
    x = torch.randn(3, 20, 256, generator=generator).bfloat16()
    bias = torch.randn(96, generator=generator).bfloat16()
    args = (packed, absmax, code, bias, 64, 96, 256)
    launched, launch = [], _native.launch
    monkeypatch.setattr(_native, "launch", lambda name, *a: (launched.append(name), launch(name, *a))[1])
    with matmul_engine(engine):
        fused = nf4_ops._native_linear(x, *args)
    assert launched == ["nf4_matmul"]
    with matmul_engine(None):
        dequantized = nf4_ops._native_linear(x, *args)
        with pytest.raises(ValueError, match="needs AMX tiles or AVX512-BF16"):
            native_matmul(x.view(60, 256), packed, absmax, code, 96, 64)
    assert launched == ["nf4_matmul"] * 2
    assert fused.shape == (3, 20, 96) and fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, dequantized, rtol=1.6e-2, atol=1.6e-2)


def native_matmul_grad_input(dy, packed, absmax, code, k, blocksize):
    dx = torch.full((dy.shape[0], k), float("nan"), dtype=torch.bfloat16)
    _native.launch("nf4_matmul_grad_input", dy, dy, packed, absmax, code, dx, dy.shape[0], dy.shape[1], k, blocksize)
    return dx


@MATMUL
@pytest.mark.parametrize("engine", MATMUL_ENGINES)
@pytest.mark.parametrize(
    "m,n,k,blocksize",
    [
        (9, 32, 64, 64),
        (33, 70, 96, 32),  # W's rows past a step of 32 (zero), dX's columns in three groups of 16
        (100, 96, 64, 128),  # blocks straddle W's rows
        (513, 33, 256, 256),  # row edges of every tile, one W row past a step
        (40, 1100, 320, 64),  # the dot products' passes of 16 steps and a partial one; 5 panels: pairs and one alone
        (3, 5, 32, 32),  # one row block, one panel
    ],
)
def test_matmul_grad_input_matches_the_bf16_dequantized_product(engine, m, n, k, blocksize):
    """dX = dY W_hat: fp32 sums over all of W's rows of exact bf16 products, one rounding to bf16."""
    generator = torch.Generator().manual_seed(m * n + k + 1)
    packed, absmax = random_weight_state(n, k, blocksize, generator)
    code = CODES["nf4"]
    dy = torch.randn(m, n, generator=generator).bfloat16()
    with matmul_engine(engine):
        dx = native_matmul_grad_input(dy, packed, absmax, code, k, blocksize)
    weight = ref.dequantize_4bit(packed, absmax, code, blocksize, n * k, torch.bfloat16).view(n, k)
    assert_bf16_product_within_fp32_sum_bound(dx, dy, weight)


@MATMUL
@pytest.mark.parametrize("engine", MATMUL_ENGINES)
def test_matmul_grad_input_of_an_empty_weight_is_zero_and_refuses_without_an_engine(engine):
    code = CODES["nf4"]
    empty = torch.empty(0, dtype=torch.uint8)
    with matmul_engine(engine):
        dx = native_matmul_grad_input(torch.empty(4, 0).bfloat16(), empty, torch.empty(0), code, 64, 64)
    assert torch.equal(dx, torch.zeros(4, 64, dtype=torch.bfloat16))
    packed, absmax = random_weight_state(8, 64, 64, torch.Generator().manual_seed(0))
    with matmul_engine(None), pytest.raises(ValueError, match="needs AMX tiles or AVX512-BF16"):
        native_matmul_grad_input(torch.ones(2, 8).bfloat16(), packed, absmax, code, 64, 64)


@pytest.mark.skipif("dots" not in MATMUL_ENGINES, reason="this CPU has no AVX512-BF16")
def test_nf4_linear_grad_input_takes_the_dot_product_matmul_without_amx(monkeypatch):
    """On a CPU without AMX (or with it switched off) but with AVX512-BF16, dX of bf16 rows runs
    nf4_matmul_grad_input; it agrees with the dequantized-column-tile GEMM to bf16 rounding. AMX hosts keep the tiles
    for dX."""
    generator = torch.Generator().manual_seed(1)
    packed, absmax = random_weight_state(96, 256, 64, generator)
    code = CODES["nf4"]
    dy = torch.randn(3, 20, 96, generator=generator).bfloat16()
    args = (packed, absmax, code, 64, 96, 256)
    launched, launch = [], _native.launch
    monkeypatch.setattr(_native, "launch", lambda name, *a: (launched.append(name), launch(name, *a))[1])
    with matmul_engine("dots"):
        fused = nf4_ops._native_linear_grad_input(dy, *args)
    assert launched == ["nf4_matmul_grad_input"]
    with matmul_engine(None):
        tiles = nf4_ops._native_linear_grad_input(dy, *args)
    if "amx" in MATMUL_ENGINES:
        with matmul_engine("amx"):
            nf4_ops._native_linear_grad_input(dy, *args)
    assert launched == ["nf4_matmul_grad_input"]
    assert fused.shape == (3, 20, 256) and fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, tiles, rtol=1.6e-2, atol=1.6e-2)


def native_lora_matmul(x, packed, absmax, code, xa, lora_b, scaling, n, blocksize):
    out = torch.full((x.shape[0], n), float("nan"), dtype=torch.bfloat16)
    _native.launch("lora_nf4_matmul", x, x, packed, absmax, code, xa, lora_b, scaling, out, x.shape[0], n, x.shape[1],
                   xa.shape[1], blocksize)  # fmt: skip
    return out


@AMX
@pytest.mark.parametrize(
    "m,n,k,rank",
    [
        (9, 32, 64, 16),
        (45, 70, 96, 1),  # row and column edges of the blocks, one rank
        (100, 33, 256, 17),  # two rank pairs' tiles, a column past one block
        (64, 64, 128, 32),  # whole blocks, the largest rank
    ],
)
def test_amx_lora_matmul_adds_the_up_projection_before_its_one_rounding(m, n, k, rank):
    """x W_hat^T + s xa B^T: the fp32 sums of both products' exact bf16 terms, added and rounded once to bf16."""
    generator = torch.Generator().manual_seed(m * n + k + rank)
    packed, absmax = random_weight_state(n, k, 64, generator)
    code, scaling = CODES["nf4"], 1.75
    x = torch.randn(m, k, generator=generator).bfloat16()
    xa, lora_b = (
        torch.randn(m, rank, generator=generator).bfloat16(),
        torch.randn(n, rank, generator=generator).bfloat16(),
    )
    out = native_lora_matmul(x, packed, absmax, code, xa, lora_b, scaling, n, 64)
    weight = ref.dequantize_4bit(packed, absmax, code, 64, n * k, torch.bfloat16).view(n, k).double()
    exact = x.double() @ weight.T + scaling * xa.double() @ lora_b.double().T
    magnitude = x.double().abs() @ weight.abs().T + scaling * xa.double().abs() @ lora_b.double().abs().T
    u, u_out = torch.finfo(torch.float32).eps / 2, torch.finfo(torch.bfloat16).eps / 2
    bound = (k + rank + 2) * u * magnitude * (1 + u_out) + u_out * exact.abs()
    assert bool(((out.double() - exact).abs() <= bound).all())


@AMX
def test_amx_lora_matmul_refuses_past_one_rank_tile_or_without_tiles():
    generator = torch.Generator().manual_seed(1)
    packed, absmax = random_weight_state(32, 64, 64, generator)
    x = torch.randn(16, 64).bfloat16()
    with pytest.raises(ValueError, match="rank <= 32"):
        native_lora_matmul(x, packed, absmax, CODES["nf4"], torch.zeros(16, 33).bfloat16(),
                           torch.zeros(32, 33).bfloat16(), 1.0, 32, 64)  # fmt: skip
    with cpu_amx(False), pytest.raises(ValueError, match="needs AMX tiles"):
        native_lora_matmul(x, packed, absmax, CODES["nf4"], torch.zeros(16, 8).bfloat16(),
                           torch.zeros(32, 8).bfloat16(), 1.0, 32, 64)  # fmt: skip


def test_gemv_rejects_more_than_eight_rows():
    packed, absmax = random_weight_state(4, 64, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="m must be in"):
        native_gemv(torch.randn(9, 64), packed, absmax, CODES["nf4"], None, 4, 64)


# ---- Triton (the CPU interpreter here; the device-parametric tests below run every backend on a GPU too) ---

triton_only = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# Both sides multiply the same dequantized weight and sum in fp32; they differ in summation order only.
TRITON_PRODUCT_TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def on_triton(op, *args):
    with pyfastpeft.use_backend("triton"):
        return op(*args)


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "numel, blocksize",
    [
        (96 * 40, 64),  # a [40, 96] weight: blocks straddle rows
        (33 * 7, 128),  # odd numel, partial last block
        (200 * 5, 4096),  # one partial block holding every row
        (1, 64),  # a single high nibble
    ],
)
def test_triton_dequantize_matches_reference_exactly(dtype, numel, blocksize):
    code = CODES["nf4"]
    packed, absmax = random_weight_state(1, numel, blocksize, torch.Generator().manual_seed(numel))
    out = on_triton(nf4_ops.nf4_dequantize, packed.view(-1, 1), absmax, code, blocksize, numel, dtype)
    assert torch.equal(out, ref.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype))


@triton_only
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(7, 33), (40, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_quantize_matches_reference_bytes_with_planted_ties(quant_type, blocksize, shape, dtype):
    code = CODES[quant_type]
    w = with_planted_ties(shape, blocksize, code, torch.Generator().manual_seed(shape[0])).to(dtype)
    packed, absmax = on_triton(nf4_ops.nf4_quantize, w, code, blocksize)
    expected_packed, expected_absmax = ref.quantize_4bit(w, blocksize, code)
    assert torch.equal(packed, expected_packed)
    assert torch.equal(absmax, expected_absmax)


@triton_only
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
@pytest.mark.parametrize("numel", [4 * 64 + 10, 4 * 64 + 9])
def test_triton_quantize_zero_nan_inf_blocks_like_reference(numel):
    code = CODES["nf4"]
    w = special_blocks_weight(numel)
    packed, absmax = on_triton(nf4_ops.nf4_quantize, w, code, 64)
    expected_packed, expected_absmax = ref.quantize_4bit(w, 64, code)
    assert torch.equal(packed, expected_packed)
    torch.testing.assert_close(absmax, expected_absmax, rtol=0, atol=0, equal_nan=True)


@triton_only
@pytest.mark.parametrize("m", [1, 3, 8, 17])  # fused GEMV up to 8 rows, in-loop-dequantized tl.dot above
@pytest.mark.parametrize(
    "n, k, blocksize",
    [
        (40, 96, 64),  # K not a multiple of the block: blocks straddle rows
        (33, 33, 32),  # odd K: odd rows start on a low nibble
        (24, 200, 128),  # several K steps, a partial last block
        (5, 70, 4096),  # one block for the whole weight
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_nf4_linear_matches_dequantized_matmul(m, n, k, blocksize, dtype, with_bias):
    generator = torch.Generator().manual_seed(n * k + m)
    packed, absmax = random_weight_state(n, k, blocksize, generator)
    code = CODES["nf4"]
    x = torch.randn(m, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype) if with_bias else None
    out = on_triton(nf4_ops.nf4_linear_op, x, packed.view(-1, 1), absmax, code, bias, blocksize, n, k)
    weight = ref.dequantize_4bit(packed, absmax, code, blocksize, n * k, torch.float64).view(n, k)
    exact = x.double() @ weight.T + (bias.double() if with_bias else 0)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.double(), exact, **TRITON_PRODUCT_TOLERANCES[dtype])


@triton_only
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("n, k, blocksize", [(40, 96, 64), (33, 33, 32), (70, 24, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_grad_input_is_dy_times_dequantized_weight(m, n, k, blocksize, dtype):
    generator = torch.Generator().manual_seed(n * k + m)
    packed, absmax = random_weight_state(n, k, blocksize, generator)
    code = CODES["nf4"]
    dy = torch.randn(2, m, n, generator=generator).to(dtype)
    dx = on_triton(nf4_ops.nf4_linear_grad_input, dy, packed.view(-1, 1), absmax, code, blocksize, n, k)
    weight = ref.dequantize_4bit(packed, absmax, code, blocksize, n * k, torch.float64).view(n, k)
    assert dx.dtype == dtype and dx.shape == (2, m, k)
    torch.testing.assert_close(dx.double(), dy.double() @ weight, **TRITON_PRODUCT_TOLERANCES[dtype])


@triton_only
def test_triton_products_of_empty_inputs_are_empty():
    packed, absmax = random_weight_state(8, 64, 64, torch.Generator().manual_seed(0))
    code = CODES["nf4"]
    assert on_triton(
        nf4_ops.nf4_linear_op, torch.randn(0, 64), packed, absmax, code, torch.randn(8), 64, 8, 64
    ).shape == (0, 8)
    assert on_triton(nf4_ops.nf4_linear_grad_input, torch.randn(0, 8), packed, absmax, code, 64, 8, 64).shape == (0, 64)
    assert on_triton(nf4_ops.nf4_dequantize, packed[:0], absmax[:0], code, 64, 0, torch.float32).shape == (0,)


@triton_only
def test_triton_nf4_ops_opcheck():
    packed, absmax = random_weight_state(40, 64, 64, torch.Generator().manual_seed(0))
    code = CODES["nf4"]
    packed = packed.view(-1, 1)
    with pyfastpeft.use_backend("triton"):
        torch.library.opcheck(torch.ops.pyfastpeft.nf4_quantize.default, (torch.randn(40, 64), code, 64))
        torch.library.opcheck(
            torch.ops.pyfastpeft.nf4_dequantize.default, (packed, absmax, code, 64, 40 * 64, torch.float16)
        )
        for rows in (2, 12):
            torch.library.opcheck(
                torch.ops.pyfastpeft.nf4_linear.default,
                (torch.randn(rows, 64), packed, absmax, code, torch.randn(40), 64, 40, 64),
            )
            torch.library.opcheck(
                torch.ops.pyfastpeft.nf4_linear_grad_input.default,
                (torch.randn(rows, 40), packed, absmax, code, 64, 40, 64),
            )


# ---- every backend on every device, through the ops ---------------------------------------------------------

DEVICE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_product_close(out, a, b, exact, dtype):
    """out = a @ b (fp64 `exact`) within what its roundings allow: fp32 to 1e-4; in bf16/fp16 the weight may be
    rounded to x's dtype before the product (bitsandbytes' GPU path, and the CPU path above 8 rows) and the result
    is rounded once, so the error is bounded by 2 eps (|a| @ |b|) elementwise, not by a fixed tolerance (products
    that cancel to near zero from large terms keep an error the size of those terms)."""
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-4)
        return
    bound = 2 * torch.finfo(dtype).eps * (a.double().abs() @ b.abs()) + 1e-6
    excess = ((out.double() - exact).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds 2 eps (|a| @ |b|) by {excess}"


def nf4_weight_on(device, n, k, blocksize, seed):
    """(packed [(n*k + 1) // 2, 1], absmax, code) on device, and the weight dequantized in fp64 [n, k]."""
    packed, absmax = random_weight_state(n, k, blocksize, torch.Generator().manual_seed(seed))
    code = CODES["nf4"]
    weight = ref.dequantize_4bit(packed, absmax, code, blocksize, n * k, torch.float64).view(n, k)
    return packed.view(-1, 1).to(device), absmax.to(device), code.to(device), weight.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(7, 33), (40, 96), (1024, 1024)])
@pytest.mark.parametrize("dtype", DEVICE_DTYPES + [torch.float64])
def test_nf4_quantize_on_each_device_gives_the_reference_bytes(device, backend, quant_type, blocksize, shape, dtype):
    on_device_unsupported(device, backend, dtype, shape[0] * shape[1])
    code = CODES[quant_type]
    w = with_planted_ties(shape, blocksize, code, torch.Generator().manual_seed(shape[0])).to(dtype)
    packed, absmax = run(backend, nf4_ops.nf4_quantize, w.to(device), code.to(device), blocksize)
    expected_packed, expected_absmax = ref.quantize_4bit(w, blocksize, code)
    assert torch.equal(packed.cpu(), expected_packed)
    assert torch.equal(absmax.cpu(), expected_absmax)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numel", [4 * 64 + 10, 4 * 64 + 9])
def test_nf4_quantize_on_each_device_zero_nan_inf_blocks_like_reference(device, backend, numel):
    code = CODES["nf4"]
    w = special_blocks_weight(numel)
    for case in (w, torch.cat([w[:256], torch.full((numel - 256,), float("nan"))])):
        packed, absmax = run(backend, nf4_ops.nf4_quantize, case.to(device), code.to(device), 64)
        expected_packed, expected_absmax = ref.quantize_4bit(case, 64, code)
        assert torch.equal(packed.cpu(), expected_packed)
        torch.testing.assert_close(absmax.cpu(), expected_absmax, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DEVICE_DTYPES + [torch.float64])
@pytest.mark.parametrize(
    "numel, blocksize, byte_offset",
    [
        (96 * 40, 64, 0),  # a [40, 96] weight: blocks straddle rows
        (33 * 7, 128, 0),  # odd numel, partial last block
        (11008 * 64 + 5, 4096, 0),  # many vector groups and a scalar tail
        (2 * 1000, 64, 1),  # packed one byte past an aligned address: the element-wise path
    ],
)
def test_nf4_dequantize_on_each_device_matches_reference_exactly(device, backend, dtype, numel, blocksize, byte_offset):
    on_device_unsupported(device, backend, dtype, numel)
    packed, absmax = random_weight_state(1, numel + 2 * byte_offset, blocksize, torch.Generator().manual_seed(numel))
    absmax = absmax[: -(-numel // blocksize)]
    packed = packed[byte_offset:]
    code = CODES["nf4"]
    out = run(
        backend, nf4_ops.nf4_dequantize, packed.to(device), absmax.to(device), code.to(device), blocksize, numel, dtype
    )
    assert torch.equal(out.cpu(), ref.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
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
@pytest.mark.parametrize("dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_nf4_linear_on_each_device_matches_dequantized_matmul(device, backend, m, n, k, blocksize, dtype, with_bias):
    on_device_unsupported(device, backend, dtype, n * k)
    packed, absmax, code, weight = nf4_weight_on(device, n, k, blocksize, n * k + m)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    out = run(backend, nf4_ops.nf4_linear_op, x, packed, absmax, code, bias, blocksize, n, k)
    exact = x.double() @ weight.T + (bias.double() if with_bias else 0)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_product_close(out, x, weight.T, exact, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("n, k, blocksize", [(40, 96, 64), (33, 33, 32), (300, 4096, 64)])
@pytest.mark.parametrize("dtype", DEVICE_DTYPES)
def test_nf4_grad_input_on_each_device_is_dy_times_dequantized_weight(device, backend, m, n, k, blocksize, dtype):
    on_device_unsupported(device, backend, dtype, n * k)
    packed, absmax, code, weight = nf4_weight_on(device, n, k, blocksize, n * k + m)
    dy = torch.randn(2, m, n, device=device).to(dtype)
    dx = run(backend, nf4_ops.nf4_linear_grad_input, dy, packed, absmax, code, blocksize, n, k)
    assert dx.dtype == dtype and dx.shape == (2, m, k)
    assert_product_close(dx, dy, weight, dy.double() @ weight, dtype)
