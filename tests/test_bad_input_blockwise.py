"""Bad arguments to the blockwise ops and the public quantize_blockwise / dequantize_blockwise raise a clear exception
naming the argument; run in a child process (tests/bad_input.py), so a regression that crashes fails its own test."""

import pytest
import torch
from bad_input import Cases, assert_raises_cleanly

from pyfastpeft.ops import blockwise as ops
from pyfastpeft.quant import BlockwiseState, dequantize_blockwise, quantize_blockwise
from pyfastpeft.reference.blockwise import SIGNED_MAP, UNSIGNED_MAP

cases = Cases(__file__)


def _adam(**changes):
    n = 1000
    args = dict(
        p=torch.randn(n),
        g=torch.randn(n),
        state1=torch.zeros(n, dtype=torch.uint8),
        state2=torch.zeros(n, dtype=torch.uint8),
        absmax1=torch.zeros(4),
        absmax2=torch.zeros(4),
        code1=SIGNED_MAP,
        code2=UNSIGNED_MAP,
    )
    args.update(changes)
    ops.adam8bit_step(*args.values(), -1e-3, 1e-8, 0.9, 0.999, 1.0)


@cases.add(ValueError, "absmax1 has 3 elements, 1000 parameters in blocks of 256 need 4")
def adam_short_absmax():
    _adam(absmax1=torch.zeros(3))


@cases.add(ValueError, "state2 has 999 elements, p has 1000")
def adam_short_state():
    _adam(state2=torch.zeros(999, dtype=torch.uint8))


@cases.add(TypeError, "state1 must have dtype in \\(uint8\\)")
def adam_float_state():
    _adam(state1=torch.zeros(1000))


@cases.add(ValueError, "code2 must hold 256 values")
def adam_short_code():
    _adam(code2=UNSIGNED_MAP[:100])


@cases.add(TypeError, "g must have dtype in \\(bfloat16\\)")
def adam_grad_dtype():
    _adam(p=torch.randn(1000, dtype=torch.bfloat16))


@cases.add(ValueError, "p must be contiguous")
def adam_strided_param():
    _adam(p=torch.randn(2000)[::2])


@cases.add(ValueError, "lion8bit_step: absmax1 has 0 elements")
def lion_empty_absmax():
    ops.lion8bit_step(
        torch.randn(10),
        torch.randn(10),
        torch.zeros(10, dtype=torch.uint8),
        torch.zeros(0),
        SIGNED_MAP,
        1e-4,
        0.9,
        0.99,
        1.0,
    )


@cases.add(ValueError, "adam8bit_step_multi: state2 has 1 tensors, p has 2")
def adam_multi_short_list():
    p, s, a = [torch.randn(300)] * 2, [torch.zeros(300, dtype=torch.uint8)] * 2, [torch.zeros(2)] * 2
    ops.adam8bit_step_multi(p, p, s, s[:1], a, a, SIGNED_MAP, UNSIGNED_MAP, -1e-3, 1e-8, 0.9, 0.999, 1.0)


@cases.add(ValueError, "adam8bit_step_multi: tensor 1: absmax1 has 1 elements, 300 parameters")
def adam_multi_short_absmax():
    p, s = [torch.randn(300)] * 2, [torch.zeros(300, dtype=torch.uint8)] * 2
    a = [torch.zeros(2), torch.zeros(1)]
    ops.adam8bit_step_multi(p, p, s, s, a, [torch.zeros(2)] * 2, SIGNED_MAP, UNSIGNED_MAP, -1e-3, 1e-8, 0.9, 0.999, 1.0)


