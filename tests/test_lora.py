"""LoRA: the shared Philox dropout mask (reference vs Triton's tl.randint4x vs the C++ kernel, bit for bit), the
lora_linear forward and backward on every backend against the reference, autograd, opcheck, compile and
memory."""

import math

import pytest
import torch
from helpers import (
    BACKENDS,
    CPU_AMX,
    CPU_BF16,
    CPU_ISAS,
    DECODE_BASE_CORRUPTIONS,
    HAS_TRITON,
    TOLERANCES,
    assert_decode_path_agrees,
    cpu_amx,
    cpu_avx512_bf16,
    cpu_isa,
    run,
    skip_unsupported,
)

import pyfastpeft
from pyfastpeft import _native
from pyfastpeft.functional import lora_linear
from pyfastpeft.ops import lora as lora_ops
from pyfastpeft.ops.lora_base import KINDS
from pyfastpeft.quant import quantize_int8_weight, quantize_nf4
from pyfastpeft.reference import lora as ref

# the last: the 64-bit block counter carries into its high word inside one 16-block step
RNG_CASES = [(0, 0), (123456789123, 2**32 - 5), (2**62 - 1, 77), (5, 2**40 + 3), (9, 2**34 - 37)]


def native_dropout(x, rng, dropout_p, alpha=1.0, accumulate_into=None):
    out = torch.empty_like(x) if accumulate_into is None else accumulate_into.clone()
    seed, offset = rng.tolist()
    _native.cpu.lora_dropout(
        x.data_ptr(),
        out.data_ptr(),
        x.numel(),
        _native.dtype_code(x),
        seed,
        offset,
        float(ref.keep_threshold(dropout_p)),
        float(torch.tensor(1 / (1 - dropout_p))),
        alpha,
        accumulate_into is not None,
        torch.get_num_threads(),
    )
    return out


