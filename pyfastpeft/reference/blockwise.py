"""8-bit blockwise dynamic quantization and the 8-bit optimizers built on it, in PyTorch: the oracle of the tests
and the fallback on every device.

Quantization (bitsandbytes' quantize_blockwise / dequantize_blockwise, byte for byte as its pure-PyTorch backend):
x of any shape, n = x.numel(), is cut into blocks of `blocksize` consecutive elements of x.reshape(-1);
code is a sorted fp32 table of 256 values in [-1, 1] (the signed or unsigned dynamic map):
    absmax[b] = max |x| over block b                                        fp32 [ceil(n / blocksize)]
    s[i]      = clamp(x[i] * (1 / max(absmax[b], 1e-38)), -1, 1)            full blocks
              = clamp(x[i] / max(absmax[b], 1e-38), -1, 1)                 the partial last block (bnb divides)
    q[i]      = number of fp32 midpoints (code[k] + code[k+1]) / 2 strictly below s[i]   uint8, x's shape
    x_hat[i]  = code[q[i]] * absmax[b]   in fp32, then cast
The partial last block stores its clamped absmax (1e-38 when it is all zeros), full blocks their plain absmax.
A NaN makes its block's absmax NaN (the whole block dequantizes to NaN, visibly) and takes code 255.

The 8-bit optimizers (bitsandbytes' blockwise 8-bit Adam and Lion, the math of its CUDA kernel): states are stored
as uint8 codes into a dynamic map with one fp32 absmax per block of 256 elements. One step, per element, in fp32:
    Adam (2 states: m with the signed map, v with the unsigned one):
        m = code1[c1] * absmax1[b] * beta1 + (1 - beta1) * g
        v = code2[c2] * absmax2[b] * beta2 + (1 - beta2) * g * g
        p = p + step_size * m / (sqrt(v) + correction2 * eps)      step_size = -lr * correction2 / correction1,
        p = p * (1 - lr * weight_decay)                            correction1 = 1 - beta1^t, correction2 =
                                                                   sqrt(1 - beta2^t); the decay after the update
    Lion (1 state, the signed map):
        p = p * (1 - lr * weight_decay)
        p = p - lr * sign(code1[c1] * absmax1[b] * beta1 + (1 - beta1) * g)    sign as torch.sign: +0 for
                                                                                  +-0 and NaN
        m = code1[c1] * absmax1[b] * beta2 + (1 - beta2) * g
A gradient element that is NaN or inf leaves its parameter as it is and resets its states to 0 (bnb's Adam kernel
does this; its Lion kernel lets the NaN spread to the whole block, which we do not copy). The new states are
quantized as quantize_blockwise(state, code, 256) does, and then, as bnb does for the signed state, a code of the
other sign than m (a tiny negative m rounded to +0) moves one step toward m's sign. The parameter is rounded to its
dtype once, at the end (bnb's kernel rounds a 16-bit parameter before the decay as well).
"""

from __future__ import annotations

import torch

from pyfastpeft.reference.nf4 import blockwise_normalize, blockwise_scale

OPTIMIZER_BLOCKSIZE = 256


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed): 256 sorted fp32 values in [-1, 1] (signed) or [0, 1].

    Exponent e = 0..6 holds 2**e (signed) or 2**(e + 1) (unsigned) values  10**(e - 6) * (midpoints of
    linspace(0.1, 1, count + 1)), and their negatives when signed; then 0 and 1.
    """
    values = [0.0, 1.0]
    for exponent in range(7):
        count = 2**exponent if signed else 2 ** (exponent + 1)
        bounds = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (exponent - 6)) * means).tolist()
        if signed:
            values += ((-(10 ** (exponent - 6))) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """fp32 [255]: (code[k] + code[k + 1]) / 2 of a sorted 256-value code."""
    code = code.float()
    return (code[:-1] + code[1:]) / 2


# The blockwise scaling is NF4's (its nested absmax is this very quantization): the same rules, one copy.
normalize = blockwise_normalize


def nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index of the code nearest each scaled value; a value on a midpoint takes the lower code, NaN 255."""
    return torch.bucketize(scaled, midpoints(code).to(scaled.device), out_int32=True).to(torch.uint8)


def quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 of x's shape, absmax fp32 [nblocks]) of x (fp64 through its fp32 rounding)."""
    scaled, absmax = normalize(x.reshape(-1).float(), blocksize)
    return nearest(scaled, code).view(x.shape), absmax


scale = blockwise_scale


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype):
    """code[codes] * absmax[block] in fp32, cast to dtype, of codes' shape."""
    values = code.float().to(codes.device)[codes.reshape(-1).long()]
    return scale(values, absmax.float(), blocksize).to(dtype).view(codes.shape)


def _requantize_state(state: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, signed):
    """Writes quantize(state, code, 256) into codes and absmax, with bnb's sign rule for a signed state."""
    new_codes, new_absmax = quantize(state, code, OPTIMIZER_BLOCKSIZE)
    new_codes = new_codes.view(-1).long()
    if signed:
        code = code.float()
        flipped = torch.signbit(code[new_codes]) != torch.signbit(state)
        new_codes = torch.where(flipped, new_codes + torch.where(state > 0, 1, -1), new_codes).clamp_(0, 255)
    codes.copy_(new_codes.to(torch.uint8).view(codes.shape))
    absmax.copy_(new_absmax)


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root (what the kernels compute): through fp64, which is exact for it.
    torch's vectorized fp32 sqrt on CPU is off by an ulp for about one value in six."""
    return v.double().sqrt().float()


def adam8bit_step(
    p, g, state1, state2, absmax1, absmax2, code1, code2, step_size, correction2_eps, beta1, beta2, decay
) -> None:
    """One 8-bit Adam step in place on p, state1, state2, absmax1, absmax2 (formula above). step_size,
    correction2_eps (correction2 * eps) and decay (1 - lr * weight_decay) are the fp32 constants of this step."""
    grad = g.reshape(-1).float()
    finite = torch.isfinite(grad)
    grad = torch.where(finite, grad, 0.0)
    m = dequantize(state1.reshape(-1), absmax1, code1, OPTIMIZER_BLOCKSIZE, torch.float32)
    v = dequantize(state2.reshape(-1), absmax2, code2, OPTIMIZER_BLOCKSIZE, torch.float32)
    v = torch.where(finite, v * beta2 + (1.0 - beta2) * grad * grad, 0.0)
    m = torch.where(finite, m * beta1 + (1.0 - beta1) * grad, 0.0)
    param = p.reshape(-1).float()
    updated = param + step_size * (m / (_sqrt(v) + correction2_eps))
    if decay != 1.0:
        updated = updated * decay
    p.copy_(torch.where(finite, updated, param).view(p.shape))
    _requantize_state(m, state1, absmax1, code1, signed=True)
    _requantize_state(v, state2, absmax2, code2, signed=False)


def lion8bit_step(p, g, state1, absmax1, code1, lr, beta1, beta2, decay) -> None:
    """One 8-bit Lion step in place on p, state1, absmax1 (formula above)."""
    grad = g.reshape(-1).float()
    finite = torch.isfinite(grad)
    grad = torch.where(finite, grad, 0.0)
    m = dequantize(state1.reshape(-1), absmax1, code1, OPTIMIZER_BLOCKSIZE, torch.float32)
    param = p.reshape(-1).float()
    updated = param * decay if decay != 1.0 else param
    updated = updated - lr * torch.sign(m * beta1 + (1.0 - beta1) * grad)
    m = torch.where(finite, m * beta2 + (1.0 - beta2) * grad, 0.0)
    p.copy_(torch.where(finite, updated, param).view(p.shape))
    _requantize_state(m, state1, absmax1, code1, signed=True)
