"""NF4 / FP4 storage format, byte-compatible with bitsandbytes: the reference and the fallback.

A weight w of any shape, n = w.numel(), is cut into blocks of `blocksize` consecutive elements of
w.reshape(-1) (row-major, so a block may span rows; the last block holds n % blocksize elements when
that is not 0):
    absmax[b] = max |x| over block b                                   fp32 [ceil(n / blocksize)]
    q[i]      = index of the code nearest x[i] / absmax[b]             4 bits
    packed[j] = q[2j] << 4 | q[2j+1]                                   uint8 [(n + 1) // 2, 1]
    w_hat[i]  = code[q[i]] * absmax[b]   in fp32, then cast to w's dtype
Nested ("double") quantization of absmax, bitsandbytes' compress_statistics:
    offset = absmax.mean();  absmax - offset is quantized in blocks of 256 with the signed 8-bit
    dynamic map, the same way (absmax2 per block, nearest of 256 codes);  absmax becomes the uint8
    codes and  absmax[i] = DYNAMIC_MAP[code[i]] * absmax2[i // 256] + offset.

The rounding rules, each as bitsandbytes 0.50.2 does it on CPU (quantize_4bit and quantize_blockwise in
bitsandbytes/backends/default/ops.py; its CPU backend registers no 4-bit quantizer of its own):
  - scale: a full block is x * (1.0 / max(absmax, 1e-38)), the partial last block x / max(absmax, 1e-38)
    (bnb divides there), both clamped to [-1, 1]. The partial block's stored absmax is the clamped one,
    so an all-zero partial block stores float32(1e-38); an all-zero full block stores 0. Either way it
    dequantizes to zeros.
  - index: the number of fp32 midpoints (c[k] + c[k+1]) / 2 of the sorted codes that x is strictly
    above (torch.bucketize, right=False): a value exactly on a midpoint takes the lower code, as the
    CUDA kernel's `x > midpoint` decision tree (dQuantizeNF4) does.
  - odd n: the missing last element quantizes as 0.0 (bnb pads the scaled values with a zero), so the
    last low nibble is 7 for NF4 and 0 for FP4.
  - NaN / inf are quantized as bnb does, not rejected: a NaN makes its block's absmax NaN and an inf
    makes it inf, so the whole block dequantizes to NaN (or inf), visibly; other blocks are untouched.
    Rejecting them would cost a device-to-host sync per weight on GPU and break byte equality.
"""
from __future__ import annotations

import dataclasses
import json
import math

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# bitsandbytes' get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1], sorted.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# bitsandbytes' get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bit, in bit-pattern order, / 12.
# Index 8 is the "negative zero" pattern, stored as +0.0 as bnb does (its table writes the int -0).
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32) / 12.0


def _signed_dynamic_map() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True): 256 sorted fp32 values in [-0.99297, 1].

    Decade d = 0..6 holds 2**d values  10**(d - 6) * (midpoints of linspace(0.1, 1, 2**d + 1)), and
    their negatives; then 0 and 1.
    """
    values = [0.0, 1.0]
    for decade in range(7):
        bounds = torch.linspace(0.1, 1, 2**decade + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (decade - 6)) * means).tolist() + ((-(10 ** (decade - 6))) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = _signed_dynamic_map()

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "dynamic": DYNAMIC_MAP}
_tables_cache: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _search_tables(name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints of the sorted code, sorted position -> code index), on `device`.

    A stable sort keeps FP4's two zeros in index order (0 before 8), as bnb's argsort does, so a
    value in (midpoint below 0, 0] takes index 0 and one in (0, midpoint above 0] takes index 8.
    """
    key = (name, device)
    if key not in _tables_cache:
        code = _CODES[name]
        order = torch.argsort(code, stable=True)
        midpoints = (code[order[:-1]] + code[order[1:]]) / 2
        _tables_cache[key] = (midpoints.to(device), order.to(device=device, dtype=torch.int32))
    return _tables_cache[key]


def _blockwise_normalize(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled, absmax) of fp32 flat [n]: scaled[i] = clamp(x[i] / absmax[block], -1, 1), bnb's way."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).view(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, (tail / tail_absmax).clamp_(-1, 1)])
    return scaled, absmax


def _nearest_code(scaled: torch.Tensor, name: str) -> torch.Tensor:
    """int32 index into _CODES[name] of the code nearest each value; ties go to the lower code."""
    midpoints, order = _search_tables(name, scaled.device)
    position = torch.bucketize(scaled, midpoints, out_int32=True)
    return position if name != "fp4" else order[position]