# ---- the dropout mask ----------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("seed, offset", RNG_CASES)
def test_reference_uniforms_are_triton_randint4x_bit_for_bit(seed, offset):
    """Position s = offset + i takes word s % 4 of Triton's own randint4x(seed, s >> 2) (int64 counter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def uniforms_kernel(rng_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        position = tl.load(rng_ptr + 1) + index
        w0, w1, w2, w3 = tl.randint4x(tl.load(rng_ptr), position >> 2)
        word = position % 4
        w = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
        tl.store(out_ptr + index, tl.random.uint_to_uniform_float(w), mask=index < numel)

    rng = torch.tensor([seed, offset])
    numel = 3000
    out = torch.empty(numel)
    uniforms_kernel[(triton.cdiv(numel, 1024),)](rng, out, numel, BLOCK=1024)
    assert torch.equal(out, ref.philox_uniform(rng, numel))


def test_uniforms_cover_zero_to_one_and_offsets_shift_the_stream():
    u = ref.philox_uniform(torch.tensor([7, 100]), 20000)
    assert 0.0 <= u.min() < 0.001 and 0.999 < u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01
    for shift in (1, 2, 3, 10):  # any shift, not only whole Philox blocks
        assert torch.equal(ref.philox_uniform(torch.tensor([7, 100 + shift]), 100), u[shift : shift + 100])
    # the four words of a block are not copies of one another
    assert len(set(u[:4].tolist())) == 4


def test_counter_carries_past_two_to_the_32_blocks():
    """The block counter is 64-bit: the stream does not repeat after 2^32 blocks (2^34 elements)."""
    start = 2**34 - 6
    across = ref.philox_uniform(torch.tensor([3, start]), 12)
    assert not torch.equal(across[6:], ref.philox_uniform(torch.tensor([3, 0]), 6))
    assert torch.equal(across[6:], ref.philox_uniform(torch.tensor([3, 2**34]), 6))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "seed, offset, dropout_p", [(s, o, p) for (s, o), p in zip(RNG_CASES, (0.05, 0.5, 0.3, 0.9, 0.2), strict=True)]
)
def test_native_dropout_is_reference_bit_for_bit(isa, dtype, seed, offset, dropout_p):
    rng = torch.tensor([seed, offset])
    x = torch.randn(5, 1029).to(dtype)  # not a multiple of the 16-lane blocks or the 1024-element chunks
    with cpu_isa(isa):
        out = native_dropout(x, rng, dropout_p)
    assert torch.equal(out, ref.dropout(x, dropout_p, rng))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_native_bf16_dropout_rounds_every_kind_of_value_as_torch(isa):
    """Random bf16 bit patterns (subnormals, infinities, NaNs, the largest finite values) times the keep scale
    fp32(1 / (1 - p)) = 1 + 2^-8 at p = 1/257: a power of two times it lies exactly halfway between two bf16 values
    and a significand of all ones carries into the exponent, so the kernels' in-register rounding (nearest even,
    NaN kept NaN, overflow to inf) is checked on ties, carries and every class of value against torch's bits."""
    x = torch.randint(-(2**15), 2**15, (7, 1029), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    x = x.to(torch.int16).view(torch.bfloat16)
    rng = torch.tensor([5, 7])
    with cpu_isa(isa):
        out = native_dropout(x, rng, 1 / 257)
    want = ref.dropout(x, 1 / 257, rng)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.view(torch.int16)[~want.isnan()], want.view(torch.int16)[~want.isnan()])


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dropout_p", [0.0, 1e-10, 0.25, 1 - 2**-24])
def test_native_dropout_keeps_the_reference_elements_at_edge_probabilities(isa, dropout_p):
    """The AVX-512 kernel tests an integer bound derived from fp32(p) instead of each uniform: the same elements at
    p = 0 (all but u == 0), below the smallest uniform step, and at the largest fp32 below 1."""
    rng = torch.tensor([77, 3])
    x = torch.randn(3, 4099)
    with cpu_isa(isa):
        out = native_dropout(x, rng, dropout_p)
    assert torch.equal(out, ref.dropout(x, dropout_p, rng))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_native_dropout_accumulates_alpha_times_masked_input(isa):
    rng = torch.tensor([11, 12])
    g, base = torch.randn(5, 300, dtype=torch.float64), torch.randn(5, 300, dtype=torch.float64)
    with cpu_isa(isa):
        out = native_dropout(g, rng, 0.25, alpha=0.5, accumulate_into=base)
    torch.testing.assert_close(out, base + 0.5 * ref.dropout(g, 0.25, rng), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_native_dropout_selects_so_non_finite_dropped_elements_give_zero(isa, value):
    rng = torch.tensor([11, 12])
    x = torch.full((3, 1029), value)
    with cpu_isa(isa):
        dropped = native_dropout(x, rng, 0.5)
        accumulated = native_dropout(x, rng, 0.5, alpha=0.5, accumulate_into=torch.ones_like(x))
    keep = ref.keep_mask(rng, x.shape, 0.5, x.device)
    torch.testing.assert_close(dropped, ref.dropout(x, 0.5, rng), rtol=0, atol=0, equal_nan=True)
    assert (dropped[~keep] == 0).all() and (accumulated[~keep] == 1).all()


# Each CPU build this machine runs, and the AVX-512 build with and without AMX tiles where the CPU has them.
ISA_AMX = [(isa, amx) for isa in CPU_ISAS for amx in CPU_AMX if isa == "avx512" or not amx]
# The same, and the AVX-512 build without tiles with and without AVX512-BF16's products where the CPU has them.
ISA_AMX_BF16 = [
    (isa, amx, bf16) for isa, amx in ISA_AMX for bf16 in CPU_BF16 if not bf16 or (isa == "avx512" and not amx)
]


def assert_sums_rounded_once(got, want, terms: int, magnitude):
    """got is want (fp64) within one rounding to got's dtype plus the fp32 (fp64 for fp64) error of a sum of
    `terms` products whose magnitudes sum to `magnitude`."""
    eps = {torch.float64: 2**-52, torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-11}[got.dtype]
    sum_eps = 2**-52 if got.dtype == torch.float64 else 2**-23
    bound = eps * want.abs() + (terms + 2) * sum_eps * magnitude + 1e-300
    assert ((got.double() - want).abs() <= bound).all()


def native_branch_grads(x, grad_xa, lora_A, dx, rng, dropout_p, scaling, keep=None):
    """lora_branch_grads: (dA, dX + its branch term) of x [M, k], grad_xa [M, r], lora_A [r, k]; dx None: dA alone;
    keep: the mask's bit words, read in place of drawing it."""
    grad_A = torch.empty_like(lora_A)
    out = None if dx is None else dx.clone()
    seed, offset = rng.tolist() if rng is not None else (0, 0)
    _native.cpu.lora_branch_grads(
        x.data_ptr(),
        grad_xa.data_ptr(),
        lora_A.data_ptr(),
        0 if out is None else out.data_ptr(),
        grad_A.data_ptr(),
        0 if keep is None else keep.data_ptr(),
        x.shape[0],
        x.shape[1],
        lora_A.shape[0],
        _native.dtype_code(x),
        rng is not None,
        seed,
        offset,
        float(ref.keep_threshold(dropout_p)),
        float(torch.tensor(1 / (1 - dropout_p))),
        scaling,
        torch.get_num_threads(),
    )
    return grad_A, out


# (rows, k, rank): a row step of 8 and a tail, and past one AMX step of 32 rows; k past one 240-column block, not a
# multiple of 16, and short; r = 1, 3, 16, two AMX rank tiles (17, 32), and past them (64: the AVX-512 path)
BRANCH_SHAPES = [(19, 517, 16), (8, 37, 3), (3, 250, 1), (1, 16, 64), (45, 300, 17), (33, 40, 32)]


@pytest.mark.parametrize("isa, amx", ISA_AMX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows, k, rank", BRANCH_SHAPES)
@pytest.mark.parametrize("dropout", [True, False])
def test_native_branch_grads_are_the_exact_sums_rounded_once(isa, amx, dtype, rows, k, rank, dropout):
    """dA = s g^T x_d and dX + s ((g A) * keep / (1 - p)), x_d exactly as lora_dropout makes it: against the fp64
    sums of the same (dtype) operands, within one rounding of the output plus fp32 summation error (bf16 up to rank
    32 on AMX tiles where amx)."""
    torch.manual_seed(rows * k + rank)
    x, dx = torch.randn(rows, k).to(dtype), torch.randn(rows, k).to(dtype)
    grad_xa, lora_A = torch.randn(rows, rank).to(dtype), torch.randn(rank, k).to(dtype)
    rng, dropout_p, scaling = (torch.tensor([2**40 + 9, 2**33 + 3]), 0.3, 1.5) if dropout else (None, 0.0, 1.5)
    with cpu_isa(isa), cpu_amx(amx):
        grad_A, dx_out = native_branch_grads(x, grad_xa, lora_A, dx, rng, dropout_p, scaling)
        grad_A_alone, nothing = native_branch_grads(x, grad_xa, lora_A, None, rng, dropout_p, scaling)
        if dropout:  # the forward's bits read in place of the drawn mask: the same outputs, bit for bit
            keep = torch.empty((rows, lora_ops.keep_words(k)), dtype=torch.int64)
            lora_ops.fill_keep(keep, rng, dropout_p, k)
            kept_A, kept_dx = native_branch_grads(x, grad_xa, lora_A, dx, rng, dropout_p, scaling, keep)
            assert torch.equal(kept_A, grad_A) and torch.equal(kept_dx, dx_out)
    keep = ref.keep_mask(rng, x.shape, dropout_p, x.device) if dropout else torch.ones_like(x, dtype=torch.bool)
    x_d = native_dropout(x, rng, dropout_p).double() if dropout else x.double()
    keep_scale = float(torch.tensor(1 / (1 - dropout_p)))
    want_A = scaling * grad_xa.double().t() @ x_d
    want_dx = dx.double() + scaling * torch.where(keep, (grad_xa.double() @ lora_A.double()) * keep_scale, 0.0)
    assert_sums_rounded_once(grad_A, want_A, rows, scaling * grad_xa.double().abs().t() @ x_d.abs())
    magnitude = dx.double().abs() + scaling * keep_scale * grad_xa.double().abs() @ lora_A.double().abs()
    assert_sums_rounded_once(dx_out, want_dx, rank, magnitude)
    assert nothing is None and torch.equal(grad_A_alone, grad_A)


@pytest.mark.parametrize("isa, amx", ISA_AMX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["x", "lora_A"])
def test_native_branch_grads_drop_non_finite_values_at_dropped_positions(isa, amx, dtype, where):
    """inf in x at a dropped element adds nothing to dA; inf in a column of A reaches dX only where kept (on AMX
    tiles too, where the zero-padded ranks and rows meet it)."""
    rng, rows, k = torch.tensor([3, 5]), 9, 40
    keep = ref.keep_mask(rng, (rows, k), 0.5, "cpu")
    x, grad_xa, lora_A = torch.randn(rows, k), torch.randn(rows, 2), torch.randn(2, k)
    if where == "x":
        x = torch.where(keep, x, float("inf"))
    else:
        lora_A[0, 7] = float("inf")
    x, grad_xa, lora_A = x.to(dtype), grad_xa.to(dtype), lora_A.to(dtype)
    with cpu_isa(isa), cpu_amx(amx):
        grad_A, dx = native_branch_grads(x, grad_xa, lora_A, torch.zeros(rows, k, dtype=dtype), rng, 0.5, 1.0)
    if where == "x":
        assert torch.isfinite(grad_A).all() and torch.isfinite(dx).all()
    else:
        assert (dx[~keep] == 0).all() and torch.isinf(dx[:, 7][keep[:, 7]]).all()


@pytest.mark.parametrize("isa, amx", ISA_AMX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [True, False])
def test_native_branch_grads_keep_subnormal_dx_values(isa, amx, dtype, dropout):
    """dX + 0 is dX bit for bit where dX holds subnormals (|v| < 2^-126), among normal values in the same 32 columns
    and in columns of normal values alone: the AMX path's one-instruction bf16 rounding would make them zero."""
    rows, k, rank = 40, 300, 16
    torch.manual_seed(5)
    x, grad_xa, lora_A = torch.randn(rows, k).to(dtype), torch.zeros(rows, rank, dtype=dtype), torch.randn(rank, k)
    dx = torch.randn(rows, k)
    tiny = torch.rand(rows, k) < 0.1
    tiny[:, 64:128] = False  # two 32-column groups of normal values only
    dx = torch.where(tiny, dx.sign() * (1 + torch.rand(rows, k)) * 2.0**-129, dx).to(dtype)
    assert (dx.abs() < 2.0**-126).any() and (dx != 0).all()
    rng, dropout_p = (torch.tensor([7, 8]), 0.3) if dropout else (None, 0.0)
    with cpu_isa(isa), cpu_amx(amx):
        _, dx_out = native_branch_grads(x, grad_xa, lora_A.to(dtype), dx, rng, dropout_p, 2.0)
    assert torch.equal(dx_out, dx)


def native_up_grads(dy, lora_B, xa, scaling):
    """lora_up_grads: (dY B, s dY^T xa) of dy [M, n], lora_B [n, r], xa [M, r]."""
    grad_xa, grad_B = xa.new_empty(xa.shape), torch.empty_like(lora_B)
    _native.cpu.lora_up_grads(dy.data_ptr(), lora_B.data_ptr(), xa.data_ptr(), grad_xa.data_ptr(), grad_B.data_ptr(),
                              dy.shape[0], dy.shape[1], lora_B.shape[1], _native.dtype_code(dy), scaling,
                              torch.get_num_threads())  # fmt: skip
    return grad_xa, grad_B


# (rows, n, rank): one AMX block of 32 x 32, read in place; rows and columns crossing a block (n not a multiple of
# 16, and past one 16-column tile by one); r = 1, 3, 16, two rank tiles (17, 32) and past them (64: the loops);
# no rows, no columns
UP_SHAPES = [(64, 64, 16), (19, 517, 16), (8, 37, 3), (3, 250, 1), (45, 300, 17), (33, 17, 32), (1, 16, 64),
             (0, 40, 4), (5, 0, 4)]  # fmt: skip


@pytest.mark.parametrize("isa, amx, bf16", ISA_AMX_BF16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows, n, rank", UP_SHAPES)
def test_native_up_grads_are_the_exact_sums_rounded_once(isa, amx, bf16, dtype, rows, n, rank):
    """grad_xa = dY B and grad_B = s dY^T xa: against the fp64 sums of the same (dtype) operands, within one rounding
    of the output plus fp32 summation error (bf16 up to rank 32 on AMX tiles where amx, else by AVX512-BF16's dot
    products where bf16)."""
    torch.manual_seed(rows * n + rank)
    dy, lora_B, xa = torch.randn(rows, n).to(dtype), torch.randn(n, rank).to(dtype), torch.randn(rows, rank).to(dtype)
    scaling = 1.5
    with cpu_isa(isa), cpu_amx(amx), cpu_avx512_bf16(bf16):
        grad_xa, grad_B = native_up_grads(dy, lora_B, xa, scaling)
    d, b, a = dy.double(), lora_B.double(), xa.double()
    assert_sums_rounded_once(grad_xa, d @ b, n, d.abs() @ b.abs())
    assert_sums_rounded_once(grad_B, scaling * d.t() @ a, rows, scaling * d.abs().t() @ a.abs())


@pytest.mark.parametrize("isa, amx, bf16", ISA_AMX_BF16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_up_grads_keep_a_non_finite_value_to_its_row_and_column(isa, amx, bf16, dtype):
    """inf in dY[i, j] reaches grad_xa's row i and grad_B's row j only, with the blocks' zero padding around it (a
    partial block of rows and of columns, and ranks past r in a tile)."""
    rows, n, rank = 35, 50, 3
    dy, lora_B, xa = torch.randn(rows, n).to(dtype), torch.randn(n, rank).to(dtype), torch.randn(rows, rank).to(dtype)
    dy[33, 47] = float("inf")
    with cpu_isa(isa), cpu_amx(amx), cpu_avx512_bf16(bf16):
        grad_xa, grad_B = native_up_grads(dy, lora_B, xa, 1.0)
    hit_xa, hit_B = torch.zeros(rows, rank, dtype=torch.bool), torch.zeros(n, rank, dtype=torch.bool)
    hit_xa[33], hit_B[47] = True, True
    assert torch.isfinite(grad_xa[~hit_xa]).all() and torch.isfinite(grad_B[~hit_B]).all()
    assert not torch.isfinite(grad_xa[hit_xa]).any() and not torch.isfinite(grad_B[hit_B]).any()


def native_down(x, lora_A, rng, dropout_p, keep=None):
    """lora_down: dropout(x) A^T of x [M, k], lora_A [r, k] (rng None: no dropout); keep: receives the mask's bits."""
    xa = x.new_empty((x.shape[0], lora_A.shape[0]))
    seed, offset = rng.tolist() if rng is not None else (0, 0)
    keep_ptr = 0 if keep is None else keep.data_ptr()
    _native.cpu.lora_down(x.data_ptr(), lora_A.data_ptr(), xa.data_ptr(), keep_ptr, x.shape[0], x.shape[1],
                          lora_A.shape[0], _native.dtype_code(x), rng is not None, seed, offset,
                          float(ref.keep_threshold(dropout_p)), float(torch.tensor(1 / (1 - dropout_p))),
                          torch.get_num_threads())  # fmt: skip
    return xa


# (rows, k, rank): whole AMX blocks of 32 x 32 (read in place without dropout), rows and columns crossing a block
# (k not a multiple of 32, or of 16), two rank tiles (17, 32), past them (64), and the few rows of a decode step
DOWN_SHAPES = [(64, 64, 16), (45, 517, 3), (33, 40, 32), (32, 300, 17), (40, 16, 1), (35, 64, 64), (5, 130, 16)]


@pytest.mark.parametrize("isa, amx, bf16", ISA_AMX_BF16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows, k, rank", DOWN_SHAPES)
@pytest.mark.parametrize("dropout", [True, False])
def test_native_down_is_the_exact_sums_over_lora_dropouts_x(isa, amx, bf16, dtype, rows, k, rank, dropout):
    """xa = x_d A^T, x_d exactly as lora_dropout makes it: against the fp64 sums of the same operands, within one
    rounding of the output plus fp32 summation error (bf16 up to rank 32 from 32 rows on AMX tiles where amx, else
    by AVX512-BF16 dot products where bf16). Asked for the mask's bits, it writes them over whatever keep held, and xa
    is the same."""
    torch.manual_seed(rows * k + rank)
    x, lora_A = torch.randn(rows, k).to(dtype), torch.randn(rank, k).to(dtype)
    rng, dropout_p = (torch.tensor([2**40 + 9, 2**33 + 3]), 0.3) if dropout else (None, 0.0)
    keep = torch.full((rows, lora_ops.keep_words(k)), -1, dtype=torch.int64) if dropout else None
    with cpu_isa(isa), cpu_amx(amx), cpu_avx512_bf16(bf16):
        xa = native_down(x, lora_A, rng, dropout_p)
        assert torch.equal(native_down(x, lora_A, rng, dropout_p, keep), xa)
        x_d = native_dropout(x, rng, dropout_p).double() if dropout else x.double()
    if dropout:  # the mask's bits, written as x_d was made
        kept, padding = unpack_keep(keep, k)
        assert torch.equal(kept, ref.keep_mask(rng, (rows, k), dropout_p, "cpu")) and not padding.any()
    assert_sums_rounded_once(xa, x_d @ lora_A.double().t(), k, x_d.abs() @ lora_A.double().abs().t())


def unpack_keep(keep, k):
    """(the mask [M, k] as bools, the padding bits past k) of the int64 words keep [M, ceil(k / 64)]."""
    bits = ((keep.unsqueeze(-1) >> torch.arange(64)) & 1).reshape(keep.shape[0], keep.shape[1] * 64)
    return bits[:, :k].bool(), bits[:, k:]


@pytest.mark.parametrize("rows, k", [(3, 64), (5, 70), (2, 1), (0, 9)])
def test_fill_keep_packs_the_reference_mask_into_words(rows, k):
    """Element c of row i is bit c % 64 of word c // 64, the bits past k are 0: the layout the kernels share."""
    rng = torch.tensor([3, 2**40 + 1])
    keep = torch.full((rows, lora_ops.keep_words(k)), -1, dtype=torch.int64)
    lora_ops.fill_keep(keep, rng, 0.4, k)
    kept, padding = unpack_keep(keep, k)
    assert torch.equal(kept, ref.keep_mask(rng, (rows, k), 0.4, "cpu")) and not padding.any()


@pytest.mark.parametrize("isa, amx", ISA_AMX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_branch_grads_take_the_mask_from_keep(isa, amx, dtype):
    """Given keep, the branch pass applies those bits, not the rng's: random bits against the fp64 formula with that
    mask (two AMX row steps and a partial one; a column block boundary mid-word)."""
    rows, k, rank, dropout_p, scaling = 70, 301, 16, 0.3, 1.5
    x, dx = torch.randn(rows, k).to(dtype), torch.randn(rows, k).to(dtype)
    grad_xa, lora_A = torch.randn(rows, rank).to(dtype), torch.randn(rank, k).to(dtype)
    mask = torch.rand(rows, k) < 0.6
    keep = lora_ops.pack_keep(mask)
    with cpu_isa(isa), cpu_amx(amx):
        grad_A, dx_out = native_branch_grads(x, grad_xa, lora_A, dx, torch.tensor([1, 2]), dropout_p, scaling, keep)
    keep_scale = float(torch.tensor(1 / (1 - dropout_p)))
    x_d = torch.where(mask, (x.double() * keep_scale).to(dtype).double(), 0.0)
    want_A = scaling * grad_xa.double().t() @ x_d
    want_dx = dx.double() + scaling * torch.where(mask, (grad_xa.double() @ lora_A.double()) * keep_scale, 0.0)
    torch.testing.assert_close(grad_A.double(), want_A, **TOLERANCES[dtype])
    torch.testing.assert_close(dx_out.double(), want_dx, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, rows", [(torch.bfloat16, 70), (torch.float32, 5)])  # native: lora_down's bits; not
def test_every_backends_forward_fills_keep_and_backward_reads_the_same_mask(backend, dtype, rows):
    """The forward op given keep fills it with the rng's mask on every backend; the backward op given those bits
    returns what it returns drawing the mask."""
    skip_unsupported(backend, dtype, 0)
    x, weight, _, lora_A, lora_B = (
        t.detach() if t is not None else None for t in make_inputs((rows, 80), 24, 16, dtype)
    )
    rng, keep = torch.tensor([7, 2**33]), torch.full((rows, 2), -1, dtype=torch.int64)
    with pyfastpeft.use_backend(backend):
        y, xa = lora_ops.lora_forward(x, weight, None, lora_A, lora_B, 2.0, 0.3, rng, keep)
        dy = torch.randn_like(y)
        drawn = lora_ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, 2.0, 0.3, rng, True)
        read = lora_ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, 2.0, 0.3, rng, True, keep)
    kept, padding = unpack_keep(keep, 80)
    assert torch.equal(kept, ref.keep_mask(rng, (rows, 80), 0.3, "cpu")) and not padding.any()
    for a, b in zip(drawn, read):
        assert torch.equal(a, b)


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("rank", [16, 32, 40])  # one and two rank tiles; past them, torch's products either way
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_native_bf16_layer_agrees_with_and_without_amx_products(monkeypatch, base, rank, dropout_p):
    """Where the CPU has AMX tiles, the native bf16 forward and backward run lora_down and lora_up_grads in place of
    torch's small GEMMs (70 rows: two whole blocks of 32 and a partial one), over an NF4 base the up-projection in
    the base product's epilogue (lora_nf4_matmul), and with dropout the forward keeps the mask's bits for backward:
    y and every grad agree with the same backend without them (bias included)."""
    if not _native.cpu.amx_supported():
        pytest.skip("the CPU has no AMX tiles")
    launched, launch = [], _native.launch
    monkeypatch.setattr(_native, "launch", lambda name, *args: (launched.append(name), launch(name, *args))[1])
    inputs = make_inputs((2, 35, 96), 80, rank, torch.bfloat16, base)
    with cpu_amx(True), pyfastpeft.use_backend("native"):  # the mask's bits kept for backward where lora_down draws it
        y = lora_linear(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], 2.0, dropout_p, True)
        saved = [t for t in y.grad_fn.saved_tensors if t is not None and t.dtype == torch.int64 and t.dim() == 2]
        assert [tuple(t.shape) for t in saved] == ([(70, 2)] if dropout_p and rank <= 32 else [])
    with cpu_amx(True):
        with_amx = forward_backward("native", inputs, 2.0, dropout_p)
    assert ("lora_nf4_matmul" in launched) == (base == "nf4" and rank <= 32)
    with cpu_amx(False):
        without = forward_backward("native", inputs, 2.0, dropout_p)
    assert_all_close(with_amx, without, torch.bfloat16)


@pytest.mark.skipif(CPU_BF16 == [False], reason="the CPU has no AVX512-BF16")
@pytest.mark.parametrize("rank", [16, 32, 40])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_native_bf16_layer_agrees_with_and_without_avx512_bf16_down(monkeypatch, rank, dropout_p):
    """Without AMX, on a CPU with AVX512-BF16, the native bf16 forward makes xa in lora_down (up to rank 32, from 32
    rows) and with dropout keeps the mask's bits for backward, and the backward runs lora_up_grads: y and every grad
    agree with the same backend without them, which drops x and runs torch's GEMMs."""
    launched, launch = [], _native.launch
    monkeypatch.setattr(_native, "launch", lambda name, *args: (launched.append(name), launch(name, *args))[1])
    inputs = make_inputs((2, 35, 96), 80, rank, torch.bfloat16, "dense")
    with cpu_amx(False), cpu_avx512_bf16(True), pyfastpeft.use_backend("native"):
        y = lora_linear(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], 2.0, dropout_p, True)
        saved = [t for t in y.grad_fn.saved_tensors if t is not None and t.dtype == torch.int64 and t.dim() == 2]
        assert [tuple(t.shape) for t in saved] == ([(70, 2)] if dropout_p and rank <= 32 else [])
        with_down = forward_backward("native", inputs, 2.0, dropout_p)
    assert ("lora_down" in launched) == bool(dropout_p and rank <= 32)
    assert ("lora_up_grads" in launched) == (rank <= 32)
    with cpu_amx(False), cpu_avx512_bf16(False):
        without = forward_backward("native", inputs, 2.0, dropout_p)
    assert_all_close(with_down, without, torch.bfloat16)


@pytest.mark.parametrize("amx", CPU_AMX)
def test_native_nf4_bf16_layer_with_a_rank_zero_adapter_is_its_base(amx):
    """r = 0 over an NF4 base, more rows than a GEMV's: the fused up-projection (rank 1 to 32) is not taken and the
    output is the base product alone."""
    x, (packed, state), bias, lora_A, lora_B = make_inputs((40, 64), 32, 0, torch.bfloat16, "nf4")
    with cpu_amx(amx), pyfastpeft.use_backend("native"), torch.no_grad():
        y = lora_linear(x, (packed, state), bias, lora_A, lora_B, 2.0, 0.0, True)
        base = pyfastpeft.functional.nf4_linear(x, packed, state, bias)
    assert torch.equal(y, base)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dropout_kernel_is_reference_bit_for_bit(dtype):
    from pyfastpeft.triton_kernels import lora as triton_lora

    rng = torch.tensor([2**40 + 9, 2**32 - 100])
    x, base = torch.randn(7, 300).to(dtype), torch.randn(7, 300).to(dtype)
    out = torch.empty_like(x)
    keep_scale = float(torch.tensor(1 / 0.7, dtype=torch.float32))
    triton_lora.dropout_into(x, out, rng, 0.3, keep_scale, 1.0, False)
    assert torch.equal(out, ref.dropout(x, 0.3, rng))
    accumulated = base.clone()
    triton_lora.dropout_into(x, accumulated, rng, 0.3, keep_scale, 0.5, True)
    expected = (base.float() + 0.5 * ref.dropout(x.float(), 0.3, rng)).to(dtype)
    torch.testing.assert_close(accumulated, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows, in_features", [(1, 256), (8, 128), (3, 72)])  # the AVX-512 GEMV path, and not
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_nf4_decode_fuses_the_lora_branch_into_the_gemv(monkeypatch, isa, dtype, rows, in_features, dropout_p):
    """Up to 8 rows over an NF4 base, the native forward is one kernel (the down-projection with its dropout, then
    the GEMV adding the up-projection before its one rounding): y and xa equal the unfused torch path's."""
    x, (packed, state), bias, lora_A, lora_B = make_inputs((rows, in_features), 40, 16, dtype, "nf4")
    rng = torch.tensor([7, 1 << 33]) if dropout_p else None
    args = (x.detach(), packed, state.dequantized_absmax(), state.code, bias.detach(), lora_A.detach(),
            lora_B.detach(), 64, 40, in_features, 2.0, dropout_p, rng)  # fmt: skip
    fused = []
    real = lora_ops._native_decode
    monkeypatch.setattr(lora_ops, "_native_decode", lambda *a: fused.append(1) or real(*a))
    with pyfastpeft.use_backend("native"), cpu_isa(isa):
        y, xa = lora_ops.lora_nf4_forward(*args)
        monkeypatch.setattr(lora_ops, "_decodes_fused", lambda *a: False)
        expected_y, expected_xa = lora_ops.lora_nf4_forward(*args)
    assert len(fused) == 1
    tolerance = TOLERANCES[dtype] if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa, expected_xa, **tolerance)
    torch.testing.assert_close(y, expected_y, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("dropout", [False, True])
def test_decode_steps_without_grad_skip_the_op_only_where_it_would_run_the_same_kernel(monkeypatch, dtype, dropout):
    """lora_linear with nothing to differentiate over an NF4 base runs a decode step's kernel without the op's
    dispatch: the op's y, bit for bit. Past 8 rows, a non-contiguous x, the reference backend or a corrupted weight
    go through the op (which checks and raises); xa is not kept."""
    (x, (packed, state), bias, lora_A, lora_B) = make_inputs((2, 3, 128), 40, 8, dtype, "nf4")
    x, bias, lora_A, lora_B = (t.detach() for t in (x, bias, lora_A, lora_B))
    rng = torch.tensor([11, 1 << 35]) if dropout else None
    p = 0.25 if dropout else 0.0
    op_args = (x, packed, state.dequantized_absmax(), state.code.float(), bias, lora_A, lora_B, 64, 40, 128, 0.5, p,
               rng)  # fmt: skip
    want = lora_ops.lora_nf4_forward(*op_args)[0]
    calls = []
    op = lora_ops.lora_nf4_forward
    monkeypatch.setattr(lora_ops, "lora_nf4_forward", lambda *args: calls.append(args) or op(*args))
    with pyfastpeft.use_backend("native"):
        assert torch.equal(lora_ops.lora_nf4_no_grad(*op_args), want) and not calls  # 6 rows: direct
        with torch.no_grad():
            torch.manual_seed(3)
            through_lora_linear = lora_linear(x, (packed, state), bias, lora_A, lora_B, 0.5, p, training=dropout)
        assert not calls
        torch.manual_seed(3)
        expected = lora_linear(x.requires_grad_(), (packed, state), bias, lora_A, lora_B, 0.5, p, training=dropout)
        x.requires_grad_(False)
        assert torch.equal(through_lora_linear, expected.detach())
        lora_ops.lora_nf4_no_grad(x.transpose(0, 1), *op_args[1:])  # not contiguous
        lora_ops.lora_nf4_no_grad(torch.zeros(9, 128, dtype=dtype), *op_args[1:])  # past the GEMV's 8 rows
    with pyfastpeft.use_backend("reference"):
        lora_ops.lora_nf4_no_grad(*op_args)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="packed"):
        lora_ops.lora_nf4_no_grad(x, packed[:-1], *op_args[2:])  # a truncated checkpoint


def _with_rank(args: dict, rank: int) -> dict:
    return {**args, "lora_A": args["lora_A"][:rank].contiguous(), "lora_B": args["lora_B"][:, :rank].contiguous()}


LORA_DECODE_CORRUPTIONS = {
    **DECODE_BASE_CORRUPTIONS,
    "lora_A in another dtype": lambda a: {**a, "lora_A": a["lora_A"].double()},
    "lora_A not contiguous": lambda a: {**a, "lora_A": a["lora_A"].t().contiguous().t()},
    "lora_A narrow": lambda a: {**a, "lora_A": a["lora_A"][:, 1:].contiguous()},
    "lora_A of three dims": lambda a: {**a, "lora_A": a["lora_A"].unsqueeze(0)},
    "lora_B short": lambda a: {**a, "lora_B": a["lora_B"][1:].contiguous()},
    "lora_B of another rank": lambda a: {**a, "lora_B": a["lora_B"][:, 1:].contiguous()},
    "lora_B not contiguous": lambda a: {**a, "lora_B": a["lora_B"].t().contiguous().t()},
    "rank 0": lambda a: _with_rank(a, 0),
    "rank 1": lambda a: _with_rank(a, 1),
    "scaling NaN": lambda a: {**a, "scaling": math.nan},
    "scaling an int": lambda a: {**a, "scaling": 2},
    "scaling a string": lambda a: {**a, "scaling": "2"},
    "dropout_p 1": lambda a: {**a, "dropout_p": 1.0},
    "dropout_p negative": lambda a: {**a, "dropout_p": -0.25},
    "dropout_p a bool": lambda a: {**a, "dropout_p": True},
    "rng of two dims": lambda a: {**a, "rng": a["rng"].view(1, 2)},
    "rng of three elements": lambda a: {**a, "rng": torch.tensor([1, 2, 3])},
    "rng int32": lambda a: {**a, "rng": a["rng"].int()},
    "rng not contiguous": lambda a: {**a, "rng": torch.tensor([11, 0, 1 << 35, 0])[::2]},
    "no rng": lambda a: {**a, "rng": None, "dropout_p": 0.0},
}


@pytest.mark.parametrize("corruption", [None, *LORA_DECODE_CORRUPTIONS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_kernel_takes_only_what_the_ops_check_accepts(corruption, dtype):
    """lora_nf4_no_grad runs the decode kernel itself where _decode_takes says so, without the op's check: it must
    refuse whatever that check refuses, and where it accepts, the output is the op's y, bit for bit."""
    x, (packed, state), bias, lora_A, lora_B = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in make_inputs((3, 128), 48, 8, dtype, "nf4")
    )
    args = dict(x=x, packed=packed, absmax=state.dequantized_absmax(), code=state.code.float(), bias=bias,
                lora_A=lora_A, lora_B=lora_B, blocksize=64, out_features=48, in_features=128, scaling=0.5,
                dropout_p=0.25, rng=torch.tensor([11, 1 << 35]))  # fmt: skip
    assert_decode_path_agrees(
        lora_ops._decode_takes,
        lora_ops._single_checks("lora_nf4", KINDS["nf4"])[0],
        lora_ops.lora_nf4_no_grad,
        lambda *values: lora_ops.lora_nf4_forward(*values)[0],
        args,
        LORA_DECODE_CORRUPTIONS,
        corruption,
    )


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_an_rng_view_draws_the_mask_of_its_two_values(backend):
    """rng is read as its two values wherever they lie: a strided view of (seed, offset) draws the mask of the
    contiguous pair on every backend (the Triton kernels read rng_ptr and rng_ptr + 1)."""
    x, weight, _, lora_A, lora_B = (t.detach() for t in make_inputs((5, 64), 24, 4, torch.float32))
    dy = torch.randn(5, 24)

    def forward_and_backward(rng):
        y, xa = lora_ops.lora_forward(x, weight, None, lora_A, lora_B, 0.5, 0.25, rng)
        return (y, xa, *lora_ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, 0.5, 0.25, rng, True))

    view = torch.tensor([11, -1, 1 << 35, -1])[::2]
    expected = run(backend, forward_and_backward, view.contiguous())
    for got, want in zip(run(backend, forward_and_backward, view), expected):
        assert torch.equal(got, want)


# ---- lora_linear ------------------------------------------------------------------------------------------


def make_inputs(x_shape, out_features, rank, dtype, base="dense", bias="grad"):
    """x, weight (dense, the NF4 pair or the int8 (codes, SCB) pair), bias (None, trained or frozen), A, B:
    outputs of order 1."""
    in_features = x_shape[-1]
    x = torch.randn(x_shape).to(dtype).requires_grad_()
    dense = torch.randn(out_features, in_features) / math.sqrt(in_features)
    weight = {
        "dense": lambda: dense.to(dtype),
        "nf4": lambda: quantize_nf4(dense.to(dtype), blocksize=64),
        "int8": lambda: quantize_int8_weight(dense),
    }[base]()
    bias_tensor = None if bias is None else torch.randn(out_features).to(dtype).requires_grad_(bias == "grad")
    lora_A = (torch.randn(rank, in_features) / math.sqrt(in_features)).to(dtype).requires_grad_()
    lora_B = (torch.randn(out_features, rank) / math.sqrt(rank)).to(dtype).requires_grad_()
    return x, weight, bias_tensor, lora_A, lora_B


def forward_backward(backend, inputs, scaling, dropout_p, training=True, seed=1):
    """(y, grads of x, bias, A, B) with the generator seeded (seed None: left as it is); a grad is None where
    nothing requires it."""
    x, weight, bias, lora_A, lora_B = inputs
    leaves = (x, bias, lora_A, lora_B)
    for leaf in leaves:
        if leaf is not None:
            leaf.grad = None
    if seed is not None:
        torch.manual_seed(seed)
    with pyfastpeft.use_backend(backend):
        y = lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
        y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape).to(y.dtype))
    return [y.detach()] + [None if leaf is None or leaf.grad is None else leaf.grad.clone() for leaf in leaves]


def assert_all_close(actual, expected, dtype):
    for got, want in zip(actual, expected):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("tile_elements", [1, 100, 10**9])  # a row a tile; 2 rows (the last tile short); one tile
def test_native_dropout_tiles_draw_each_rows_mask(monkeypatch, base, tile_elements):
    """The native forward makes x_d a tile of rows at a time: every tile draws its rows' own mask elements
    (in_features = 37 puts tile starts mid-block), so the result, and backward's from the same rng, are the
    reference's."""
    monkeypatch.setattr(lora_ops, "TILE_ELEMENTS", tile_elements)
    inputs = make_inputs((2, 5, 37), 23, 8, torch.float64 if base == "dense" else torch.float32, base=base)
    expected = forward_backward("reference", inputs, 0.5, 0.4)
    actual = forward_backward("native", inputs, 0.5, 0.4)
    dtype = inputs[0].dtype
    assert_all_close(actual, expected, dtype)


# (x shape, out_features, rank, bias): M = 1, a 3-D x, in/out features not multiples of 16, r = 1, 16, 64; over an
# NF4 base, up to 8 rows take the fused decode kernels (the last two: its AVX-512 path, in_features % 128 == 0)
SHAPES = [
    ((1, 33), 17, 1, None),
    ((2, 5, 40), 24, 16, "grad"),
    ((7, 19), 21, 64, "frozen"),
    ((3, 256), 40, 16, "grad"),
    ((2, 1, 128), 33, 32, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_shape, out_features, rank, bias", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("base", ["dense", "nf4", "int8"])
def test_lora_linear_matches_reference(backend, x_shape, out_features, rank, bias, dtype, dropout_p, base):
    skip_unsupported(backend, dtype, 0)
    inputs = make_inputs(x_shape, out_features, rank, dtype, base, bias)
    scaling = 16 / rank
    expected = forward_backward("reference", inputs, scaling, dropout_p)
    assert_all_close(forward_backward(backend, inputs, scaling, dropout_p), expected, dtype)


@pytest.mark.parametrize("base", ["dense", "nf4", "int8"])
@pytest.mark.parametrize("rows", [1, 12])  # a decode step (NF4: the fused GEMV) and a prefill
def test_without_anything_to_differentiate_the_op_runs_alone_with_the_same_bits(monkeypatch, base, rows):
    """Nothing requires grad (or grad mode is off): lora_linear calls its forward op without the autograd.Function,
    drawing the same mask from the same seed; with a leaf that requires grad it goes through the Function."""
    applied = []
    apply = lora_ops.LoRALinearFunction.apply
    monkeypatch.setattr(lora_ops.LoRALinearFunction, "apply", lambda *args: applied.append(1) or apply(*args))
    x, weight, bias, lora_A, lora_B = make_inputs((rows, 64), 24, 4, torch.float32, base)
    frozen = [t.detach() for t in (x, bias, lora_A, lora_B)]
    results = []
    for args, grad_mode in ((frozen, True), ((x, bias, lora_A, lora_B), False), ((x, bias, lora_A, lora_B), True)):
        torch.manual_seed(3)
        with torch.set_grad_enabled(grad_mode):
            results.append(lora_linear(args[0], weight, args[1], args[2], args[3], 2.0, 0.3, training=True))
    assert not results[0].requires_grad and not results[1].requires_grad and results[2].requires_grad
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2].detach())
    assert len(applied) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["x", "lora_A"])
