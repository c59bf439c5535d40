"""General affine quantization: QuantizedTensor, quantize / dequantize, calibration observers, fake_quantize.

    qt = quantize(x, bits=8, scheme="absmax", axis=0)      # dynamic: parameters from x itself
    x_hat = dequantize(qt)                                 # in x's dtype
    observer = MinMaxObserver(bits=8, scheme="zeropoint")  # static: parameters calibrated on batches
    for batch in batches: observer.observe(batch)
    qt = observer.quantize(x)                              # frozen parameters, values outside clamped
    y = fake_quantize(x)                                   # quantize + dequantize, straight-through gradient

Schemes: "absmax" (symmetric, int8 codes in [-qmax, qmax], no zero point) and "zeropoint" (asymmetric,
uint8 codes in [0, 2^bits - 1]); bits 4 or 8, one code per byte. Granularity: one scale per tensor
(default), per index along `axis`, or per `blocksize` consecutive elements of the flattened tensor.
The formulas, and what NaN and inf do, are written out in pyfastpeft/reference/quantize.py.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import torch

from pyfastpeft.ops import quantize as ops
from pyfastpeft.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from pyfastpeft.reference import quantize as ref

__all__ = ["QuantizedTensor", "quantize", "dequantize", "fake_quantize", "MinMaxObserver", "PercentileObserver"]


@dataclasses.dataclass(eq=False)
class QuantizedTensor:
    """A quantized tensor: one code per element and the parameters of its groups.

    codes:      int8 (absmax) or uint8 (zeropoint), x's shape, one code per element
    scale:      fp32, 0-dim per tensor, [shape[axis]] per channel, [ceil(numel / blocksize)] per block
    zero_point: int32 of scale's shape (zeropoint), None (absmax)
    bits, scheme, axis (non-negative or None), blocksize (or None), shape and dtype of x."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    scheme: str
    axis: int | None
    blocksize: int | None
    shape: torch.Size
    dtype: torch.dtype