def _blockwise_scale(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * absmax[i // blocksize] for fp32 values [n]."""
    n = values.numel()
    full = n - n % blocksize
    head = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].unsqueeze(1)).view(-1)
    if full == n:
        return head
    return torch.cat([head, values[full:] * absmax[full // blocksize]])


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

    def dequantized_absmax(self) -> torch.Tensor:
        """fp32 [nblocks] per-block absmax; when nested  code2[q] * absmax2[i // 256] + offset."""
        if not self.nested:
            return self.absmax.float()
        state2 = self.state2
        if self.absmax.dtype != torch.uint8:
            raise TypeError(f"QuantState: nested absmax must be uint8 codes, got {self.absmax.dtype}")
        expected = -(-self.absmax.numel() // state2.blocksize)
        if state2.absmax.numel() != expected:
            raise ValueError(f"QuantState: state2.absmax has {state2.absmax.numel()} elements, "
                             f"{self.absmax.numel()} codes in blocks of {state2.blocksize} need {expected}")
        values = state2.code[self.absmax.view(-1).int()]
        return _blockwise_scale(values, state2.absmax.float(), state2.blocksize) + self.offset

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
            items.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": _dtype_name(self.state2.dtype),
                "nested_offset": self.offset.item(),
            })
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
        not modified."""
        items = {}
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in {k.split(".")[-1] for k in qs_dict}:
            valid = [f"bitsandbytes__{t}" for t in QUANT_TYPES]
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in valid:
                raise ValueError(f"QuantState.from_dict: expected exactly one 'quant_state.<{'|'.join(valid)}>' "
                                 f"tensor or unpacked items, got keys {sorted(qs_dict)}")
        for key, value in qs_dict.items():
            if key in packed_keys:
                items.update(json.loads(bytes(value.cpu().tolist()).decode("utf-8")))
            else:
                items[key.split(".")[-1]] = value
        required = ["quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"]
        if "nested_absmax" in items:
            required += ["nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"]
        missing = [k for k in required if k not in items]
        if missing:
            raise ValueError(f"QuantState.from_dict: missing {missing}, got keys {sorted(items)}")
        if items["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"QuantState.from_dict: quant_type must be one of {QUANT_TYPES}, "
                             f"got {items['quant_type']!r}")
        offset, state2 = None, None
        if "nested_absmax" in items:
            offset = torch.tensor(float(items["nested_offset"]), dtype=torch.float32, device=device)
            state2 = cls(absmax=items["nested_absmax"].to(device), blocksize=items["nested_blocksize"],
                         code=items["nested_quant_map"].to(device), dtype=getattr(torch, items["nested_dtype"]))
        return cls(
            absmax=items["absmax"].to(device),
            shape=torch.Size(items["shape"]) if items["shape"] is not None else None,
            code=items["quant_map"].to(device),
            blocksize=items["blocksize"],
            quant_type=items["quant_type"],
            dtype=getattr(torch, items["dtype"]),
            offset=offset,
            state2=state2,
        )

    def to(self, device: torch.device | str) -> QuantState:
        """Moves the tensors in place (as bnb's QuantState.to does) and returns self."""
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self


def _check_blocksize(fn: str, blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{fn}: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def _check_quant_type(fn: str, quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{fn}: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 quant_type: str = "nf4") -> tuple[torch.Tensor, QuantState]:
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

    scaled, absmax = _blockwise_normalize(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    pairs = _nearest_code(scaled, quant_type).to(torch.uint8).view(-1, 2)
    packed = ((pairs[:, 0] << 4) | pairs[:, 1]).unsqueeze(1)

    code = _CODES[quant_type].to(w.device, copy=True)
    if not double_quant:
        return packed, QuantState(absmax=absmax, shape=w.shape, code=code, blocksize=blocksize,
                                  quant_type=quant_type, dtype=w.dtype)
    # An empty weight has no absmax to average; 0 keeps the state finite (bnb would store NaN).
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    scaled2, absmax2 = _blockwise_normalize(absmax - offset, NESTED_BLOCKSIZE)
    codes = _nearest_code(scaled2, "dynamic").to(torch.uint8)
    state2 = QuantState(absmax=absmax2, code=DYNAMIC_MAP.to(w.device, copy=True),
                        blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return packed, QuantState(absmax=codes, shape=w.shape, code=code, blocksize=blocksize,
                              quant_type=quant_type, dtype=w.dtype, offset=offset, state2=state2)


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """w_hat of state.shape and state.dtype:  code[nibble] * absmax[block] in fp32, then cast."""
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize_nf4: state must be a QuantState, got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"dequantize_nf4: packed must be a uint8 tensor, got {got}")
    _check_blocksize("dequantize_nf4", state.blocksize)
    _check_quant_type("dequantize_nf4", state.quant_type)
    if state.shape is None or state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"dequantize_nf4: state needs a shape and a float dtype, got {state.shape}, {state.dtype}")
    n = math.prod(state.shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_nf4: packed has {packed.numel()} bytes, state.shape {tuple(state.shape)} "
                         f"({n} elements) needs {(n + 1) // 2}")
    nblocks = -(-n // state.blocksize)
    if state.absmax.numel() != nblocks:
        raise ValueError(f"dequantize_nf4: state.absmax has {state.absmax.numel()} blocks, {n} elements "
                         f"in blocks of {state.blocksize} need {nblocks}")
    if packed.device != state.absmax.device:
        raise ValueError(f"dequantize_nf4: packed is on {packed.device}, state.absmax on {state.absmax.device}")

    nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], dim=1).view(-1)[:n]
    values = state.code.to(device=packed.device, dtype=torch.float32)[nibbles.int()]
    return _blockwise_scale(values, state.dequantized_absmax(), state.blocksize).to(state.dtype).view(state.shape)
