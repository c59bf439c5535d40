"""General affine quantization: custom ops, backend table, and the straight-through fake_quantize autograd.

Ops (the format and every formula: pyfastpeft/reference/quantize.py). axis is a non-negative dim or -1 for
none, blocksize > 0 or 0 for none (never both); zero_point is int32, or empty for absmax:
  pyfastpeft::quantize_affine(x, bits, zeropoint, axis, blocksize) -> (codes, scale, zero_point)
      codes int8 (absmax) / uint8 (zeropoint) of x's shape, parameters from x itself (dynamic)
  pyfastpeft::quantize_static(x, scale, zero_point, bits, zeropoint, axis, blocksize) -> codes
      with given parameters: code = clamp(round(x / scale) + zero_point, qmin, qmax)
  pyfastpeft::dequantize_affine(codes, scale, zero_point, axis, blocksize, dtype) -> (code - zero_point) * scale
scale and zero_point are 0-dim per tensor, [x.shape[axis]] per channel, [ceil(numel / blocksize)] per block.
"""

from __future__ import annotations

import math

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops._checks import FLOAT_DTYPES, check_dtype, check_int, check_numel
from pyfastpeft.ops._library import define_op
from pyfastpeft.reference import quantize as ref


def _code_dtype(zeropoint: bool) -> torch.dtype:
    return torch.uint8 if zeropoint else torch.int8


def _layout_args(shape, axis: int, blocksize: int) -> tuple[int, int, int]:
    """(outer, channels, inner) as the kernels take them: per block the flat tensor is (1, 1, numel)."""
    if blocksize > 0:
        return 1, 1, ref.layout(shape, -1, 0)[2]
    return ref.layout(shape, axis, blocksize)


def _fake_params(x, zeropoint: bool, axis: int, blocksize: int):
    shape = ref.param_shape(x.shape, axis, blocksize)
    scale = x.new_empty(shape, dtype=torch.float32)
    zero_point = x.new_empty(shape if zeropoint else (0,), dtype=torch.int32)
    return scale, zero_point


# ---- quantize_affine: dynamic parameters ---------------------------------------------------------------


def _reference_quantize(x, bits, zeropoint, axis, blocksize):
    return ref.quantize_affine(x, bits, zeropoint, axis, blocksize)


def quantize_into(x, codes, scale, zero_point, bits: int, zeropoint: bool, axis: int, blocksize: int) -> None:
    """Native dynamic quantization into preallocated outputs: x contiguous CPU (fp32, fp16, bf16, fp64), non-empty;
    codes int8/uint8 of x's shape, scale fp32 and zero_point int32 (ignored for absmax) of the group count."""
    _native.launch(
        "quantize_affine",
        x,
        x,
        x.dtype,
        codes,
        scale,
        zero_point if zeropoint else 0,
        *_layout_args(x.shape, axis, blocksize),
        blocksize,
        bits,
        zeropoint,
    )


def _native_quantize(x, bits, zeropoint, axis, blocksize):
    if x.numel() == 0:
        return _reference_quantize(x, bits, zeropoint, axis, blocksize)
    x = x.contiguous()
    codes = _native.empty(x.shape, dtype=_code_dtype(zeropoint), device=x.device)
    scale, zero_point = _fake_params(x, zeropoint, axis, blocksize)
    quantize_into(x, codes, scale, zero_point, bits, zeropoint, axis, blocksize)
    return codes, scale, zero_point


def _fake_quantize(x, bits, zeropoint, axis, blocksize):
    return (x.new_empty(x.shape, dtype=_code_dtype(zeropoint)), *_fake_params(x, zeropoint, axis, blocksize))


# ---- quantize_static: given parameters -------------------------------------------------------------------


def _reference_quantize_static(x, scale, zero_point, bits, zeropoint, axis, blocksize):
    return ref.quantize_static(x, scale, zero_point, bits, zeropoint, axis, blocksize)


def _native_quantize_static(x, scale, zero_point, bits, zeropoint, axis, blocksize):
    if x.numel() == 0:
        return _reference_quantize_static(x, scale, zero_point, bits, zeropoint, axis, blocksize)
    x = x.contiguous()
    scale = scale.float().contiguous()
    zero_point = zero_point.to(torch.int32).contiguous()
    codes = _native.empty(x.shape, dtype=_code_dtype(zeropoint), device=x.device)
    _native.launch(
        "quantize_static",
        x,
        x,
        x.dtype,
        scale,
        zero_point if zero_point.numel() else 0,
        codes,
        *_layout_args(x.shape, axis, blocksize),
        blocksize,
        bits,
        zeropoint,
    )
    return codes


def _fake_quantize_static(x, scale, zero_point, bits, zeropoint, axis, blocksize):
    return x.new_empty(x.shape, dtype=_code_dtype(zeropoint))


# ---- dequantize_affine ---------------------------------------------------------------------------------


def _reference_dequantize(codes, scale, zero_point, axis, blocksize, dtype):
    return ref.dequantize_affine(codes, scale, zero_point, axis, blocksize, dtype)


