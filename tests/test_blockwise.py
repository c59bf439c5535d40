"""8-bit blockwise quantization (byte for byte bitsandbytes' quantize_blockwise) and the fused 8-bit Adam / Lion
steps: every native path equal to the reference bit for bit, on every instruction set."""

import math

import pytest
import torch
from helpers import CPU_ISAS, CPU_VBMI, HAS_TRITON, cpu_avx512_vbmi, cpu_isa

import pyfastpeft
from pyfastpeft.ops import blockwise as ops
from pyfastpeft.quant import BlockwiseState, create_dynamic_map, dequantize_blockwise, quantize_blockwise
from pyfastpeft.reference import blockwise as ref


def _bitsandbytes():
    try:
        import bitsandbytes
        import bitsandbytes.functional as functional

        functional.create_dynamic_map()
    except Exception:  # the oracle not working means: skip the comparisons, not fail them
        return None
    return bitsandbytes


bnb = _bitsandbytes()
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not importable")
MAPS = {"signed": ref.SIGNED_MAP, "unsigned": ref.UNSIGNED_MAP}


def bnb_default_quantize(x, code, blocksize):
    """bnb's quantize_blockwise on its pure-PyTorch backend (the nearest code; its native CPU kernel rounds through
    a 65536-entry grid instead)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    with torch.compiler.set_stance("force_eager"):
        return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, blocksize)


def values_with_specials(n, signed=True, seed=0):
    """Normal values over seven decades, exact zeros, a whole zero block and values on code midpoints."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 6
    x[::97] = 0.0
    if n > 700:
        x[256:512] = 0.0
        mids = ref.midpoints(MAPS["signed" if signed else "unsigned"])
        x[600:700] = mids[torch.randint(0, 255, (100,), generator=gen)] * x[512:600].abs().max().clamp(min=1e-3)
    return x if signed else x.abs()


def crowded_code():
    """A sorted code with three values within 2e-5: two midpoints share a bucket of the native table."""
    code = torch.linspace(-1, 1, 256)
    code[200:203] = code[200] + torch.tensor([0.0, 1e-5, 2e-5])
    return code


@needs_bnb
def test_dynamic_maps_are_bitsandbytes_bit_for_bit():
    for signed in (True, False):
        theirs = bnb.functional.create_dynamic_map(signed=signed)
        assert torch.equal(create_dynamic_map(signed).view(torch.int32), theirs.view(torch.int32))


def test_both_dynamic_maps_take_the_bucket_table():
    """The fast path is exact for both maps (no bucket of the table holds two midpoints)."""
    assert ops.table_exact(ref.SIGNED_MAP) and ops.table_exact(ref.UNSIGNED_MAP)
    assert not ops.table_exact(crowded_code())  # served by the binary search


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [64, 256, 2048, 4096])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 4097, 50_000])
def test_quantize_matches_bitsandbytes_byte_for_byte(n, signed, blocksize, dtype):
    x = values_with_specials(n, signed).to(dtype)
    code = create_dynamic_map(signed)
    codes, state = quantize_blockwise(x, code=code, blocksize=blocksize)
    theirs, theirs_absmax = bnb_default_quantize(x, code, blocksize)
    assert torch.equal(codes, theirs)
    assert torch.equal(state.absmax, theirs_absmax)
    bnb_state = bnb.functional.QuantState(absmax=state.absmax, code=code, blocksize=blocksize, dtype=dtype)
    assert torch.equal(dequantize_blockwise(codes, state), bnb.functional.dequantize_blockwise(codes, bnb_state))


