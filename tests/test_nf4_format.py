"""NF4/FP4 storage format: byte for byte what bitsandbytes writes, its error bounds, its state dicts."""

import json

import pytest
import torch
from helpers import DTYPES

from pyfastpeft.quant import DYNAMIC_MAP, FP4_CODE, NF4_CODE, QuantState, dequantize_nf4, quantize_nf4
from pyfastpeft.quant.nf4 import BLOCKSIZES
from pyfastpeft.reference.nf4 import nearest_code


def _bitsandbytes():
    """bitsandbytes.functional, the oracle, when it imports and quantizes 4-bit on CPU; else None."""
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_functional.quantize_4bit(torch.ones(64), blocksize=64, quant_type="nf4")
    except Exception:  # any failure of the oracle means: skip the comparisons, not fail them
        return None
    return bnb_functional


bnb = _bitsandbytes()
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not importable or cannot quantize 4-bit on CPU")

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
SHAPES = [(1024, 1024), (7, 33), (4096, 11)]  # square; odd numel; 11 columns, so blocks straddle rows

# dQuantizeNF4 in bitsandbytes' csrc/kernels.cu: its CUDA kernel's `x > t` decision-tree thresholds.
CUDA_NF4_THRESHOLDS = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
]


def bnb_quantize(w, blocksize, double_quant, quant_type):
    with torch.compiler.set_stance("force_eager"):  # bnb torch.compiles its default kernels
        return bnb.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)


def bnb_dequantize(packed, state):
    with torch.compiler.set_stance("force_eager"):
        return bnb.dequantize_4bit(packed, state)


def bnb_nested_codes(absmax, offset):
    """(codes, absmax2) of bnb's quantize_blockwise(absmax - offset, blocksize=256), run by bnb's pure-PyTorch
    ("default") backend: the exact nearest code, which we implement. bnb 0.50.2's native CPU kernel
    rounds through a 65536-entry lookup table instead (test_nested_codes_differ_from_bnb_cpu_kernel_...)."""
    default_backend = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    return op.redispatch(default_backend, absmax - offset, bnb.create_dynamic_map(), 256)


def nibbles(packed, n):
    flat = packed.view(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:n]


def sorted_codes(quant_type):
    """(sorted code values, fp32 midpoints, code index of each sorted position)."""
    order = torch.argsort(CODES[quant_type], stable=True)
    values = CODES[quant_type][order]
    return values, (values[:-1] + values[1:]) / 2, order


@needs_bnb
def test_code_tables_are_bitsandbytes_bit_for_bit():
    assert torch.equal(NF4_CODE.view(torch.int32), bnb.get_4bit_type("nf4", device="cpu").view(torch.int32))
    assert torch.equal(FP4_CODE.view(torch.int32), bnb.get_4bit_type("fp4", device="cpu").view(torch.int32))
    assert torch.equal(DYNAMIC_MAP.view(torch.int32), bnb.create_dynamic_map(signed=True).view(torch.int32))


def test_nf4_midpoints_are_the_cuda_kernel_thresholds():
    """Ours counts the fp32 midpoints below x; bnb's CUDA kernel compares x > t against these constants."""
    _, midpoints, _ = sorted_codes("nf4")
    assert torch.equal(midpoints, torch.tensor(CUDA_NF4_THRESHOLDS, dtype=torch.float32))


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 4096, 32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_matches_bitsandbytes_byte_for_byte(quant_type, blocksize, double_quant, shape, dtype):
    w = torch.randn(shape).to(dtype)
    packed, state = quantize_nf4(w, blocksize, double_quant, quant_type)
    bnb_packed, bnb_state = bnb_quantize(w, blocksize, double_quant, quant_type)

    assert packed.shape == bnb_packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(packed, bnb_packed)
    if double_quant:
        _, plain_state = bnb_quantize(w, blocksize, False, quant_type)
        codes, absmax2 = bnb_nested_codes(plain_state.absmax, bnb_state.offset)
        assert torch.equal(state.offset, bnb_state.offset)
        assert torch.equal(state.absmax, codes)
        assert torch.equal(state.state2.absmax, absmax2)
        # bnb reading our state dict dequantizes exactly as we do
        bnb_state = bnb.QuantState.from_dict(state.as_dict(packed=True), device="cpu")
    else:
        assert torch.equal(state.absmax, bnb_state.absmax)
    w_hat = dequantize_nf4(packed, state)
    assert w_hat.dtype == dtype and w_hat.shape == w.shape
    assert torch.equal(w_hat, bnb_dequantize(packed, bnb_state))


