"""8-bit blockwise dynamic quantization, byte-compatible with bitsandbytes' quantize_blockwise /
dequantize_blockwise:

    codes, state = quantize_blockwise(x, blocksize=4096)                 # signed dynamic map
    codes, state = quantize_blockwise(x.abs(), code=create_dynamic_map(signed=False), blocksize=256)
    codes, state = quantize_blockwise(x, nested=True)                    # absmax itself in 8 bits
    x_hat = dequantize_blockwise(codes, state)                           # x's shape and dtype

The bytes are those of bnb's pure-PyTorch backend, which picks the nearest code (its native CPU kernel rounds
through a 65536-entry grid instead, and differs from the nearest code in about one value in ten). The format and
rounding rules are written out in pyfastpeft/reference/blockwise.py.
"""

from __future__ import annotations

import dataclasses

import torch

from pyfastpeft.ops import blockwise as ops
from pyfastpeft.reference.blockwise import SIGNED_MAP, UNSIGNED_MAP

__all__ = ["BlockwiseState", "quantize_blockwise", "dequantize_blockwise", "create_dynamic_map"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed): the 256 sorted fp32 values of the 8-bit dynamic data type."""
    if not isinstance(signed, bool):
        raise TypeError(f"create_dynamic_map: signed must be a bool, got {type(signed).__name__}")
    return (SIGNED_MAP if signed else UNSIGNED_MAP).clone()


@dataclasses.dataclass(eq=False)
class BlockwiseState:
    """What dequantizes blockwise codes; the fields of bnb's QuantState for quantize_blockwise.

    absmax:    fp32 [nblocks], or uint8 [nblocks] codes into state2.code when nested
    code:      fp32 [256], the sorted map the codes index
    blocksize: elements per absmax block
    dtype:     the quantized tensor's dtype, the dtype dequantization returns
    offset:    fp32 0-dim tensor added back to the dequantized absmax (nested only)
    state2:    nested only: BlockwiseState of absmax - offset (signed dynamic map, the same blocksize)
    """

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    state2: BlockwiseState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def absmax_values(self, fn: str) -> torch.Tensor:
        """fp32 per-block absmax (de-nested), after checking every field against the others."""
        for name, value in (("absmax", self.absmax), ("code", self.code)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{fn}: state.{name} must be a tensor, got {type(value).__name__}")
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: state.dtype must be a float dtype, got {self.dtype!r}")
        if not self.nested:
            if self.offset is not None:
                raise ValueError(f"{fn}: state.offset is set but there is no nested state (state2)")
            if self.absmax.dtype != torch.float32:
                raise TypeError(f"{fn}: state.absmax must be float32, got {self.absmax.dtype}")
            return self.absmax
        if not isinstance(self.state2, BlockwiseState):
            raise TypeError(f"{fn}: state.state2 must be a BlockwiseState, got {type(self.state2).__name__}")
        if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1 or not self.offset.is_floating_point():
            raise ValueError(f"{fn}: state.offset must be a one-element float tensor, got {self.offset!r}")
        if self.absmax.dtype != torch.uint8:
            raise TypeError(f"{fn}: a nested state.absmax must be uint8 codes, got {self.absmax.dtype}")
        values = dequantize_blockwise(self.absmax, self.state2, _fn=f"{fn} (state2)").float()
        return values + self.offset.to(device=values.device, dtype=torch.float32).view(())


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 4096, nested: bool = False
) -> tuple[torch.Tensor, BlockwiseState]:
    """(codes uint8 of x's shape, BlockwiseState): bitsandbytes' quantize_blockwise(x, code, blocksize=blocksize,
    nested=nested), byte for byte. code defaults to the signed dynamic map; nested quantizes absmax - mean(absmax)
    again with the signed map and the same blocksize. fp64 (which bnb refuses) goes through its fp32 rounding."""
    fn = "quantize_blockwise"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if not isinstance(nested, bool):
        raise TypeError(f"{fn}: nested must be a bool, got {type(nested).__name__}")
    if code is None:
        code = SIGNED_MAP
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"{fn}: code must be a torch.Tensor or None, got {type(code).__name__}")
    code = code.to(x.device, copy=True)
    codes, absmax = ops.blockwise_quantize(x, code, blocksize)
    if not nested:
        return codes, BlockwiseState(absmax=absmax, code=code, blocksize=blocksize, dtype=x.dtype)
    # An empty tensor has no absmax to average; 0 keeps the state finite (bnb would store NaN).
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    nested_codes, state2 = quantize_blockwise(absmax - offset, blocksize=blocksize)
    return codes, BlockwiseState(
        absmax=nested_codes, code=code, blocksize=blocksize, dtype=x.dtype, offset=offset, state2=state2
    )


def dequantize_blockwise(codes: torch.Tensor, state: BlockwiseState, *, _fn: str = "dequantize_blockwise"):
    """x_hat of codes' shape in state.dtype: code[codes] * absmax[block] in fp32, then cast (bnb's
    dequantize_blockwise(codes, state))."""
    if not isinstance(state, BlockwiseState):
        raise TypeError(f"{_fn}: state must be a BlockwiseState, got {type(state).__name__}")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"{_fn}: codes must be a uint8 tensor, got {got}")
    absmax = state.absmax_values(_fn)
    return ops.blockwise_dequantize(codes, absmax, state.code.float(), state.blocksize, state.dtype)
