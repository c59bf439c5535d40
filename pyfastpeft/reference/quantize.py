"""General affine quantization in PyTorch: the oracle of the tests and the fallback on every device.

Groups. Every value of a group shares one scale (and zero point):
  per tensor  (axis None, blocksize None): one group, scale and zero_point 0-dim
  per channel (axis d):  one group per index along dim d, scale [x.shape[d]]; x is viewed as
              [outer, channels, inner] = [prod(shape[:d]), shape[d], prod(shape[d+1:])]
  per block   (blocksize B): blocks of B consecutive elements of x.reshape(-1), the last one short
              when B does not divide n; scale [ceil(n / B)]
Every formula below runs in fp32 on x.float() (fp64 x is rounded to fp32 first), in this order;
round() is round-half-to-even (torch.round, C's nearbyintf), qmin / qmax are the code range.

absmax (symmetric), codes int8 in [-qmax, qmax], qmax = 2^(bits-1) - 1 (127, 7):
    absmax = max |x| over the group
    scale  = absmax / qmax
    m      = qmax / absmax  where absmax > 0, else 0
    code   = clamp(round(x * m), -qmax, qmax)          a NaN round(x * m) gives code 0
    x_hat  = code * scale
zeropoint (asymmetric), codes uint8 in [0, qmax], qmax = 2^bits - 1 (255, 15):
    lo, hi = min(min(x), 0), max(max(x), 0) over the group
    scale  = (hi - lo) / qmax
    zero_point = clamp(round(-lo / scale), 0, qmax)   (int32; 0 when round() is NaN)
    code   = clamp(round(x / scale) + zero_point, 0, qmax)   a NaN round(x / scale) gives zero_point
    x_hat  = (code - zero_point) * scale
  where scale is not > 0 (a constant-zero group, or a NaN scale) zero_point = 0 and every code = 0.
Static parameters (an observer's frozen scale and zero_point, or fake_quantize's given ones) code with
the affine formula of torch.quantize_per_tensor for both schemes, zero_point = 0 for absmax:
    code = clamp(round(x / scale) + zero_point, qmin, qmax)  (NaN round() -> zero_point;  scale not > 0 -> zero_point)
Dynamic zeropoint quantization is exactly that formula with its own parameters; dynamic absmax
multiplies by qmax / absmax instead, so a static absmax scale may code a value one step apart from
the dynamic result where x * (qmax / absmax) and x / (absmax / qmax) round to different sides of a tie.

Non-finite inputs never crash and stay visible: a NaN makes its group's statistics NaN, an inf makes
them inf; either way scale is NaN or inf, the codes are the values above (0 / zero_point for
most), and x_hat = (code - zero_point) * scale is NaN for the whole group; other groups are untouched.
A finite group whose range exceeds fp32's largest value (hi - lo > 3.4e38) overflows to scale = inf
the same way.
"""

from __future__ import annotations

import math

import torch

SCHEMES = ("absmax", "zeropoint")
BITS = (4, 8)