@needs_bnb
def test_nested_state_matches_bitsandbytes():
    """nested=True: absmax - mean quantized again with the signed map and the same blocksize, as bnb does."""
    x = torch.randn(64, 4096)
    codes, state = quantize_blockwise(x, blocksize=256, nested=True)
    _, plain_absmax = bnb_default_quantize(x, ref.SIGNED_MAP, 256)
    offset = plain_absmax.mean()
    nested_codes, absmax2 = bnb_default_quantize(plain_absmax - offset, ref.SIGNED_MAP, 256)
    assert torch.equal(state.offset, offset)
    assert torch.equal(state.absmax, nested_codes) and torch.equal(state.state2.absmax, absmax2)
    state2 = bnb.functional.QuantState(absmax=absmax2, code=ref.SIGNED_MAP, blocksize=256, dtype=torch.float32)
    bnb_state = bnb.functional.QuantState(
        absmax=nested_codes, code=ref.SIGNED_MAP, blocksize=256, dtype=torch.float32, offset=offset, state2=state2
    )
    assert torch.equal(dequantize_blockwise(codes, state), bnb.functional.dequantize_blockwise(codes, bnb_state))
    plain = dequantize_blockwise(*quantize_blockwise(x, blocksize=256))
    assert (dequantize_blockwise(codes, state) - x).abs().mean() < 1.05 * (plain - x).abs().mean()


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("blocksize", [64, 100, 4096])
def test_native_quantize_equals_reference_on_every_isa(isa, dtype, blocksize):
    for signed in (True, False):
        x = values_with_specials(9_001, signed, seed=blocksize).to(dtype)
        x[5000] = float("nan")
        x[7000] = float("inf")
        code = MAPS["signed" if signed else "unsigned"]
        with cpu_isa(isa), pyfastpeft.use_backend("native"):
            codes, absmax = ops.blockwise_quantize(x, code, blocksize)
            out = ops.blockwise_dequantize(codes, absmax, code, blocksize, dtype)
        with pyfastpeft.use_backend("reference"):
            ref_codes, ref_absmax = ops.blockwise_quantize(x, code, blocksize)
            ref_out = ops.blockwise_dequantize(ref_codes, ref_absmax, code, blocksize, dtype)
        assert torch.equal(codes, ref_codes)
        assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32))
        assert torch.equal(out.view(-1).float().nan_to_num(9.0), ref_out.view(-1).float().nan_to_num(9.0))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_binary_search_path_equals_reference(isa):
    code = crowded_code()
    x = values_with_specials(5_000, seed=3)
    x[:100] = code[200] + torch.linspace(-1e-4, 1e-4, 100)
    with cpu_isa(isa), pyfastpeft.use_backend("native"):
        codes, _ = ops.blockwise_quantize(x, code, 256)
    assert torch.equal(codes, ref.quantize(x, code, 256)[0])


def adam_constants(step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    correction1, correction2 = 1 - betas[0] ** step, math.sqrt(1 - betas[1] ** step)
    return (-lr * correction2 / correction1, correction2 * eps, betas[0], betas[1], 1 - lr * weight_decay)


def fresh_states(n, two=True):
    nblocks = -(-n // 256)
    states = [torch.zeros(n, dtype=torch.uint8), torch.zeros(nblocks)]
    return states + [torch.zeros(n, dtype=torch.uint8), torch.zeros(nblocks)] if two else states


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("vbmi", CPU_VBMI)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [300, 4096 * 3 + 17])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_step_equals_reference_bit_for_bit(isa, vbmi, dtype, n, weight_decay):
    gen = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=gen).to(dtype)
    ours = [p0.clone(), *fresh_states(n)]
    theirs = [p0.clone(), *fresh_states(n)]
    for step in range(1, 5):
        g = (torch.randn(n, generator=gen) * 10.0 ** float(step - 3)).to(dtype)
        if step == 2:
            g[7], g[100], g[299] = float("nan"), float("inf"), float("-inf")
        constants = adam_constants(step, weight_decay=weight_decay)
        before = ours[0][[7, 100, 299]].clone()
        for tensors, backend in ((ours, "native"), (theirs, "reference")):
            p, s1, a1, s2, a2 = tensors
            with cpu_isa(isa), cpu_avx512_vbmi(vbmi), pyfastpeft.use_backend(backend):
                ops.adam8bit_step(p, g, s1, s2, a1, a2, ref.SIGNED_MAP, ref.UNSIGNED_MAP, *constants)
        for name, a, b in zip(("p", "state1", "absmax1", "state2", "absmax2"), ours, theirs):
            assert torch.equal(a, b), f"step {step}: {name} differs in {(a != b).sum().item()} places"
        if step == 2:  # a non-finite gradient leaves its parameter alone
            assert torch.equal(ours[0][[7, 100, 299]], before)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("vbmi", CPU_VBMI)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lion_step_equals_reference_bit_for_bit(isa, vbmi, dtype):
    n = 4096 + 300
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(n, generator=gen).to(dtype)
    ours, theirs = [p0.clone(), *fresh_states(n, two=False)], [p0.clone(), *fresh_states(n, two=False)]
    for step in range(4):
        g = (torch.randn(n, generator=gen) * 0.01).to(dtype)
        g[3] = float("nan") if step == 1 else g[3]
        for tensors, backend in ((ours, "native"), (theirs, "reference")):
            p, s1, a1 = tensors
            with cpu_isa(isa), cpu_avx512_vbmi(vbmi), pyfastpeft.use_backend(backend):
                ops.lion8bit_step(p, g, s1, a1, ref.SIGNED_MAP, 1e-4, 0.9, 0.99, 1 - 1e-4 * 0.1)
        for name, a, b in zip(("p", "state1", "absmax1"), ours, theirs):
            assert torch.equal(a, b), f"step {step}: {name} differs"