def test_inf_at_a_dropped_position_is_dropped_as_in_the_reference(backend, where):
    """An inf where the mask drops (in x: forward and dA; in A's column: dX's adapter term) gives the
    reference's values, not the NaN of inf * 0."""
    x, weight, bias, lora_A, lora_B = make_inputs((4, 32), 8, 2, torch.float32)
    weight = weight.abs() + 0.1  # a row of x holding +inf makes a row of +inf in y, not a mix of signs
    torch.manual_seed(1)
    keep = ref.keep_mask(torch.randint(0, lora_ops.SEED_HIGH, (2,)), x.shape, 0.5, x.device)
    row, col = (~keep).nonzero()[0].tolist()
    with torch.no_grad():
        (x[row, col] if where == "x" else lora_A[0, col]).fill_(float("inf"))
    inputs = (x, weight, bias, lora_A, lora_B)
    expected = forward_backward("reference", inputs, 0.5, 0.5)
    assert expected[0].isinf().any() and not expected[0].isnan().all()
    for got, want in zip(forward_backward(backend, inputs, 0.5, 0.5), expected):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32], equal_nan=True)


@pytest.mark.parametrize("rank, scaling", [(8, 16 / 8), (64, 16 / math.sqrt(64))])  # alpha / r and rsLoRA
@pytest.mark.parametrize("bias", [None, "grad"])
def test_reference_is_peft_eager_dropout_and_two_linears(rank, scaling, bias):
    """fp64: y and every grad equal PEFT's graph, F.linear(x, W, b) + s * lora_B(lora_A(dropout(x))), with the
    dropout mask keep = u > p of the shared uniforms."""
    x, weight, bias_tensor, lora_A, lora_B = make_inputs((3, 4, 37), 23, rank, torch.float64, bias=bias)
    torch.manual_seed(5)
    rng = torch.randint(0, lora_ops.SEED_HIGH, (2,))
    keep = ref.keep_mask(rng, x.shape, 0.3, x.device)
    keep_scale = float(torch.tensor(1 / 0.7, dtype=torch.float32))  # every backend scales by fp32(1 / (1 - p))
    x_dropped = x * keep * keep_scale
    peft_y = torch.nn.functional.linear(x, weight, bias_tensor) + scaling * torch.nn.functional.linear(
        torch.nn.functional.linear(x_dropped, lora_A), lora_B
    )
    leaves = [t for t in (x, bias_tensor, lora_A, lora_B) if t is not None]
    dy = torch.randn_like(peft_y)
    expected = [peft_y] + list(torch.autograd.grad(peft_y, leaves, dy))
    torch.manual_seed(5)
    with pyfastpeft.use_backend("reference"):
        y = lora_linear(x, weight, bias_tensor, lora_A, lora_B, scaling, 0.3, True)
    actual = [y] + list(torch.autograd.grad(y, leaves, dy))
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_mask_on_every_backend_and_no_draw_without_dropout(backend):
    inputs = make_inputs((6, 50), 20, 8, torch.float32)
    with_dropout = forward_backward(backend, inputs, 2.0, 0.5, seed=3)
    assert_all_close(forward_backward("reference", inputs, 2.0, 0.5, seed=3), with_dropout, torch.float32)
    assert_all_close(forward_backward(backend, inputs, 2.0, 0.5, seed=3), with_dropout, torch.float32)
    without = forward_backward(backend, inputs, 2.0, 0.0)
    assert not torch.allclose(with_dropout[0], without[0])
    assert not torch.allclose(forward_backward(backend, inputs, 2.0, 0.5, seed=4)[0], with_dropout[0])
    for dropout_p, training in ((0.0, True), (0.5, False)):
        state = torch.get_rng_state()
        assert_all_close(forward_backward(backend, inputs, 2.0, dropout_p, training, seed=None), without, torch.float32)
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("base", ["dense", "nf4", "int8"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_gradcheck_float64(backend, base, dropout_p):
    """fp64 through the reference and through the C++ scalar dropout path; the generator is reseeded per
    call so every evaluation draws the same mask."""
    x, weight, bias, lora_A, lora_B = make_inputs((2, 3, 9), 7, 3, torch.float64, base)

    def fn(x, bias, lora_A, lora_B):
        torch.manual_seed(0)
        return lora_linear(x, weight, bias, lora_A, lora_B, 0.75, dropout_p, True)

    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, bias, lora_A, lora_B))