@needs_bnb
def test_nested_codes_differ_from_bnb_cpu_kernel_only_within_its_lookup_table_resolution():
    """bnb 0.50.2's native CPU quantize_blockwise maps x to a 65536-bin grid on [-1, 1], then to the code
    nearest that grid point: within 2/65535 of the nearest code, not always the nearest. Ours is the
    nearest (as bnb's default backend and, up to ties, its CUDA kernel); everything else is equal."""
    w = torch.randn(1024, 1024)
    _, state = quantize_nf4(w, 64, double_quant=True)
    _, bnb_state = bnb_quantize(w, 64, True, "nf4")
    _, plain_state = bnb_quantize(w, 64, False, "nf4")
    assert torch.equal(state.state2.absmax, bnb_state.state2.absmax)
    x = (plain_state.absmax - bnb_state.offset).double() / state.state2.absmax.double().repeat_interleave(256)
    ours_error = (x - DYNAMIC_MAP.double()[state.absmax.long()]).abs()
    bnb_error = (x - DYNAMIC_MAP.double()[bnb_state.absmax.long()]).abs()
    assert (ours_error <= bnb_error + 1e-7).all()
    assert (bnb_error <= ours_error + 2 / 65535 + 1e-7).all()
    assert (state.absmax != bnb_state.absmax).float().mean() < 0.01


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_error_matches_bitsandbytes_bound_and_grows_with_blocksize(quant_type):
    w = torch.randn(1024, 1024)
    errors = {}
    for blocksize in BLOCKSIZES:
        w_hat = dequantize_nf4(*quantize_nf4(w, blocksize, quant_type=quant_type))
        err = (w - w_hat).abs()
        errors[blocksize] = (err.mean().item(), (err / (w.abs() + 1e-8)).mean().item())
    print(
        f"\n{quant_type} mean abs / mean rel error by blocksize:",
        {bs: (round(e, 6), round(r, 6)) for bs, (e, r) in errors.items()},
    )
    if quant_type == "nf4":
        assert errors[64][0] <= 0.072792 + 1e-3  # bitsandbytes' test_4bit_quant expectation for NF4, blocksize 64
    means = [errors[bs][0] for bs in BLOCKSIZES]
    assert means == sorted(means) and len(set(means)) == len(means)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_weight_of_minus_one_zero_one_round_trips_exactly(quant_type, dtype, blocksize, double_quant):
    """-1, 0 and 1 are codes of both tables; every block (the partial last one too) has absmax 1."""
    w = torch.randint(-1, 2, (37, 128)).to(dtype)
    w.view(-1)[::blocksize] = 1
    packed, state = quantize_nf4(w, blocksize, double_quant, quant_type)
    assert torch.equal(state.dequantized_absmax(), torch.ones(-(-w.numel() // blocksize)))
    assert torch.equal(dequantize_nf4(packed, state), w)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_value_on_a_midpoint_takes_the_lower_code(quant_type):
    values, midpoints, order = sorted_codes(quant_type)
    above = torch.nextafter(midpoints, torch.tensor(float("inf")))
    block = torch.cat([torch.ones(1), midpoints, above, torch.zeros(1)])  # 32 values, absmax 1: scale is 1.0
    packed, _ = quantize_nf4(block, blocksize=32, quant_type=quant_type)
    q = nibbles(packed, 32).long()
    assert torch.equal(q[1:16], order[:-1])  # on a midpoint: the lower code
    assert torch.equal(q[16:31], order[1:])  # one ulp above it: the upper code
    if bnb is not None:
        assert torch.equal(packed, bnb_quantize(block, 32, False, quant_type)[0])


def test_nested_value_on_a_midpoint_takes_the_lower_code():
    midpoints = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / 2
    above = torch.nextafter(midpoints, torch.tensor(float("inf")))
    assert torch.equal(nearest_code(midpoints, DYNAMIC_MAP).long(), torch.arange(255))
    assert torch.equal(nearest_code(above, DYNAMIC_MAP).long(), torch.arange(1, 256))
    if bnb is not None:
        one = torch.ones(1)
        x = torch.cat([one, midpoints, one, above])  # two blocks of 256 with absmax 1: scale 1.0
        codes, _ = bnb_nested_codes(x, torch.zeros(()))
        assert torch.equal(codes[1:256].long(), torch.arange(255))
        assert torch.equal(codes[257:].long(), torch.arange(1, 256))


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_blocksize_round_trips_within_half_the_widest_code_gap(quant_type, dtype, blocksize):
    w = torch.randn(333, 77).to(dtype)  # 25641 elements: odd, and a partial last block for every blocksize
    packed, state = quantize_nf4(w, blocksize, quant_type=quant_type)
    w_hat = dequantize_nf4(packed, state)
    values, _, _ = sorted_codes(quant_type)
    half_gap = (values[1:] - values[:-1]).max() / 2
    absmax = state.absmax.repeat_interleave(blocksize)[: w.numel()].view(w.shape)
    bound = absmax * half_gap * (1 + 1e-6) + w_hat.float().abs() * torch.finfo(dtype).eps
    assert ((w.float() - w_hat.float()).abs() <= bound).all()


@pytest.mark.parametrize("quant_type,zero_code", [("nf4", 7), ("fp4", 0)])
def test_odd_numel_pads_last_low_nibble_with_the_code_of_zero(quant_type, zero_code):
    w = torch.randn(7, 33)
    packed, state = quantize_nf4(w, 64, quant_type=quant_type)
    assert packed.shape == (116, 1) and packed.dtype == torch.uint8
    assert packed[-1, 0].item() & 0xF == zero_code
    assert dequantize_nf4(packed, state).shape == (7, 33)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_all_zero_blocks_dequantize_to_zeros_without_nan(quant_type, double_quant):
    w = torch.randn(300)  # blocks of 64: four full, then 44 elements
    w[:64] = 0
    w[256:] = 0
    packed, state = quantize_nf4(w, 64, double_quant, quant_type)
    if not double_quant:
        assert state.absmax[0].item() == 0.0
        assert state.absmax[-1].item() == torch.tensor(1e-38).item()  # bnb clamps the partial block's absmax
    w_hat = dequantize_nf4(packed, state)
    assert torch.isfinite(w_hat).all()
    assert (w_hat[:64] == 0).all() and (w_hat[256:] == 0).all()
    if bnb is not None and not double_quant:
        bnb_packed, bnb_state = bnb_quantize(w, 64, False, quant_type)
        assert torch.equal(packed, bnb_packed) and torch.equal(state.absmax, bnb_state.absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nan_and_inf_poison_only_their_own_block_as_in_bitsandbytes(quant_type):
    """We quantize NaN/inf as bnb does instead of raising: byte equality holds for every input, no
    device-to-host sync is needed to check finiteness, and the damage stays visible after dequantization
    (the block's absmax is NaN or inf, so its whole block comes back NaN/inf) and contained to one block."""
    w = torch.randn(4, 64)
    clean_packed, clean_state = quantize_nf4(w, 64, quant_type=quant_type)
    w[1, 5] = float("nan")
    w[2, 7] = float("inf")
    packed, state = quantize_nf4(w, 64, quant_type=quant_type)
    assert state.absmax[1].isnan() and state.absmax[2].isinf()
    w_hat = dequantize_nf4(packed, state)
    assert w_hat[1].isnan().all() and not torch.isfinite(w_hat[2]).any()
    assert torch.equal(w_hat[[0, 3]], dequantize_nf4(clean_packed, clean_state)[[0, 3]])
    if bnb is not None:
        bnb_packed, bnb_state = bnb_quantize(w, 64, False, quant_type)
        assert torch.equal(packed, bnb_packed)
        torch.testing.assert_close(state.absmax, bnb_state.absmax, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("double_quant", [False, True])
def test_empty_weight_gives_empty_results(double_quant):
    w = torch.empty(0, 16)
    packed, state = quantize_nf4(w, double_quant=double_quant)
    assert packed.shape == (0, 1) and state.absmax.numel() == 0
    assert dequantize_nf4(packed, state).shape == (0, 16)


def test_non_contiguous_weight_is_blocked_in_its_logical_row_major_order():
    w = torch.randn(64, 96).t()
    packed, state = quantize_nf4(w)
    packed_c, state_c = quantize_nf4(w.contiguous())
    assert torch.equal(packed, packed_c) and torch.equal(state.absmax, state_c.absmax)


@pytest.mark.parametrize("packed_form", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_round_trip(quant_type, double_quant, packed_form):
    w = torch.randn(300, 70, dtype=torch.bfloat16)
    packed, state = quantize_nf4(w, 128, double_quant, quant_type)
    entries = {f"weight.{k}": v for k, v in state.as_dict(packed=packed_form).items()}
    keys_before = list(entries)
    restored = QuantState.from_dict(entries, device="cpu")
    assert list(entries) == keys_before  # the caller's dict is left alone
    assert (restored.shape, restored.dtype, restored.blocksize, restored.quant_type) == (
        state.shape,
        state.dtype,
        state.blocksize,
        state.quant_type,
    )
    assert torch.equal(restored.absmax, state.absmax) and torch.equal(restored.code, state.code)
    if double_quant:
        assert torch.equal(restored.offset, state.offset)
        assert torch.equal(restored.state2.absmax, state.state2.absmax)
        assert torch.equal(restored.state2.code, state.state2.code)
        assert restored.state2.blocksize == 256 and restored.state2.dtype == torch.float32
    assert torch.equal(dequantize_nf4(packed, restored), dequantize_nf4(packed, state))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_packed_state_dict_json(quant_type, double_quant):
    packed, state = quantize_nf4(torch.randn(300, 70, dtype=torch.bfloat16), 128, double_quant, quant_type)
    entries = state.as_dict(packed=True)
    key = f"quant_state.bitsandbytes__{quant_type}"
    expected_keys = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if double_quant else []) + [key]
    assert list(entries) == expected_keys
    meta = json.loads(bytes(entries[key].tolist()))
    expected = {"quant_type": quant_type, "blocksize": 128, "dtype": "bfloat16", "shape": [300, 70]}
    if double_quant:
        expected.update(nested_blocksize=256, nested_dtype="float32", nested_offset=state.offset.item())
    assert meta == expected and list(meta) == list(expected)


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_equals_what_bitsandbytes_writes(quant_type, double_quant, dtype):
    w = torch.randn(4096, 11).to(dtype)
    packed, state = quantize_nf4(w, 64, double_quant, quant_type)
    bnb_packed, bnb_state = bnb_quantize(w, 64, double_quant, quant_type)
    ours, theirs = state.as_dict(packed=True), bnb_state.as_dict(packed=True)
    assert list(ours) == list(theirs)
    for key in ours:
        if key == "absmax" and double_quant:
            continue  # nested codes: bnb's CPU lookup table, see test_nested_codes_differ_from_bnb_cpu_kernel_...
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    # each side loads the other's state dict
    assert torch.equal(dequantize_nf4(bnb_packed, QuantState.from_dict(theirs)), bnb_dequantize(bnb_packed, bnb_state))
    assert torch.equal(
        bnb_dequantize(packed, bnb.QuantState.from_dict(ours, device="cpu")), dequantize_nf4(packed, state)
    )


def test_quant_state_to_moves_every_tensor():
    _, state = quantize_nf4(torch.randn(64, 64), double_quant=True)
    assert state.to("meta") is state
    tensors = [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    assert all(t.device.type == "meta" for t in tensors)


def _packed_and_state():
    return quantize_nf4(torch.randn(8, 64))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: quantize_nf4(torch.ones(64, dtype=torch.int32)), TypeError, "w must be"),
        (lambda: quantize_nf4([1.0, 2.0]), TypeError, "w must be a torch.Tensor"),
        (lambda: quantize_nf4(torch.randn(64), blocksize=48), ValueError, "blocksize.*48"),
        (lambda: quantize_nf4(torch.randn(64), quant_type="int4"), ValueError, "quant_type.*int4"),
        (lambda: quantize_nf4(torch.randn(64), double_quant=1), TypeError, "double_quant"),
        (lambda: dequantize_nf4(_packed_and_state()[0].float(), _packed_and_state()[1]), TypeError, "packed must be"),
        (
            lambda: dequantize_nf4(_packed_and_state()[0][:-1], _packed_and_state()[1]),
            ValueError,
            "packed has 255 bytes",
        ),
        (
            lambda: dequantize_nf4(quantize_nf4(torch.randn(8, 64))[0], quantize_nf4(torch.randn(8, 66))[1]),
            ValueError,
            "packed has 256 bytes",
        ),
        (lambda: dequantize_nf4(_packed_and_state()[0], None), TypeError, "state must be"),
        (lambda: QuantState.from_dict({"absmax": torch.ones(1)}), ValueError, "quant_state"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_state_with_wrong_absmax_count_is_rejected():
    packed, state = quantize_nf4(torch.randn(8, 64))
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="absmax has 7 elements"):
        dequantize_nf4(packed, state)
