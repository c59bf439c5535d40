"""LoRA: the shared Philox dropout mask (reference vs Triton's tl.rand vs the C++ kernel, bit for bit), the
lora_linear forward and backward on every backend against the reference, autograd, opcheck, compile and
memory."""
import pytest
import torch

from helpers import CPU_ISAS, HAS_TRITON, cpu_isa
from pyfastpeft import _native
from pyfastpeft.reference import lora as ref

RNG_CASES = [(0, 0), (123456789123, 2**32 - 5), (2**62 - 1, 77), (5, 2**40 + 3)]


def native_dropout(x, rng, dropout_p, alpha=1.0, accumulate_into=None):
    out = torch.empty_like(x) if accumulate_into is None else accumulate_into.clone()
    seed, offset = rng.tolist()
    _native.cpu.lora_dropout(x.data_ptr(), out.data_ptr(), x.numel(), _native.dtype_code(x), seed, offset,
                             float(ref.keep_threshold(dropout_p)), float(torch.tensor(1 / (1 - dropout_p))),
                             alpha, accumulate_into is not None, torch.get_num_threads())
    return out


# ---- the dropout mask ----------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("seed, offset", RNG_CASES)
def test_reference_uniforms_are_triton_tl_rand_bit_for_bit(seed, offset):
    import triton
    import triton.language as tl

    @triton.jit
    def uniforms_kernel(rng_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        counter = (tl.load(rng_ptr + 1) + index).to(tl.uint32)
        tl.store(out_ptr + index, tl.rand(tl.load(rng_ptr), counter), mask=index < numel)

    rng = torch.tensor([seed, offset])
    numel = 3000
    out = torch.empty(numel)
    uniforms_kernel[(triton.cdiv(numel, 1024),)](rng, out, numel, BLOCK=1024)
    assert torch.equal(out, ref.philox_uniform(rng, numel))


def test_uniforms_cover_zero_to_one_and_offsets_shift_the_stream():
    u = ref.philox_uniform(torch.tensor([7, 100]), 20000)
    assert 0.0 <= u.min() < 0.001 and 0.999 < u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(ref.philox_uniform(torch.tensor([7, 110]), 100), u[10:110])


def test_counter_wraps_modulo_two_to_the_32():
    wrapped = ref.philox_uniform(torch.tensor([3, 2**32 - 2]), 4)
    assert torch.equal(wrapped[2:], ref.philox_uniform(torch.tensor([3, 0]), 2))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("seed, offset, dropout_p", [(s, o, p) for (s, o), p in zip(RNG_CASES, (0.05, 0.5, 0.3, 0.9))])
def test_native_dropout_is_reference_bit_for_bit(isa, dtype, seed, offset, dropout_p):
    rng = torch.tensor([seed, offset])
    x = torch.randn(5, 1029).to(dtype)  # not a multiple of the 16-lane blocks or the 1024-element chunks
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
