"""Custom ops, backend dispatch and autograd, one file per op family (rmsnorm, swiglu, rope, nf4, int8, lora,
quantize, flce, distill, blockwise, dora)."""

from pyfastpeft.ops import blockwise, distill, dora, flce, int8, lora, lora_multi, nf4, quantize, rmsnorm, rope, swiglu  # noqa: F401  (defines the ops)