def _native_dequantize(codes, scale, zero_point, axis, blocksize, dtype):
    if codes.numel() == 0 or dtype not in _native.DTYPE_CODES:
        return _reference_dequantize(codes, scale, zero_point, axis, blocksize, dtype)
    codes = codes.contiguous()
    scale = scale.float().contiguous()
    zero_point = zero_point.to(torch.int32).contiguous()
    out = _native.empty(codes.shape, dtype=dtype, device=codes.device)
    _native.launch(
        "dequantize_affine",
        codes,
        codes,
        codes.dtype == torch.int8,
        scale,
        zero_point if zero_point.numel() else 0,
        out,
        out.dtype,
        *_layout_args(codes.shape, axis, blocksize),
        blocksize,
    )
    return out


def _fake_dequantize(codes, scale, zero_point, axis, blocksize, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


# ---- the contract every kernel trusts, checked on every op call -------------------------------------------


def _check_granularity(op: str, shape, bits, axis, blocksize) -> int:
    """bits 4 or 8; axis -1 or a dim of shape; blocksize >= 0; not both. Returns the group count."""
    if check_int(op, "bits", bits) not in ref.BITS:
        raise ValueError(f"{op}: bits must be one of {ref.BITS}, got {bits}")
    check_int(op, "axis", axis, low=-1, high=len(shape) - 1)
    check_int(op, "blocksize", blocksize, low=0)
    if axis >= 0 and blocksize > 0:
        raise ValueError(f"{op}: axis ({axis}) and blocksize ({blocksize}) are mutually exclusive")
    return math.prod(ref.param_shape(shape, axis, blocksize))


def _check_params(op: str, scale, zero_point, groups: int, zeropoint: bool | None) -> None:
    """scale float [groups]; zero_point int32 [groups] for zeropoint, empty for absmax (None: either)."""
    check_dtype(op, "scale", scale, FLOAT_DTYPES)
    check_numel(op, "scale", scale, groups, "the quantization groups")
    check_dtype(op, "zero_point", zero_point, (torch.int32,))
    if zeropoint or (zeropoint is None and zero_point.numel()):
        check_numel(op, "zero_point", zero_point, groups, "the quantization groups")
    elif zero_point.numel():
        raise ValueError(f"{op}: zero_point must be empty for the absmax scheme, got {zero_point.numel()} elements")


def _check_quantize(x, bits, zeropoint, axis, blocksize):
    check_dtype("quantize_affine", "x", x, FLOAT_DTYPES)
    _check_granularity("quantize_affine", x.shape, bits, axis, blocksize)


def _check_quantize_static(x, scale, zero_point, bits, zeropoint, axis, blocksize):
    op = "quantize_static"
    check_dtype(op, "x", x, FLOAT_DTYPES)
    _check_params(op, scale, zero_point, _check_granularity(op, x.shape, bits, axis, blocksize), zeropoint)


def _check_dequantize(codes, scale, zero_point, axis, blocksize, dtype):
    op = "dequantize_affine"
    check_dtype(op, "codes", codes, (torch.int8, torch.uint8))
    _check_params(op, scale, zero_point, _check_granularity(op, codes.shape, 8, axis, blocksize), None)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be a float dtype, got {dtype}")


quantize_affine = define_op(
    "quantize_affine",
    "(Tensor x, int bits, bool zeropoint, int axis, int blocksize) -> (Tensor, Tensor, Tensor)",
    family="quantize",
    fake=_fake_quantize,
    reference=_reference_quantize,
    native=_native_quantize,
    triton=_reference_quantize,
    triton_dtypes=(),
    check=_check_quantize,
)
quantize_static = define_op(
    "quantize_static",
    "(Tensor x, Tensor scale, Tensor zero_point, int bits, bool zeropoint, int axis, int blocksize) -> Tensor",
    family="quantize",
    fake=_fake_quantize_static,
    reference=_reference_quantize_static,
    native=_native_quantize_static,
    triton=_reference_quantize_static,
    triton_dtypes=(),
    check=_check_quantize_static,
)
dequantize_affine = define_op(
    "dequantize_affine",
    "(Tensor codes, Tensor scale, Tensor zero_point, int axis, int blocksize, ScalarType dtype) -> Tensor",
    family="quantize",
    fake=_fake_dequantize,
    reference=_reference_dequantize,
    native=_native_dequantize,
    triton=_reference_dequantize,
    triton_dtypes=(),
    check=_check_dequantize,
)


@carry_backend
class FakeQuantizeFunction(torch.autograd.Function):
    """y = dequantize(quantize(x)) in x's dtype, with x's own parameters (static False; scale and zero_point
    are then ignored) or the given ones. Backward, the straight-through estimator of
    torch.fake_quantize_per_tensor_affine:
        dx = dy * mask,  mask = [qmin <= round(x / scale) + zero_point <= qmax]   (0 where x was clamped)
    Saves the bool mask only."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, static: bool, bits: int, zeropoint: bool, axis: int, blocksize: int):
        if static:
            codes = quantize_static(x, scale, zero_point, bits, zeropoint, axis, blocksize)
        else:
            codes, scale, zero_point = quantize_affine(x, bits, zeropoint, axis, blocksize)
        mask = ref.unclamped_mask(x, scale, zero_point, bits, zeropoint, axis, blocksize)
        ctx.save_for_backward(mask)
        return dequantize_affine(codes, scale, zero_point, axis, blocksize, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        (mask,) = ctx.saved_tensors
        return dy * mask, None, None, None, None, None, None, None
