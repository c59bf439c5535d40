"""Corrupt NF4 states (what a hostile or damaged checkpoint supplies) raise a clear exception at every entry
point, and a failed load changes nothing. The cases run in a child process (tests/bad_input.py)."""

import copy
import json
import pickle

import pytest
import torch
from bad_input import Cases, assert_raises_cleanly

from pyfastpeft.functional import lora_linear, nf4_linear
from pyfastpeft.nn import Linear4bit
from pyfastpeft.quant import QuantState, dequantize_nf4, quantize_nf4

cases = Cases(__file__)
OUT, IN = 16, 64


def _weight(double_quant=False):
    return quantize_nf4(torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)), 64, double_quant)


def _x():
    return torch.randn(3, IN)


def _with(state, **fields):
    state = copy.copy(state)
    for key, value in fields.items():
        setattr(state, key, value)
    return state


@cases.add(ValueError, "absmax has 15 elements.*need 16")
def nf4_linear_truncated_absmax():
    packed, state = _weight()
    nf4_linear(_x(), packed, _with(state, absmax=state.absmax[:-1]))


@cases.add(ValueError, "code must have 16 entries, got 15")
def dequantize_code_table_of_15():
    packed, state = _weight()
    dequantize_nf4(packed, _with(state, code=state.code[:15]))


@pytest.mark.parametrize("blocksize", [0, -64, 48, 2**40, True])
def test_blocksize_out_of_range_is_rejected(blocksize):
    packed, state = _weight()
    with pytest.raises(ValueError, match="blocksize must be one of"):
        dequantize_nf4(packed, _with(state, blocksize=blocksize))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4_linear(_x(), packed, _with(state, blocksize=blocksize))


@cases.add(ValueError, "blocksize must be a power of two")
def op_called_directly_with_blocksize_zero():
    packed, state = _weight()
    torch.ops.pyfastpeft.nf4_dequantize(packed, state.absmax, state.code, 0, OUT * IN, torch.float32)


@cases.add(ValueError, "absmax has 4 elements, 1024 elements in blocks of 64 needs 16")
def op_called_directly_with_short_absmax():
    packed, state = _weight()
    torch.ops.pyfastpeft.nf4_linear(_x(), packed, state.absmax[:4], state.code, None, 64, OUT, IN)


@cases.add(ValueError, "packed has 100 elements")
def op_called_directly_with_short_packed():
    packed, state = _weight()
    torch.ops.pyfastpeft.nf4_linear_grad_input(torch.randn(2, OUT), packed[:100], state.absmax, state.code, 64, OUT, IN)


@cases.add(ValueError, "absmax has 15 elements")
def lora_over_nf4_with_truncated_absmax():
    packed, state = _weight()
    lora_linear(
        _x(), (packed, _with(state, absmax=state.absmax[:-1])), None, torch.zeros(4, IN), torch.zeros(OUT, 4), 2.0
    )


@cases.add(ValueError, "absmax has 8 elements")
def lora_op_called_directly_with_short_absmax():
    packed, state = _weight()
    torch.ops.pyfastpeft.lora_nf4_forward(
        _x(),
        packed,
        state.absmax[:8],
        state.code,
        None,
        torch.zeros(4, IN),
        torch.zeros(OUT, 4),
        64,
        OUT,
        IN,
        2.0,
        0.0,
        None,
    )


def _decode_step(packed, absmax, code, bias=None, lora_A=None, lora_B=None, rng=None):
    """A decode step's forward without gradients: one row, the kernel called without the op's dispatch where the
    arguments are what it takes, else the op, which checks them (ops/lora.py: lora_nf4_no_grad)."""
    from pyfastpeft.ops import lora as lora_ops

    lora_A = torch.zeros(4, IN) if lora_A is None else lora_A
    lora_B = torch.zeros(OUT, 4) if lora_B is None else lora_B
    rng = torch.tensor([1, 2]) if rng is None else rng
    args = (torch.randn(1, IN), packed, absmax, code, bias, lora_A, lora_B, 64, OUT, IN, 2.0, 0.1, rng)
    return lora_ops.lora_nf4_no_grad(*args)