def _check_bits_scheme(fn: str, bits, scheme) -> bool:
    """Returns whether scheme is zeropoint."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ref.BITS:
        raise ValueError(f"{fn}: bits must be 4 or 8, got {bits!r}")
    if scheme not in ref.SCHEMES:
        raise ValueError(f"{fn}: scheme must be one of {ref.SCHEMES}, got {scheme!r}")
    return scheme == "zeropoint"


def _check_axis(fn: str, axis, dim: int) -> int:
    """axis as a non-negative dim of a dim-D tensor; -1 for None."""
    if axis is None:
        return -1
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{fn}: axis must be an int or None, got {type(axis).__name__}")
    if not -dim <= axis < dim:
        raise ValueError(f"{fn}: axis must be in [{-dim}, {dim}) for a {dim}-D x, got {axis}")
    return axis % dim


def _check_granularity(fn: str, x: torch.Tensor, axis, blocksize) -> tuple[int, int]:
    """(axis or -1, blocksize or 0) as the ops take them."""
    if axis is not None and blocksize is not None:
        raise ValueError(f"{fn}: axis and blocksize are mutually exclusive, got axis={axis} and blocksize={blocksize}")
    if blocksize is not None and (isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0):
        raise ValueError(f"{fn}: blocksize must be a positive int or None, got {blocksize!r}")
    return _check_axis(fn, axis, x.dim()), blocksize or 0


def _quantized(codes, scale, zero_point, bits, scheme, axis: int, blocksize: int, x) -> QuantizedTensor:
    return QuantizedTensor(
        codes,
        scale,
        zero_point if scheme == "zeropoint" else None,
        bits,
        scheme,
        None if axis < 0 else axis,
        blocksize or None,
        x.shape,
        x.dtype,
    )


def quantize(
    x: torch.Tensor, bits: int = 8, scheme: str = "absmax", axis: int | None = None, blocksize: int | None = None
) -> QuantizedTensor:
    """Dynamic quantization of x (fp32, fp16, bf16, fp64) with parameters from x itself."""
    fn = "quantize"
    check_tensor(fn, "x", x)
    zeropoint = _check_bits_scheme(fn, bits, scheme)
    axis_arg, blocksize_arg = _check_granularity(fn, x, axis, blocksize)
    codes, scale, zero_point = ops.quantize_affine(x, bits, zeropoint, axis_arg, blocksize_arg)
    return _quantized(codes, scale, zero_point, bits, scheme, axis_arg, blocksize_arg, x)


def _checked_fields(fn: str, qt: QuantizedTensor) -> tuple[int, int, torch.Tensor]:
    """(axis or -1, blocksize or 0, zero_point int32 or empty) of qt after checking every field against the
    others: a QuantizedTensor may come from a file, and its fields are what the kernels index by."""
    zeropoint = _check_bits_scheme(fn, qt.bits, qt.scheme)
    if not isinstance(qt.codes, torch.Tensor) or qt.codes.dtype != (torch.uint8 if zeropoint else torch.int8):
        got = qt.codes.dtype if isinstance(qt.codes, torch.Tensor) else type(qt.codes).__name__
        raise TypeError(
            f"{fn}: qt.codes must be {'uint8' if zeropoint else 'int8'} for scheme {qt.scheme!r}, got {got}"
        )
    if not isinstance(qt.shape, (torch.Size, tuple)) or tuple(qt.codes.shape) != tuple(qt.shape):
        raise ValueError(f"{fn}: qt.codes has shape {tuple(qt.codes.shape)}, qt.shape is {qt.shape}")
    if qt.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: qt.dtype must be a float dtype, got {qt.dtype!r}")
    axis, blocksize = _check_granularity(fn, qt.codes, qt.axis, qt.blocksize)
    check_tensor(fn, "qt.scale", qt.scale, dtypes=(torch.float32,))
    expected = ref.param_shape(qt.codes.shape, axis, blocksize)
    if tuple(qt.scale.shape) != expected:
        raise ValueError(
            f"{fn}: qt.scale has shape {tuple(qt.scale.shape)}, axis={qt.axis} and "
            f"blocksize={qt.blocksize} over codes of shape {tuple(qt.codes.shape)} need {expected}"
        )
    if not zeropoint:
        if qt.zero_point is not None:
            raise ValueError(f"{fn}: scheme 'absmax' has no zero_point, got one")
        return axis, blocksize, qt.scale.new_empty(0, dtype=torch.int32)
    zero_point = qt.zero_point
    if (
        not isinstance(zero_point, torch.Tensor)
        or zero_point.is_floating_point()
        or zero_point.is_complex()
        or zero_point.dtype == torch.bool
    ):
        got = zero_point.dtype if isinstance(zero_point, torch.Tensor) else type(zero_point).__name__
        raise TypeError(f"{fn}: qt.zero_point must be an integer tensor for scheme 'zeropoint', got {got}")
    if tuple(zero_point.shape) != expected:
        raise ValueError(f"{fn}: qt.zero_point has shape {tuple(zero_point.shape)}, expected {expected}")
    return axis, blocksize, _zero_point_in_range(fn, "qt.zero_point", zero_point, qt.bits)


def _zero_point_in_range(fn: str, name: str, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """zero_point as int32 after checking it lies in the code range [0, 2^bits - 1] (torch's rule: one outside
    it, such as 2**40, would wrap through int32 into another value)."""
    qmin, qmax = ref.code_range(bits, True)
    if zero_point.numel():
        low, high = zero_point.min().item(), zero_point.max().item()
        if low < qmin or high > qmax:
            raise ValueError(
                f"{fn}: {name} must lie in [{qmin}, {qmax}] for {bits} bits, got values in [{low}, {high}]"
            )
    return zero_point.to(torch.int32)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """(codes - zero_point) * scale, in the dtype of the tensor that was quantized."""
    fn = "dequantize"
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"{fn}: qt must be a QuantizedTensor, got {type(qt).__name__}")
    axis, blocksize, zero_point = _checked_fields(fn, qt)
    check_same_device(fn, codes=qt.codes, scale=qt.scale, zero_point=zero_point)
    return ops.dequantize_affine(qt.codes, qt.scale, zero_point, axis, blocksize, qt.dtype)


def _static_params(fn: str, x, scale, zero_point, zeropoint: bool, bits: int, axis: int, blocksize: int):
    """scale fp32 and zero_point int32 (empty for absmax) of the group shape, on x's device."""
    shape = ref.param_shape(x.shape, axis, blocksize)
    if zeropoint and zero_point is None:
        raise ValueError(f"{fn}: scheme 'zeropoint' with a given scale needs zero_point")
    if not zeropoint and zero_point is not None:
        raise ValueError(f"{fn}: scheme 'absmax' takes no zero_point, got one")
    params = []
    for name, value, dtype in (("scale", scale, torch.float32), ("zero_point", zero_point, torch.int32)):
        if value is None:
            params.append(x.new_empty(0, dtype=torch.int32))
            continue
        if not isinstance(value, (torch.Tensor, int, float)) or isinstance(value, bool):
            raise TypeError(f"{fn}: {name} must be a tensor or a number, got {type(value).__name__}")
        value = value if isinstance(value, torch.Tensor) else torch.tensor(value, device=x.device)
        if value.device != x.device:
            raise ValueError(f"{fn}: {name} is on {value.device}, x is on {x.device}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {shape} for this granularity, got {tuple(value.shape)}")
        if name == "zero_point":
            if value.is_floating_point() or value.dtype == torch.bool:
                raise TypeError(f"{fn}: zero_point must be an integer tensor, got {value.dtype}")
            params.append(_zero_point_in_range(fn, "zero_point", value, bits))
            continue
        params.append(value.to(dtype))
    return params


