"""What the ops do under torch.autocast.

Inside an op nothing is autocast: each op registers an Autocast kernel (ops/_library.py) that runs it with
autocast off, so the torch GEMMs a kernel calls never see mixed dtypes. The public functions then follow
the rule of the torch op they replace, before the autograd.Function, so gradients reach fp32 parameters
through the casts:
- linear-like products (lora_linear, nf4_linear, int8_linear, fused_linear_cross_entropy) follow F.linear:
  their float inputs are cast to the autocast dtype, and they return it (PEFT's LoRA layer under autocast
  returns bf16 over an fp32 model for the same reason);
- attention (scaled_dot_product_attention) follows torch's SDPA, which autocast lists as lower-precision: its
  fp32/fp16/bf16 inputs are cast to the autocast dtype (fp64 ones are left alone, as autocast leaves them);
- elementwise families (rms_norm, swiglu, rope) take their inputs as they come, as HF's modules do (their
  casting contract is written out per mode and does not change under autocast).
"""

from __future__ import annotations

import torch


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts linear-like ops to on t's device, or None when it is off there."""
    device_type = t.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_like_linear(dtype: torch.dtype | None, *tensors):
    """tensors with every floating one cast to dtype (None: unchanged); None and integer tensors pass through."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