@cases.add(ValueError, "packed has 100 elements")
def lora_decode_step_with_short_packed():
    packed, state = _weight()
    _decode_step(packed[:100], state.absmax.float(), state.code.float())


@cases.add(ValueError, "absmax has 15 elements")
def lora_decode_step_with_short_absmax():
    packed, state = _weight()
    _decode_step(packed, state.absmax.float()[:-1], state.code.float())


@cases.add(ValueError, r"lora_B is \(8, 4\), expected \[16, R\]")
def lora_decode_step_with_short_lora_B():
    packed, state = _weight()
    _decode_step(packed, state.absmax.float(), state.code.float(), lora_B=torch.zeros(8, 4))


@cases.add(ValueError, r"lora_A is \(4, 32\)")
def lora_decode_step_with_narrow_lora_A():
    packed, state = _weight()
    _decode_step(packed, state.absmax.float(), state.code.float(), lora_A=torch.zeros(4, 32))


@cases.add(TypeError, r"bias must have dtype in \(float32, float16, bfloat16, float64\), got int64")
def lora_decode_step_with_integer_bias():
    packed, state = _weight()
    _decode_step(packed, state.absmax.float(), state.code.float(), bias=torch.zeros(OUT, dtype=torch.int64))


@cases.add(ValueError, "bias has 3 elements")
def lora_decode_step_with_short_bias():
    packed, state = _weight()
    _decode_step(packed, state.absmax.float(), state.code.float(), bias=torch.zeros(3))


@cases.add(ValueError, r"rng must be None .* of shape \[2\], got shape \(1, 2\)")
def lora_decode_step_with_a_two_dimensional_rng():
    packed, state = _weight()
    _decode_step(packed, state.absmax.float(), state.code.float(), rng=torch.tensor([[1, 2]]))


@cases.add(ValueError, r"nested_quant_map\) must have 256 entries, got 10")
def nested_code_table_too_short():
    packed, state = _weight(double_quant=True)
    state.state2 = _with(state.state2, code=state.state2.code[:10])
    dequantize_nf4(packed, state)


@cases.add(ValueError, r"nested_blocksize\) must be a positive int, got 0")
def nested_blocksize_zero():
    packed, state = _weight(double_quant=True)
    state.state2 = _with(state.state2, blocksize=0)
    nf4_linear(_x(), packed, state)


@cases.add(ValueError, r"nested_absmax\) has 0 elements")
def nested_absmax_empty():
    packed, state = _weight(double_quant=True)
    state.state2 = _with(state.state2, absmax=state.state2.absmax[:0])
    dequantize_nf4(packed, state)


def _checkpoint(**json_changes):
    layer = Linear4bit(IN, OUT, bias=False, compute_dtype=None)
    state = layer.state_dict()
    key = "weight.quant_state.bitsandbytes__nf4"
    items = json.loads(bytes(state[key].tolist()).decode())
    items.update(json_changes)
    state[key] = torch.tensor(list(json.dumps(items).encode()), dtype=torch.uint8)
    return state


@cases.add(ValueError, "absmax has 15 elements")
def linear4bit_load_truncated_absmax():
    layer = Linear4bit(IN, OUT, bias=False, double_quant=False)
    state = layer.state_dict()
    state["weight.absmax"] = state["weight.absmax"][:-1]
    Linear4bit(IN, OUT, bias=False, double_quant=False).load_state_dict(state)


@cases.add(ValueError, "blocksize must be one of")
def linear4bit_load_blocksize_zero_in_json():
    Linear4bit(IN, OUT, bias=False).load_state_dict(_checkpoint(blocksize=0))


@cases.add(TypeError, "blocksize must be an int")
def linear4bit_load_blocksize_string_in_json():
    Linear4bit(IN, OUT, bias=False).load_state_dict(_checkpoint(blocksize="64"))