def op_samples(base):
    x = torch.randn(2, 3, 40)
    lora_A, lora_B = torch.randn(4, 40), torch.randn(24, 4)
    rng, no_rng = torch.tensor([9, 10]), None
    weight = torch.randn(24, 40)
    packed, state = quantize_nf4(weight)
    base_args = {
        "dense": (weight,),
        "nf4": (packed, state.dequantized_absmax(), state.code),
        "int8": quantize_int8_weight(weight),
    }[base]
    base_ints = {"dense": (), "nf4": (64, 24, 40), "int8": (6.0,)}[base]
    xa = torch.randn(6, 4)
    dy = torch.randn(2, 3, 24)
    for bias, r in ((torch.randn(24), rng), (None, no_rng)):
        forward = (x, *base_args, bias, lora_A, lora_B, *base_ints, 0.5, 0.2, r)
        for needs_dx in (True, False):
            yield "forward", forward
            yield "backward", (dy, x, *base_args, lora_A, lora_B, xa, *base_ints, 0.5, 0.2, r, needs_dx)
    keep = torch.empty(6, 1, dtype=torch.int64)  # the mask's bits: x's 6 rows, a word each (40 columns)
    yield "forward", (x, *base_args, None, lora_A, lora_B, *base_ints, 0.5, 0.2, rng, keep)
    yield "backward", (dy, x, *base_args, lora_A, lora_B, xa, *base_ints, 0.5, 0.2, rng, True, keep)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("base", ["dense", "nf4", "int8"])