def fake_quantize(
    x: torch.Tensor,
    bits: int = 8,
    scheme: str = "absmax",
    axis: int | None = None,
    blocksize: int | None = None,
    scale=None,
    zero_point=None,
) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype, or with the given static scale (and zero_point for "zeropoint";
    their shape is that of QuantizedTensor.scale for the granularity). Differentiable w.r.t. x by the
    straight-through estimator: the gradient passes where round(x / scale) + zero_point fell inside
    [qmin, qmax], and is 0 where x was clamped (torch.fake_quantize_per_tensor_affine's rule)."""
    fn = "fake_quantize"
    check_tensor(fn, "x", x)
    zeropoint = _check_bits_scheme(fn, bits, scheme)
    axis_arg, blocksize_arg = _check_granularity(fn, x, axis, blocksize)
    if scale is None:
        if zero_point is not None:
            raise ValueError(f"{fn}: zero_point was given without scale")
        unused_scale, unused_zero_point = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.int32)
        return ops.FakeQuantizeFunction.apply(
            x, unused_scale, unused_zero_point, False, bits, zeropoint, axis_arg, blocksize_arg
        )
    scale, zero_point = _static_params(fn, x, scale, zero_point, zeropoint, bits, axis_arg, blocksize_arg)
    return ops.FakeQuantizeFunction.apply(x, scale, zero_point, True, bits, zeropoint, axis_arg, blocksize_arg)