# One bad tensor among the last of three, each way a state can be corrupt: the multi-tensor check passes the
# lists in one pass (_all_fit) and only then names the culprit, so that pass must refuse every one of them.
_N, _BLOCKS = 600, 3
_MULTI_CORRUPTIONS = {
    "p_strided": ("p", torch.randn(2 * _N)[::2], ValueError, "p must be contiguous"),
    "g_bf16": ("g", torch.randn(_N, dtype=torch.bfloat16), TypeError, "g must have dtype in \\(float32\\)"),
    "g_short": ("g", torch.randn(_N - 1), ValueError, "g has 599 elements, p has 600"),
    "state1_int8": ("state1", torch.zeros(_N, dtype=torch.int8), TypeError, "state1 must have dtype in \\(uint8\\)"),
    "state1_short": ("state1", torch.zeros(_N - 1, dtype=torch.uint8), ValueError, "state1 has 599 elements"),
    "state2_strided": ("state2", torch.zeros(2 * _N, dtype=torch.uint8)[::2], ValueError, "state2 must be contiguous"),
    "absmax1_fp64": ("absmax1", torch.zeros(_BLOCKS, dtype=torch.float64), TypeError, "absmax1 must have dtype"),
    "absmax2_short": ("absmax2", torch.zeros(_BLOCKS - 1), ValueError, "absmax2 has 2 elements, 600 parameters"),
    "absmax1_strided": ("absmax1", torch.zeros(2 * _BLOCKS)[::2], ValueError, "absmax1 must be contiguous"),
}


def _multi_lists(name: str, bad: torch.Tensor) -> dict:
    lists = dict(
        p=[torch.randn(_N) for _ in range(3)],
        g=[torch.randn(_N) for _ in range(3)],
        state1=[torch.zeros(_N, dtype=torch.uint8) for _ in range(3)],
        state2=[torch.zeros(_N, dtype=torch.uint8) for _ in range(3)],
        absmax1=[torch.zeros(_BLOCKS) for _ in range(3)],
        absmax2=[torch.zeros(_BLOCKS) for _ in range(3)],
    )
    lists[name][2] = bad
    return lists


def _register_multi_corruption(kind: str, name: str, bad: torch.Tensor, error, pattern: str) -> None:
    def adam():
        lists = _multi_lists(name, bad)
        ops.adam8bit_step_multi(*lists.values(), SIGNED_MAP, UNSIGNED_MAP, -1e-3, 1e-8, 0.9, 0.999, 1.0)

    adam.__name__ = f"adam_multi_third_{kind}"
    cases.add(error, f"adam8bit_step_multi: tensor 2: {pattern}")(adam)
    if name in ("state2", "absmax2"):  # Lion has one state
        return

    def lion():
        lists = _multi_lists(name, bad)
        ops.lion8bit_step_multi(
            lists["p"], lists["g"], lists["state1"], lists["absmax1"], SIGNED_MAP, 1e-4, 0.9, 0.99, 1.0
        )

    lion.__name__ = f"lion_multi_third_{kind}"
    cases.add(error, f"lion8bit_step_multi: tensor 2: {pattern}")(lion)


for _kind, (_name, _bad, _error, _pattern) in _MULTI_CORRUPTIONS.items():
    _register_multi_corruption(_kind, _name, _bad, _error, _pattern)


@cases.add(TypeError, "p\\[1\\] has dtype torch.bfloat16, p\\[0\\] has torch.float32")
def lion_multi_mixed_dtypes():
    p = [torch.randn(300), torch.randn(300, dtype=torch.bfloat16)]
    s, a = [torch.zeros(300, dtype=torch.uint8)] * 2, [torch.zeros(2)] * 2
    ops.lion8bit_step_multi(p, p, s, a, SIGNED_MAP, 1e-4, 0.9, 0.99, 1.0)


@cases.add(ValueError, "blocksize must be")
def quantize_zero_blocksize():
    quantize_blockwise(torch.randn(10), blocksize=0)


@cases.add(ValueError, "absmax has 1 elements, 5000 codes in blocks of 64 need 79")
def dequantize_short_absmax():
    dequantize_blockwise(
        torch.zeros(5000, dtype=torch.uint8), BlockwiseState(torch.zeros(1), SIGNED_MAP, 64, torch.float32)
    )


@cases.add(ValueError, "code must hold 256 values")
def dequantize_short_code():
    dequantize_blockwise(
        torch.zeros(64, dtype=torch.uint8), BlockwiseState(torch.zeros(1), SIGNED_MAP[:16], 64, torch.float32)
    )


@cases.add(TypeError, "a nested state.absmax must be uint8 codes")
def dequantize_nested_float_absmax():
    codes, state = quantize_blockwise(torch.randn(5000), blocksize=64, nested=True)
    state.absmax = state.absmax.float()
    dequantize_blockwise(codes, state)


@pytest.mark.parametrize("name", cases.names())
def test_bad_input_raises_cleanly(name):
    assert_raises_cleanly(cases, name)
