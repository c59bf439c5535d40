"""Custom ops, backend dispatch and autograd, one file per op family (rmsnorm, swiglu, rope, nf4, int8, lora,
quantize, flce, distill, blockwise, dora, bottleneck, attention)."""

# importing the family modules defines the ops
from pyfastpeft.ops import (  # noqa: F401
    attention,
    blockwise,
    bottleneck,
    distill,
    dora,
    flce,
    int8,
    lora,
    lora_multi,
    nf4,
    quantize,
    rmsnorm,
    rope,
    swiglu,
)