def test_opcheck(backend, base):
    forward_op, backward_op = lora_ops.BASE_OPS[base]
    with pyfastpeft.use_backend(backend):
        for which, args in op_samples(base):
            torch.library.opcheck(forward_op if which == "forward" else backward_op, args)


def test_compiles_fullgraph_with_dropout():
    class TinyLoRA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(12, 20), requires_grad=False)
            self.lora_A = torch.nn.Parameter(torch.randn(4, 20))
            self.lora_B = torch.nn.Parameter(torch.randn(12, 4))

        def forward(self, x):
            return lora_linear(x, self.weight, None, self.lora_A, self.lora_B, 2.0, 0.1, self.training)

    module, x = TinyLoRA(), torch.randn(3, 20)
    torch.manual_seed(2)
    expected = module(x)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.manual_seed(2)
    y = compiled(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert module.lora_A.grad is not None and module.lora_B.grad is not None


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_activation_checkpointing_recomputes_the_same_mask(backend):
    inputs = make_inputs((4, 30), 18, 8, torch.float32)
    x, weight, bias, lora_A, lora_B = inputs
    plain = forward_backward(backend, inputs, 2.0, 0.5)

    def block(x):
        return lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 0.5, True)

    for leaf in (x, bias, lora_A, lora_B):
        leaf.grad = None
    torch.manual_seed(1)
    with pyfastpeft.use_backend(backend):
        y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    assert_all_close([y.detach(), x.grad, bias.grad, lora_A.grad, lora_B.grad], plain, torch.float32)