def code_range(bits: int, zeropoint: bool) -> tuple[int, int]:
    """(qmin, qmax): absmax [-(2^(bits-1) - 1), 2^(bits-1) - 1], zeropoint [0, 2^bits - 1]."""
    if zeropoint:
        return 0, 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def layout(shape, axis: int, blocksize: int) -> tuple[int, int, int]:
    """(outer, channels, inner) of the [outer, channels, inner] view whose dim 1 indexes the groups.

    axis: a non-negative dim index, or -1 for none; blocksize: > 0, or 0 for none. Per block the
    view is [1, nblocks, blocksize] of the zero-padded flat tensor (padding with zeros changes no
    group's range, which always holds 0)."""
    numel = math.prod(shape)
    if blocksize > 0:
        return 1, -(-numel // blocksize), blocksize
    if axis >= 0:
        return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    return 1, 1, numel


def param_shape(shape, axis: int, blocksize: int) -> tuple[int, ...]:
    """The shape of scale and zero_point: () per tensor, (channels,) per channel, (nblocks,) per block."""
    if blocksize <= 0 and axis < 0:
        return ()
    return (layout(shape, axis, blocksize)[1],)


def grouped(x: torch.Tensor, axis: int, blocksize: int) -> torch.Tensor:
    """fp32 [outer, groups, inner] view (a zero-padded copy per block) of x."""
    outer, groups, inner = layout(x.shape, axis, blocksize)
    flat = x.float().reshape(-1)
    if blocksize > 0:
        flat = torch.nn.functional.pad(flat, (0, groups * inner - flat.numel()))
    return flat.view(outer, groups, inner)


def ungrouped(values: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of grouped(): drops the block padding, restores x's shape."""
    return values.reshape(-1)[: math.prod(shape)].view(shape)


def group_range(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) fp32 [groups]: min(min(x), 0) and max(max(x), 0) over each group, NaN if it holds a NaN."""
    if groups.shape[0] * groups.shape[2] == 0:
        zeros = groups.new_zeros(groups.shape[1])
        return zeros, zeros
    return groups.amin(dim=(0, 2)).clamp(max=0), groups.amax(dim=(0, 2)).clamp(min=0)


def _round_and_clamp(rounded: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """clamp(rounded + zero_point, qmin, qmax), zero_point where rounded is NaN (fp32)."""
    return torch.where(rounded.isnan(), zero_point, (rounded + zero_point).clamp(qmin, qmax))


def static_codes(groups, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """fp32 codes of grouped x by the affine formula; scale, zero_point fp32 [groups]."""
    scale, zero_point = scale.view(1, -1, 1), zero_point.view(1, -1, 1)
    codes = _round_and_clamp(torch.round(groups / scale), zero_point, qmin, qmax)
    return torch.where(scale > 0, codes, zero_point)


def dynamic_params(lo, hi, bits: int, zeropoint: bool):
    """(scale, zero_point or None, multiplier or None) fp32 [groups] from the group ranges.
    absmax returns the multiplier m = qmax / absmax; zeropoint the zero point (fp32 integers)."""
    qmin, qmax = code_range(bits, zeropoint)
    if not zeropoint:
        absmax = torch.maximum(-lo, hi)
        # qmax / absmax as a true division: torch computes `number / tensor` as reciprocal(tensor) * number.
        multiplier = torch.full_like(absmax, qmax) / absmax
        return absmax / qmax, None, torch.where(absmax > 0, multiplier, 0.0)
    scale = (hi - lo) / qmax
    zero_point = _round_and_clamp(torch.round(-lo / scale), torch.zeros_like(scale), 0, qmax)
    return scale, torch.where(scale > 0, zero_point, 0.0), None


def quantize_affine(x: torch.Tensor, bits: int, zeropoint: bool, axis: int, blocksize: int):
    """(codes int8/uint8 of x's shape, scale fp32, zero_point int32 (empty for absmax)), dynamic parameters.
    axis: non-negative dim or -1; blocksize: > 0 or 0."""
    qmin, qmax = code_range(bits, zeropoint)
    groups = grouped(x, axis, blocksize)
    scale, zero_point, multiplier = dynamic_params(*group_range(groups), bits, zeropoint)
    if zeropoint:
        codes = static_codes(groups, scale, zero_point, qmin, qmax).to(torch.uint8)
        zero_point = zero_point.to(torch.int32)
    else:
        codes = _round_and_clamp(torch.round(groups * multiplier.view(1, -1, 1)), groups.new_zeros(()), qmin, qmax)
        codes = codes.to(torch.int8)
        zero_point = scale.new_empty(0, dtype=torch.int32)
    shape = param_shape(x.shape, axis, blocksize)
    return ungrouped(codes, x.shape), scale.view(shape), zero_point.view(shape) if zeropoint else zero_point


def _params_fp32(scale, zero_point, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = scale.float().reshape(groups)
    zero_point = zero_point.float().reshape(groups) if zero_point.numel() else torch.zeros_like(scale)
    return scale, zero_point


def quantize_static(x, scale, zero_point, bits: int, zeropoint: bool, axis: int, blocksize: int) -> torch.Tensor:
    """Codes of x with the given scale (fp32) and zero_point (int32; empty for absmax) of its groups."""
    qmin, qmax = code_range(bits, zeropoint)
    groups = grouped(x, axis, blocksize)
    scale, zero_point = _params_fp32(scale, zero_point, groups.shape[1])
    codes = static_codes(groups, scale, zero_point, qmin, qmax)
    return ungrouped(codes.to(torch.uint8 if zeropoint else torch.int8), x.shape)


def dequantize_affine(codes, scale, zero_point, axis: int, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """(code - zero_point) * scale in fp32, cast to dtype; zero_point empty for absmax."""
    groups = grouped(codes, axis, blocksize)
    scale, zero_point = _params_fp32(scale, zero_point, groups.shape[1])
    values = (groups - zero_point.view(1, -1, 1)) * scale.view(1, -1, 1)
    return ungrouped(values, codes.shape).to(dtype)


def unclamped_mask(x, scale, zero_point, bits: int, zeropoint: bool, axis: int, blocksize: int) -> torch.Tensor:
    """bool of x's shape: round(x / scale) + zero_point lies in [qmin, qmax] (torch.fake_quantize_per_tensor_affine's
    mask; NaN counts as clamped); where scale is not > 0, only x == 0 is representable."""
    qmin, qmax = code_range(bits, zeropoint)
    groups = grouped(x, axis, blocksize)
    scale, zero_point = _params_fp32(scale, zero_point, groups.shape[1])
    scale, zero_point = scale.view(1, -1, 1), zero_point.view(1, -1, 1)
    shifted = torch.round(groups / scale) + zero_point
    inside = torch.where(scale > 0, (shifted >= qmin) & (shifted <= qmax), groups == 0)
    return ungrouped(inside, x.shape)