class _Observer(abc.ABC):
    """Running per-group ranges (lo <= 0 <= hi, fp32) over observed batches, and quantization with the
    parameters they freeze. Subclasses say how one batch's range is taken and how batches combine."""

    def __init__(self, bits: int = 8, scheme: str = "absmax", axis: int | None = None):
        name = type(self).__name__
        self.zeropoint = _check_bits_scheme(name, bits, scheme)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"{name}: axis must be an int or None, got {type(axis).__name__}")
        self.bits, self.scheme, self.axis = bits, scheme, axis
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0

    def _check_batch(self, fn: str, x: torch.Tensor) -> int:
        """x's axis as the ops take it, after checking x and its channel count against earlier batches."""
        check_tensor(fn, "x", x)
        axis = _check_axis(fn, self.axis, x.dim())
        channels = 1 if axis < 0 else x.shape[axis]
        if self.lo is not None and channels != self.lo.numel():
            raise ValueError(
                f"{fn}: x has {channels} channels along axis {self.axis}, the observed batches had {self.lo.numel()}"
            )
        return axis

    def observe(self, x: torch.Tensor) -> None:
        """Extends the calibrated ranges with the batch x (same channel count along axis every time)."""
        axis = self._check_batch(f"{type(self).__name__}.observe", x)
        lo, hi = self._batch_range(ref.grouped(x.detach(), axis, 0))
        self._combine(lo, hi)
        self.batches += 1

    def quant_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale fp32, zero_point int32 or None for absmax): 0-dim per tensor, [channels] per axis."""
        if self.batches == 0:
            raise RuntimeError(f"{type(self).__name__}.quant_params: observe() at least one batch first")
        lo, hi = self._range()
        scale, zero_point, _ = ref.dynamic_params(lo, hi, self.bits, self.zeropoint)
        shape = () if self.axis is None else (lo.numel(),)
        return scale.view(shape), zero_point.to(torch.int32).view(shape) if self.zeropoint else None

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        """x coded with the frozen parameters (the affine formula); values outside the range are clamped."""
        fn = f"{type(self).__name__}.quantize"
        axis = self._check_batch(fn, x)
        scale, zero_point = self.quant_params()
        scale = scale.to(x.device)
        zero_point = zero_point.to(x.device) if zero_point is not None else x.new_empty(0, dtype=torch.int32)
        codes = ops.quantize_static(x, scale, zero_point, self.bits, self.zeropoint, axis, 0)
        return _quantized(codes, scale, zero_point, self.bits, self.scheme, axis, 0, x)

    @abc.abstractmethod
    def _batch_range(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) fp32 [channels] of one batch, grouped [outer, channels, inner]."""

    @abc.abstractmethod
    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Folds one batch's range into the running state."""

    @abc.abstractmethod
    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated (lo, hi)."""


class MinMaxObserver(_Observer):
    """Ranges = the running min / max over every observed batch (equal to those of their concatenation)."""

    def _batch_range(self, groups):
        return ref.group_range(groups)

    def _combine(self, lo, hi):
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def _range(self):
        return self.lo, self.hi


class PercentileObserver(_Observer):
    """Ranges that ignore the outer tail of each batch: absmax takes the `percentile`-th percentile of |x|,
    zeropoint the `percentile`-th and (100 - percentile)-th percentiles of x (clamped to hold 0), per group
    by nearest rank (the k-th smallest, k = ceil(percentile / 100 * n)). Batches combine by the mean of their
    per-batch percentiles, so memory stays at one range per group whatever the number of batches."""

    def __init__(self, bits: int = 8, scheme: str = "absmax", axis: int | None = None, percentile: float = 99.99):
        super().__init__(bits, scheme, axis)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise ValueError(f"PercentileObserver: percentile must be a number in (0, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _batch_range(self, groups):
        channels = groups.shape[1]
        values = groups.transpose(0, 1).reshape(channels, -1)
        count = values.shape[1]
        if count == 0:
            zeros = values.new_zeros(channels)
            return zeros, zeros
        rank = min(count, max(1, math.ceil(self.percentile / 100 * count)))
        if not self.zeropoint:
            hi = values.abs().kthvalue(rank, dim=1).values
            return -hi, hi
        hi = values.kthvalue(rank, dim=1).values.clamp(min=0)
        lo = values.kthvalue(count + 1 - rank, dim=1).values.clamp(max=0)
        return lo, hi

    def _combine(self, lo, hi):
        self.lo = lo if self.lo is None else self.lo + lo
        self.hi = hi if self.hi is None else self.hi + hi

    def _range(self):
        return self.lo / self.batches, self.hi / self.batches