def native_and_reference_steps(optimizer, vbmi, g, states, step=1, ours="native"):
    """One step of `optimizer` ("adam" or "lion") on copies of states = (p, s1, a1, s2, a2) by our backend (native:
    with the VBMI lookups on or off) and by the reference; their results, as raw bytes."""
    results = []
    for backend in (ours, "reference"):
        p, s1, a1, s2, a2 = (t.clone() for t in states)
        with cpu_avx512_vbmi(vbmi), pyfastpeft.use_backend(backend):
            if optimizer == "adam":
                ops.adam8bit_step(p, g, s1, s2, a1, a2, ref.SIGNED_MAP, ref.UNSIGNED_MAP, *adam_constants(step))
            else:
                ops.lion8bit_step(p, g, s1, a1, ref.SIGNED_MAP, 1e-4, 0.9, 0.99, 1.0)
        results.append([t.view(torch.uint8) for t in (p, s1, a1, s2, a2)])
    return results


@pytest.mark.parametrize("vbmi", CPU_VBMI)
@pytest.mark.parametrize("optimizer", ["adam", "lion"])
def test_every_state_code_decodes_as_the_reference(vbmi, optimizer):
    # States that hold each of the 256 codes (in a shuffled order, every block) under random absmax: one step reads
    # every entry of both maps, through the byte lookups (vbmi) or the float permutes, and must be the reference's
    # bits. A zero gradient keeps the states' decoded values at the centre of the update. A NaN absmax (a corrupt
    # state) makes its block's momentum NaN: Lion's torch.sign of it is 0, so the parameter stays.
    n = 256 * 8
    gen = torch.Generator().manual_seed(3)
    codes = torch.cat([torch.randperm(256, generator=gen) for _ in range(n // 256)]).to(torch.uint8)
    absmax = torch.rand(n // 256, generator=gen) + 0.5
    absmax[5], absmax[6] = float("nan"), -float("nan")  # corrupt blocks: NaN states take code 255 (254 if negative)
    p0, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-3
    g[::3] = 0.0
    ours, theirs = native_and_reference_steps(optimizer, vbmi, g, (p0, codes, absmax, codes.flip(0), absmax.flip(0)), 3)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("optimizer", ["adam", "lion"])
def test_triton_steps_take_corrupt_states_and_signed_zeros_as_the_reference(optimizer):
    # Every code under random absmax, NaN absmax of either sign (a full and the partial last block), and a block
    # with a negative absmax, whose zero code decodes to -0: with a -0 gradient, Lion's blend there is -0, whose
    # torch.sign is +0, so a -0 parameter stays -0. NaN states give a NaN absmax and code 255 (254 if negative), and
    # Lion's sign of a NaN blend is 0. The kernels write these with comparisons, not min/max, which a GPU's
    # instructions would resolve to the other operand; the interpreter runs the same expressions.
    n = 256 * 8 + 40
    gen = torch.Generator().manual_seed(4)
    codes = torch.cat([torch.randperm(256, generator=gen) for _ in range(n // 256 + 1)])[:n].to(torch.uint8)
    absmax = torch.rand(n // 256 + 1, generator=gen) + 0.5
    absmax[5], absmax[6], absmax[8] = float("nan"), -float("nan"), float("nan")
    absmax[2] = -0.75
    p0, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-3
    zero_code = 512 + int((ref.SIGNED_MAP[codes[512:768].long()] == 0).nonzero()[0])
    p0[zero_code], g[zero_code] = -0.0, -0.0
    g[::3] = 0.0
    states = (p0, codes, absmax, codes.flip(0), absmax.flip(0))
    ours, theirs = native_and_reference_steps(optimizer, False, g, states, 3, ours="triton")
    for name, a, b in zip(("p", "state1", "absmax1", "state2", "absmax2"), ours, theirs):
        assert torch.equal(a, b), f"{name} differs in {(a != b).sum().item()} bytes"


@pytest.mark.parametrize("vbmi", CPU_VBMI)
@pytest.mark.parametrize("optimizer", ["adam", "lion"])
def test_tiny_momentum_keeps_its_sign_on_every_path(vbmi, optimizer):
    # Momentum far below its block's absmax rounds to the zero code; the sign rule then moves a negative one to the
    # smallest negative code. Both directions of the native search and rule against the reference, bit for bit.
    n = 256 * 4
    g = torch.full((n,), -1e-9)
    g[1::2] = 1e-9
    g[::256] = 1.0
    ours, theirs = native_and_reference_steps(optimizer, vbmi, g, (torch.zeros(n), *fresh_states(n)))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    signs = ref.SIGNED_MAP[ours[1].long()]
    assert (signs[g < 0] < 0).all() and (signs[g > 0] >= 0).all()


def test_signed_state_keeps_its_sign():
    """bnb's rule: a small negative momentum that rounds to the +0 code takes the smallest negative code."""
    m = torch.full((256,), -1e-9)
    m[0] = 1.0
    codes = torch.zeros(256, dtype=torch.uint8)
    absmax = torch.zeros(1)
    ref._requantize_state(m, codes, absmax, ref.SIGNED_MAP, signed=True)
    assert (ref.SIGNED_MAP[codes[1:].long()] < 0).all()


def test_opcheck():
    n = 700
    x = torch.randn(n)
    codes, absmax = ops.blockwise_quantize(x, ref.SIGNED_MAP, 256)
    torch.library.opcheck(ops.blockwise_quantize, (x, ref.SIGNED_MAP, 256))
    torch.library.opcheck(ops.blockwise_dequantize, (codes, absmax, ref.SIGNED_MAP, 256, torch.bfloat16))
    p, g = torch.randn(n), torch.randn(n) * 0.01
    s1, a1, s2, a2 = fresh_states(n)
    torch.library.opcheck(
        ops.adam8bit_step, (p, g, s1, s2, a1, a2, ref.SIGNED_MAP, ref.UNSIGNED_MAP, *adam_constants(1))
    )
    torch.library.opcheck(ops.lion8bit_step, (p, g, s1, a1, ref.SIGNED_MAP, 1e-4, 0.9, 0.99, 1.0))


def test_empty_tensors():
    codes, state = quantize_blockwise(torch.empty(0), blocksize=64, nested=True)
    assert codes.shape == (0,) and dequantize_blockwise(codes, state).shape == (0,)
    p = torch.empty(0)
    s1, a1, s2, a2 = fresh_states(0)
    ops.adam8bit_step(p, p, s1, s2, a1, a2, ref.SIGNED_MAP, ref.UNSIGNED_MAP, *adam_constants(1))


def test_state_round_trips_through_bitsandbytes_state_fields():
    x = torch.randn(3, 1000, dtype=torch.bfloat16)
    codes, state = quantize_blockwise(x, blocksize=128)
    assert isinstance(state, BlockwiseState) and codes.shape == x.shape and state.absmax.numel() == 24
    out = dequantize_blockwise(codes, state)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert ((out.float() - x.float()).abs() <= x.float().abs().amax() * 0.02).all()


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_adam_step_on_an_unaligned_parameter(isa):
    """fp32 parameters are updated where they are: a view one element into its storage works the same."""
    n = 256 * 5
    storage, g = torch.randn(n + 1), torch.randn(n) * 0.01
    p, p_ref, first = storage[1:], storage[1:].clone(), storage[0].item()
    ours, theirs = fresh_states(n), fresh_states(n)
    with cpu_isa(isa), pyfastpeft.use_backend("native"):
        ops.adam8bit_step(
            p, g, ours[0], ours[2], ours[1], ours[3], ref.SIGNED_MAP, ref.UNSIGNED_MAP, *adam_constants(1)
        )
    with pyfastpeft.use_backend("reference"):
        ops.adam8bit_step(
            p_ref, g, theirs[0], theirs[2], theirs[1], theirs[3], ref.SIGNED_MAP, ref.UNSIGNED_MAP, *adam_constants(1)
        )
    assert torch.equal(p, p_ref) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert storage[0].item() == first  # the element before the view is untouched


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_steps_equal_one_call_per_tensor_of_the_reference(isa, dtype):
    """The blocks of all the tensors of one call in one parallel loop: tensors of 0, 1, 300 and 4096 * 2 + 5
    elements, each updated as the reference updates it alone."""
    sizes = [300, 0, 4096 * 2 + 5, 1, 256]
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [(torch.randn(n, generator=gen) * 0.01).to(dtype) for n in sizes]
    for two_states in (True, False):
        ours = [[p.clone(), *fresh_states(p.numel(), two_states)] for p in params]
        theirs = [[p.clone(), *fresh_states(p.numel(), two_states)] for p in params]
        for step in (1, 2):
            with cpu_isa(isa), pyfastpeft.use_backend("native"):
                if two_states:
                    p, s1, a1, s2, a2 = (list(column) for column in zip(*ours))
                    ops.adam8bit_step_multi(
                        p, grads, s1, s2, a1, a2, ref.SIGNED_MAP, ref.UNSIGNED_MAP, *adam_constants(step)
                    )
                else:
                    p, s1, a1 = (list(column) for column in zip(*ours))
                    ops.lion8bit_step_multi(p, grads, s1, a1, ref.SIGNED_MAP, 1e-4, 0.9, 0.99, 1.0 - 1e-5)
            with pyfastpeft.use_backend("reference"):
                for (p, s1, a1, *rest), g in zip(theirs, grads):
                    if two_states:
                        s2, a2 = rest
                        ops.adam8bit_step(p, g, s1, s2, a1, a2, ref.SIGNED_MAP, ref.UNSIGNED_MAP, *adam_constants(step))
                    else:
                        ops.lion8bit_step(p, g, s1, a1, ref.SIGNED_MAP, 1e-4, 0.9, 0.99, 1.0 - 1e-5)
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), f"tensor {i} ({sizes[i]} elements) differs"


def test_opcheck_multi():
    params = [torch.randn(700), torch.randn(300)]
    grads = [torch.randn(700) * 0.01, torch.randn(300) * 0.01]
    s1, a1, s2, a2 = (list(column) for column in zip(*(fresh_states(p.numel()) for p in params)))
    torch.library.opcheck(
        ops.adam8bit_step_multi,
        (params, grads, s1, s2, a1, a2, ref.SIGNED_MAP, ref.UNSIGNED_MAP, *adam_constants(1)),
    )
    torch.library.opcheck(ops.lion8bit_step_multi, (params, grads, s1, a1, ref.SIGNED_MAP, 1e-4, 0.9, 0.99, 1.0))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter mishandles bf16 arithmetic
def test_triton_steps_equal_the_reference(dtype):
    """The Triton kernels (run here by the interpreter) give the reference's bits, partial blocks and a NaN
    gradient included."""
    n = 4096 + 17
    gen = torch.Generator().manual_seed(2)
    p0 = torch.randn(n, generator=gen).to(dtype)
    for two_states in (True, False):
        ours, theirs = [p0.clone(), *fresh_states(n, two_states)], [p0.clone(), *fresh_states(n, two_states)]
        for step in (1, 2, 3):
            g = (torch.randn(n, generator=gen) * 0.01).to(dtype)
            g[5] = float("nan") if step == 2 else g[5]
            for tensors, backend in ((ours, "triton"), (theirs, "reference")):
                with pyfastpeft.use_backend(backend):
                    if two_states:
                        p, s1, a1, s2, a2 = tensors
                        ops.adam8bit_step(p, g, s1, s2, a1, a2, ref.SIGNED_MAP, ref.UNSIGNED_MAP, *adam_constants(step))
                    else:
                        p, s1, a1 = tensors
                        ops.lion8bit_step(p, g, s1, a1, ref.SIGNED_MAP, 1e-4, 0.9, 0.99, 1.0 - 1e-5)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), (two_states, step)