def saved_bytes(fn):
    """Bytes autograd saves for backward while fn runs, each storage counted once."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_saves_less_than_peft_eager_graph():
    """PEFT: dropout module (saves its mask) + lora_A (saves x_d) + lora_B (saves xa); we save x and xa and
    regenerate the mask: less by at least the x_d and mask bytes minus x."""
    x = torch.randn(64, 256, requires_grad=True)
    weight = torch.randn(128, 256)
    lora_A = torch.randn(16, 256, requires_grad=True)
    lora_B = torch.randn(128, 16, requires_grad=True)
    dropout, linear = torch.nn.functional.dropout, torch.nn.functional.linear

    def peft():
        return linear(x, weight) + 2.0 * linear(linear(dropout(x, 0.1, True), lora_A), lora_B)

    ours = saved_bytes(lambda: lora_linear(x, weight, None, lora_A, lora_B, 2.0, 0.1, True))
    theirs = saved_bytes(peft)
    assert ours + x.numel() * 1 <= theirs, (ours, theirs)  # at least the bool mask smaller


def test_empty_rows_give_empty_results():
    inputs = make_inputs((0, 33), 17, 4, torch.float32)
    y, dx, _, grad_A, grad_B = forward_backward("native", inputs, 2.0, 0.25)
    assert y.shape == (0, 17) and dx.shape == (0, 33)
    assert torch.equal(grad_A, torch.zeros(4, 33)) and torch.equal(grad_B, torch.zeros(17, 4))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(lora_B=torch.randn(17, 3)), ValueError, "rank"),
        (dict(lora_A=torch.randn(4, 32)), ValueError, "lora_A"),
        (dict(x=torch.randn(2, 32)), ValueError, "in_features"),
        (dict(weight=torch.randn(17, 32)), ValueError, "in_features"),
        (dict(lora_B=torch.randn(16, 4)), ValueError, "out_features"),
        (dict(bias=torch.randn(16)), ValueError, "bias"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(lora_A=torch.randn(4, 33, dtype=torch.float64)), TypeError, "lora_A"),
        (dict(weight=torch.randn(17, 33).half()), TypeError, "weight"),
        (dict(bias=torch.randn(17).bfloat16()), TypeError, "bias"),
        (dict(x=torch.randint(0, 3, (2, 33))), TypeError, "x"),
        (dict(weight=(torch.zeros(3, dtype=torch.uint8), None)), TypeError, "QuantState"),
        (dict(weight=[1, 2]), TypeError, "weight"),
        (dict(scaling="2"), TypeError, "scaling"),
        (dict(training=1), TypeError, "training"),
        (dict(lora_A=torch.randn(4, 33, device="meta")), ValueError, "lora_A"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, error, message):
    args = dict(
        x=torch.randn(2, 33),
        weight=torch.randn(17, 33),
        bias=torch.randn(17),
        lora_A=torch.randn(4, 33),
        lora_B=torch.randn(17, 4),
        scaling=2.0,
        dropout_p=0.1,
        training=True,
    )
    args.update(change)
    with pytest.raises(error, match=message):
        lora_linear(**args)


def test_nf4_weight_with_wrong_packed_size_raises():
    packed, state = quantize_nf4(torch.randn(17, 33))
    with pytest.raises(ValueError, match="packed"):
        lora_linear(torch.randn(2, 33), (packed[:-1], state), None, torch.randn(4, 33), torch.randn(17, 4), 1.0)


@pytest.mark.parametrize(
    "weight, error, message",
    [
        ((torch.zeros(17, 33, dtype=torch.int8), torch.ones(16)), ValueError, "weight_stats has 16 elements"),
        ((torch.zeros(17, 33, dtype=torch.int8), torch.ones(17, dtype=torch.float64)), TypeError, "weight_stats must"),
        ((torch.zeros(17, 33, dtype=torch.int8), torch.ones(17), -1.0), ValueError, "threshold must be >= 0"),
    ],
)
def test_int8_base_with_bad_parts_raises(weight, error, message):
    with pytest.raises(error, match=message):
        lora_linear(torch.randn(2, 33), weight, None, torch.randn(4, 33), torch.randn(17, 4), 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_cuda_matches_reference(dtype, base):
    """The CUDA default (Triton's fused forward) against the reference on the GPU, dropout on, same mask."""
    inputs = [t.cuda() if isinstance(t, torch.Tensor) else t for t in make_inputs((3, 100, 320), 200, 16, dtype)]
    inputs = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    if base == "nf4":
        inputs[1] = quantize_nf4(inputs[1])
    expected = forward_backward("reference", inputs, 2.0, 0.1)
    actual = forward_backward("auto", inputs, 2.0, 0.1)
    loose = {name: 4 * value for name, value in TOLERANCES[dtype].items()}  # sums of 320 and 300 terms
    for got, want in zip(actual, expected):
        if got is not None:
            torch.testing.assert_close(got, want, **loose)
