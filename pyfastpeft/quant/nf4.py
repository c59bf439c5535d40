"""NF4 / FP4 storage, byte-compatible with bitsandbytes: QuantState (its fields and state-dict entries)
and the public quantize_nf4 / dequantize_nf4. The format and bitsandbytes' rounding rules are written
out in pyfastpeft/reference/nf4.py; the kernels run through the pyfastpeft::nf4_* ops.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from pyfastpeft.reference.nf4 import (
    DYNAMIC_MAP,
    FP4_CODE,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    QUANT_TABLES,
    blockwise_scale,
    quantize_blockwise_8bit,
)

__all__ = ["QuantState", "quantize_nf4", "dequantize_nf4", "NF4_CODE", "FP4_CODE", "DYNAMIC_MAP", "BLOCKSIZES"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(eq=False)
class QuantState:
    """What dequantizes a packed 4-bit weight; the fields and state-dict entries of bnb's QuantState.

    absmax:     fp32 [nblocks], or uint8 [nblocks] codes into state2.code when nested
    shape:      torch.Size of the original weight
    code:       the 16-value table (NF4_CODE or FP4_CODE), fp32
    blocksize:  elements per absmax block
    quant_type: "nf4" or "fp4"
    dtype:      the original weight's dtype, the dtype dequantization returns
    offset:     fp32 0-dim tensor added back to the dequantized absmax (nested only)
    state2:     nested only: QuantState(absmax=absmax2 fp32, code=DYNAMIC_MAP, blocksize=256, dtype=fp32)
    """

    absmax: torch.Tensor
    shape: torch.Size | None = None
    code: torch.Tensor | None = None
    blocksize: int | None = None
    quant_type: str | None = None
    dtype: torch.dtype | None = None
    offset: torch.Tensor | None = None
    state2: QuantState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def validate(self, fn: str = "QuantState") -> QuantState:
        """Checks every field against the others (what a corrupt or hostile checkpoint could get wrong);
        raises TypeError / ValueError naming the field; returns self. Cheap: sizes, dtypes, devices, no data
        pass. Every public entry point that hands a state to a kernel calls it."""
        if not isinstance(self.absmax, torch.Tensor):
            raise TypeError(f"{fn}: absmax must be a tensor, got {type(self.absmax).__name__}")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"{fn}: quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"{fn}: blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if not isinstance(self.shape, torch.Size) or any(d < 0 for d in self.shape):
            raise ValueError(f"{fn}: shape must be a torch.Size of non-negative sizes, got {self.shape!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: dtype must be one of {[_dtype_name(d) for d in FLOAT_DTYPES]}, got {self.dtype!r}")
        _check_table(fn, "code", self.code, 16, self.absmax.device)
        n = math.prod(self.shape)
        nblocks = -(-n // self.blocksize)
        if self.absmax.numel() != nblocks:
            raise ValueError(
                f"{fn}: absmax has {self.absmax.numel()} elements, {n} weights in blocks of "
                f"{self.blocksize} need {nblocks}"
            )
        if not self.nested:
            if self.offset is not None:
                raise ValueError(f"{fn}: offset is set but there is no nested state (state2)")
            if not self.absmax.is_floating_point():
                raise TypeError(f"{fn}: absmax must be a float tensor (not nested), got {self.absmax.dtype}")
            return self
        state2 = self.state2
        if not isinstance(state2, QuantState):
            raise TypeError(f"{fn}: state2 must be a QuantState, got {type(state2).__name__}")
        if self.absmax.dtype != torch.uint8:
            raise TypeError(f"{fn}: nested absmax must be uint8 codes, got {self.absmax.dtype}")
        if not isinstance(state2.absmax, torch.Tensor) or not state2.absmax.is_floating_point():
            raise TypeError(f"{fn}: state2.absmax (nested_absmax) must be a float tensor")
        if isinstance(state2.blocksize, bool) or not isinstance(state2.blocksize, int) or state2.blocksize < 1:
            raise ValueError(
                f"{fn}: state2.blocksize (nested_blocksize) must be a positive int, got {state2.blocksize!r}"
            )
        _check_table(fn, "state2.code (nested_quant_map)", state2.code, 256, self.absmax.device)
        expected = -(-self.absmax.numel() // state2.blocksize)
        if state2.absmax.numel() != expected:
            raise ValueError(
                f"{fn}: state2.absmax (nested_absmax) has {state2.absmax.numel()} elements, "
                f"{self.absmax.numel()} codes in blocks of {state2.blocksize} need {expected}"
            )
        if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1 or not self.offset.is_floating_point():
            raise ValueError(f"{fn}: offset (nested_offset) must be a one-element float tensor, got {self.offset!r}")
        for name, t in (("state2.absmax", state2.absmax), ("offset", self.offset)):
            if t.device != self.absmax.device:
                raise ValueError(f"{fn}: {name} is on {t.device}, absmax is on {self.absmax.device}")
        return self

    def dequantized_absmax(self, fn: str = "QuantState") -> torch.Tensor:
        """fp32 [nblocks] per-block absmax; when nested  code2[q] * absmax2[i // 256] + offset. Validates the
        state first (errors name `fn`)."""
        self.validate(fn)
        if not self.nested:
            return self.absmax.float()
        state2 = self.state2
        values = state2.code.float()[self.absmax.view(-1).int()]
        return blockwise_scale(values, state2.absmax.float(), state2.blocksize) + self.offset.float().view(())

    def as_dict(self, packed: bool = False) -> dict:
        """bnb's QuantState.as_dict: the state-dict entries of a Linear4bit weight, without "weight.".

        packed=False: tensors and plain values under their own names. packed=True: the tensors
        (absmax, quant_map, nested_absmax, nested_quant_map) and "quant_state.bitsandbytes__<type>",
        a uint8 tensor of the UTF-8 JSON of the other items, in bnb's key order.
        """
        items = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            items.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed:
            return items
        tensors = {k: v for k, v in items.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in items.items() if not isinstance(v, torch.Tensor)}
        json_bytes = json.dumps(plain).encode("utf-8")
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(json_bytes), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict, device: torch.device | str = "cpu") -> QuantState:
        """Inverse of as_dict (packed or not). Keys may keep a prefix ("weight.absmax"); the input is
        not modified. A checkpoint is untrusted: every item is type-checked and the result validated, so a
        corrupt one raises ValueError / TypeError naming the key."""
        fn = "QuantState.from_dict"
        if not isinstance(qs_dict, dict):
            raise TypeError(f"{fn}: expected a dict, got {type(qs_dict).__name__}")
        items = {}
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in {k.split(".")[-1] for k in qs_dict}:
            valid = [f"bitsandbytes__{t}" for t in QUANT_TYPES]
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in valid:
                raise ValueError(
                    f"{fn}: expected exactly one 'quant_state.<{'|'.join(valid)}>' "
                    f"tensor or unpacked items, got keys {sorted(qs_dict)}"
                )
        for key, value in qs_dict.items():
            if key in packed_keys:
                items.update(_read_packed_json(fn, key, value))
            else:
                items[key.split(".")[-1]] = value
        required = ["quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"]
        if "nested_absmax" in items:
            required += ["nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"]
        missing = [k for k in required if k not in items]
        if missing:
            raise ValueError(f"{fn}: missing {missing}, got keys {sorted(items)}")
        if items["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"{fn}: quant_type must be one of {QUANT_TYPES}, got {items['quant_type']!r}")
        for key in [k for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map") if k in items]:
            if not isinstance(items[key], torch.Tensor):
                raise TypeError(f"{fn}: {key} must be a tensor, got {type(items[key]).__name__}")
        for key in [k for k in ("blocksize", "nested_blocksize") if k in items]:
            if isinstance(items[key], bool) or not isinstance(items[key], int):
                raise TypeError(f"{fn}: {key} must be an int, got {items[key]!r}")
        shape = items["shape"]
        if shape is not None and (
            not isinstance(shape, (list, tuple))
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise ValueError(f"{fn}: shape must be a list of non-negative ints, got {shape!r}")
        offset, state2 = None, None
        if "nested_absmax" in items:
            nested_offset = items["nested_offset"]
            if isinstance(nested_offset, torch.Tensor) and nested_offset.numel() == 1:
                nested_offset = nested_offset.item()
            if isinstance(nested_offset, bool) or not isinstance(nested_offset, (int, float)):
                raise TypeError(f"{fn}: nested_offset must be a number, got {nested_offset!r}")
            offset = torch.tensor(float(nested_offset), dtype=torch.float32, device=device)
            state2 = cls(
                absmax=items["nested_absmax"].to(device),
                blocksize=items["nested_blocksize"],
                code=items["nested_quant_map"].to(device),
                dtype=_float_dtype(fn, "nested_dtype", items["nested_dtype"]),
            )
        state = cls(
            absmax=items["absmax"].to(device),
            shape=torch.Size(shape) if shape is not None else None,
            code=items["quant_map"].to(device),
            blocksize=items["blocksize"],
            quant_type=items["quant_type"],
            dtype=_float_dtype(fn, "dtype", items["dtype"]),
            offset=offset,
            state2=state2,
        )
        return state.validate(fn)

    def to(self, device: torch.device | str) -> QuantState:
        """Moves the tensors in place (as bnb's QuantState.to does) and returns self."""
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self


def _check_table(fn: str, name: str, table, size: int, device: torch.device) -> None:
    if not isinstance(table, torch.Tensor) or not table.is_floating_point():
        got = table.dtype if isinstance(table, torch.Tensor) else type(table).__name__
        raise TypeError(f"{fn}: {name} must be a float tensor, got {got}")
    if table.numel() != size:
        raise ValueError(f"{fn}: {name} must have {size} entries, got {table.numel()}")
    if table.device != device:
        raise ValueError(f"{fn}: {name} is on {table.device}, absmax is on {device}")


def _float_dtype(fn: str, key: str, name) -> torch.dtype:
    """The torch dtype a checkpoint names ("bfloat16"); only float dtypes are accepted."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: {key} must name one of {[_dtype_name(d) for d in FLOAT_DTYPES]}, got {name!r}")
    return dtype


def _read_packed_json(fn: str, key: str, value: torch.Tensor) -> dict:
    """The items of bitsandbytes' packed quant-state tensor: UTF-8 JSON of a dict, as uint8."""
    if value.dtype != torch.uint8 or value.dim() > 1:
        raise ValueError(
            f"{fn}: {key} must be a 1-D uint8 tensor of UTF-8 JSON, got {value.dtype} {tuple(value.shape)}"
        )
    try:
        items = json.loads(bytes(value.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{fn}: {key} is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(items, dict):
        raise ValueError(f"{fn}: {key} must hold a JSON object, got {type(items).__name__}")
    return items


def _check_blocksize(fn: str, blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{fn}: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def _check_quant_type(fn: str, quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{fn}: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = False, quant_type: str = "nf4"
) -> tuple[torch.Tensor, QuantState]:
    """(packed uint8 [(n + 1) // 2, 1], QuantState) of w, byte for byte what bitsandbytes'
    quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type) returns.

    float64 (which bnb refuses) is quantized from its fp32 rounding and dequantizes to float64.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_nf4: w must be float32, bfloat16, float16 or float64, got {w.dtype}")
    _check_blocksize("quantize_nf4", blocksize)
    _check_quant_type("quantize_nf4", quant_type)
    if not isinstance(double_quant, bool):
        raise TypeError(f"quantize_nf4: double_quant must be a bool, got {type(double_quant).__name__}")

    from pyfastpeft.ops import nf4 as nf4_ops

    code = QUANT_TABLES[quant_type].to(w.device, copy=True)
    packed, absmax = nf4_ops.nf4_quantize(w.reshape(-1), code, blocksize)
    if not double_quant:
        return packed, QuantState(
            absmax=absmax, shape=w.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=w.dtype
        )
    # An empty weight has no absmax to average; 0 keeps the state finite (bnb would store NaN).
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    codes, absmax2 = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
    state2 = QuantState(
        absmax=absmax2, code=DYNAMIC_MAP.to(w.device, copy=True), blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
    )
    return packed, QuantState(
        absmax=codes,
        shape=w.shape,
        code=code,
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=w.dtype,
        offset=offset,
        state2=state2,
    )


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """w_hat of state.shape and state.dtype:  code[nibble] * absmax[block] in fp32, then cast."""
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize_nf4: state must be a QuantState, got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"dequantize_nf4: packed must be a uint8 tensor, got {got}")
    absmax = state.dequantized_absmax("dequantize_nf4: state")  # validates the state first
    n = math.prod(state.shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"dequantize_nf4: packed has {packed.numel()} bytes, state.shape {tuple(state.shape)} "
            f"({n} elements) needs {(n + 1) // 2}"
        )
    if packed.device != state.absmax.device:
        raise ValueError(f"dequantize_nf4: packed is on {packed.device}, state.absmax on {state.absmax.device}")

    from pyfastpeft.ops import nf4 as nf4_ops

    flat = nf4_ops.nf4_dequantize(packed.reshape(-1), absmax, state.code.float(), state.blocksize, n, state.dtype)
    return flat.view(state.shape)
