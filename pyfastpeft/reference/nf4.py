"""NF4 / FP4 reference kernels in PyTorch: the oracle of the tests and the fallback on every device.

The format (pyfastpeft.quant.nf4 holds the QuantState and the public functions):

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

import torch

NESTED_BLOCKSIZE = 256

# bitsandbytes' get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1], sorted.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# bitsandbytes' get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bit, in bit-pattern order, / 12.
# Index 8 is the "negative zero" pattern, stored as +0.0 as bnb does (its table writes the int -0).
FP4_CODE = (
    torch.tensor(
        [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
        dtype=torch.float32,
    )
    / 12.0
)


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

QUANT_TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def search_tables(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 midpoints of the sorted code, sorted position -> code index (int32)), on code's device.

    A stable sort keeps FP4's two zeros in index order (0 before 8), as bnb's argsort does, so a
    value in (midpoint below 0, 0] takes index 0 and one in (0, midpoint above 0] takes index 8.
    """
    code = code.float()
    order = torch.argsort(code, stable=True)
    return (code[order[:-1]] + code[order[1:]]) / 2, order.to(torch.int32)


def blockwise_normalize(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """int32 index into `code` of the code nearest each value; ties go to the lower code."""
    midpoints, order = search_tables(code.to(scaled.device))
    return order[torch.bucketize(scaled, midpoints, out_int32=True)]


def blockwise_scale(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * absmax[i // blocksize] for fp32 values [n]."""
    n = values.numel()
    full = n - n % blocksize
    head = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].unsqueeze(1)).view(-1)
    if full == n:
        return head
    return torch.cat([head, values[full:] * absmax[full // blocksize]])


def quantize_4bit(w: torch.Tensor, blocksize: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n + 1) // 2, 1], absmax fp32 [nblocks]) of w (any shape; fp64 via its fp32 rounding)."""
    scaled, absmax = blockwise_normalize(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    pairs = nearest_code(scaled, code).to(torch.uint8).view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).unsqueeze(1), absmax


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes into DYNAMIC_MAP, absmax2 fp32 per block) of fp32 x: bnb's quantize_blockwise."""
    scaled, absmax2 = blockwise_normalize(x.reshape(-1).float(), blocksize)
    return nearest_code(scaled, DYNAMIC_MAP).to(torch.uint8), absmax2


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """Flat [numel] of dtype: code[nibble] * absmax[block] in fp32 (absmax: fp32, already de-nested)."""
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:numel]
    values = code.to(device=packed.device, dtype=torch.float32)[nibbles.int()]
    return blockwise_scale(values, absmax.float(), blocksize).to(dtype)


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the dequantized weight meets x in: x's own, except fp16 on CPU-like paths runs in fp32."""
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32


def nf4_linear(x, packed, absmax, code, bias, blocksize: int, out_features: int, in_features: int):
    """x [..., K] @ dequant(W)[N, K]^T (+ bias) in x's dtype (bitsandbytes' dequantize-then-matmul)."""
    compute = matmul_dtype(x.dtype)
    weight = dequantize_4bit(packed, absmax, code, blocksize, out_features * in_features, compute)
    out = torch.nn.functional.linear(
        x.to(compute), weight.view(out_features, in_features), None if bias is None else bias.to(compute)
    )
    return out.to(x.dtype)


def nf4_linear_grad_input(grad_out, packed, absmax, code, blocksize: int, out_features: int, in_features: int):
    """dX = dY [..., N] @ dequant(W)[N, K], in dY's dtype (no dW: the base weight is frozen)."""
    compute = matmul_dtype(grad_out.dtype)
    weight = dequantize_4bit(packed, absmax, code, blocksize, out_features * in_features, compute)
    return (grad_out.to(compute) @ weight.view(out_features, in_features)).to(grad_out.dtype)
