"""RMSNorm reference, in HF's casting orders.

casting_mode (the names the ops take; CASTING_CODES are the ints the kernels take):
  LLAMA (0): y = (offset + w) * (x * r).to(x.dtype)      -- HF LlamaRMSNorm; y in promote(x, w) dtype
  GEMMA (1): y = (x * r * (offset + w)).to(x.dtype)      -- HF GemmaRMSNorm (offset 1), all fp32
  NONE  (2): y = (x * r.to(x.dtype)) * (offset + w).to(x.dtype)   -- every step in x's dtype
with r = rsqrt(mean(x^2) + eps) computed in fp32 (fp64 for fp64 x).
"""

from __future__ import annotations

import torch

from pyfastpeft.reference._common import accumulate_dtype

LLAMA, GEMMA, NONE = "llama", "gemma", "none"
CASTING_MODES = (LLAMA, GEMMA, NONE)
CASTING_CODES = {LLAMA: 0, GEMMA: 1, NONE: 2}


def output_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype, casting_mode: str) -> torch.dtype:
    return torch.promote_types(x_dtype, weight_dtype) if casting_mode == LLAMA else x_dtype


def rms_norm_forward(x, weight, eps: float, offset: float, casting_mode: str):
    """(y, rstd): y like x (dtype per casting_mode), rstd = x.shape[:-1] in the compute dtype."""
    cd = accumulate_dtype(x.dtype)
    xc = x.to(cd)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    scale = offset + weight.to(cd)
    if casting_mode == LLAMA:
        y = (scale * (xc * rstd).to(x.dtype).to(cd)).to(output_dtype(x.dtype, weight.dtype, casting_mode))
    elif casting_mode == GEMMA:
        y = (xc * rstd * scale).to(x.dtype)
    else:
        y = (x * rstd.to(x.dtype)) * scale.to(x.dtype)
    return y, rstd.squeeze(-1)


def rms_norm_backward(dy, x, weight, rstd, offset: float, casting_mode: str, weight_grad: bool):
    """(dx, dw) with the casts treated as identity; dw is empty when weight_grad is False.

    One row of N, r = rstd, m = dy * (offset + w):
        dx = r * m - (r^3 / N) * dot(m, x) * x
        dw = sum over rows of dy * xn,  xn = (x * r).to(x.dtype) (llama, none) or x * r (gemma)
    """
    cd = accumulate_dtype(x.dtype)
    xc, dyc, r = x.to(cd), dy.to(cd), rstd.to(cd).unsqueeze(-1)
    m = dyc * (offset + weight.to(cd))
    n = x.shape[-1]
    dx = r * m - (r.pow(3) / n) * (m * xc).sum(-1, keepdim=True) * xc
    if weight_grad:
        xn = xc * r if casting_mode == GEMMA else (xc * r).to(x.dtype).to(cd)
        dw = (dyc * xn).reshape(-1, n).sum(0).to(weight.dtype)
    else:
        dw = weight.new_empty(0)
    return dx.to(x.dtype), dw