@cases.add(ValueError, "dtype must name one of")
def linear4bit_load_dtype_not_a_float_dtype():
    Linear4bit(IN, OUT, bias=False).load_state_dict(_checkpoint(dtype="load"))


@cases.add(ValueError, "shape must be a list of non-negative ints")
def linear4bit_load_negative_shape():
    Linear4bit(IN, OUT, bias=False).load_state_dict(_checkpoint(shape=[-16, 64]))


@cases.add(ValueError, "not valid UTF-8 JSON")
def quant_state_json_not_utf8():
    state = _checkpoint()
    state["weight.quant_state.bitsandbytes__nf4"] = torch.tensor([0xFF, 0xFE, 0x7B], dtype=torch.uint8)
    Linear4bit(IN, OUT, bias=False).load_state_dict(state)


@cases.add(ValueError, "not valid UTF-8 JSON")
def quant_state_json_truncated():
    state = _checkpoint()
    state["weight.quant_state.bitsandbytes__nf4"] = state["weight.quant_state.bitsandbytes__nf4"][:-5]
    Linear4bit(IN, OUT, bias=False).load_state_dict(state)


@cases.add(ValueError, "must hold a JSON object")
def quant_state_json_not_an_object():
    state = _checkpoint()
    state["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)
    QuantState.from_dict({k.removeprefix("weight."): v for k, v in state.items()})


@cases.add(ValueError, r"weight is torch.uint8 with 511 elements.*needs 512")
def linear4bit_load_truncated_packed_weight():
    state = Linear4bit(IN, OUT, bias=False).state_dict()
    state["weight"] = state["weight"][:-1]
    Linear4bit(IN, OUT, bias=False).load_state_dict(state)


@pytest.mark.parametrize("name", cases.names())
def test_corrupt_nf4_input_raises_cleanly(name):
    assert_raises_cleanly(cases, name)


def test_failed_linear4bit_load_leaves_the_layer_unchanged():
    layer = Linear4bit(IN, OUT, bias=True, compute_dtype=None)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _x()
    y_before = layer(x)
    bad = _checkpoint(blocksize=0)
    bad["bias"] = torch.ones(OUT)
    with pytest.raises(ValueError):
        layer.load_state_dict(bad)
    after = layer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(layer(x), y_before, rtol=0, atol=0)


def test_good_checkpoint_still_loads_after_validation():
    source = Linear4bit(IN, OUT, bias=True, compute_dtype=None)
    target = Linear4bit(IN, OUT, bias=True, compute_dtype=None)
    target.load_state_dict(source.state_dict())
    x = _x()
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_weight_resolves_every_state_dict_key_as_an_attribute(double_quant):
    """FSDP looks up "weight.absmax" as getattr(layer.weight, "absmax"), as bitsandbytes' Params4bit allows."""
    layer = Linear4bit(IN, OUT, bias=False, double_quant=double_quant)
    for key, value in layer.state_dict().items():
        if key == "weight" or "quant_state." in key:  # the JSON blob is no attribute in bitsandbytes either
            continue
        resolved = layer
        for part in key.split("."):
            resolved = getattr(resolved, part)
        assert torch.equal(resolved, value), key


def test_linear4bit_weight_keeps_its_state_through_copy_pickle_and_moves():
    layer = Linear4bit(IN, OUT, bias=True, compute_dtype=None)
    x = _x()
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer).half().float()):
        assert clone.weight.quant_state is clone.quant_state
        torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)


def test_linear8bitlt_with_a_replaced_dense_weight_writes_a_loadable_state_dict():
    from pyfastpeft.nn import Linear8bitLt

    layer = Linear8bitLt.from_linear(torch.nn.Linear(IN, OUT))
    tied = torch.nn.Parameter(torch.randn(OUT, IN))
    layer.weight = tied
    state = layer.state_dict()
    assert "SCB" not in state and "weight_format" not in state
    dense = torch.nn.Linear(IN, OUT)
    dense.load_state_dict(state)
    assert torch.equal(dense.weight, tied)
