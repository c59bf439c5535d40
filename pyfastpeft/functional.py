"""The public functions, one per op family (the ops, dispatch and autograd live in pyfastpeft.ops)."""

from pyfastpeft.ops.attention import scaled_dot_product_attention
from pyfastpeft.ops.bottleneck import bottleneck_adapter
from pyfastpeft.ops.distill import fused_linear_distillation
from pyfastpeft.ops.dora import dora_linear, dora_weight_norm
from pyfastpeft.ops.flce import fused_linear_cross_entropy
from pyfastpeft.ops.int8 import int8_linear
from pyfastpeft.ops.lora import lora_linear
from pyfastpeft.ops.lora_multi import lora_linear_multi
from pyfastpeft.ops.nf4 import nf4_linear
from pyfastpeft.ops.preference import fused_linear_preference
from pyfastpeft.ops.rmsnorm import rms_norm
from pyfastpeft.ops.rope import apply_rotary_pos_emb
from pyfastpeft.ops.swiglu import swiglu

__all__ = [
    "rms_norm",
    "swiglu",
    "apply_rotary_pos_emb",
    "scaled_dot_product_attention",
    "nf4_linear",
    "int8_linear",
    "lora_linear",
    "lora_linear_multi",
    "dora_linear",
    "dora_weight_norm",
    "bottleneck_adapter",
    "fused_linear_cross_entropy",
    "fused_linear_distillation",
    "fused_linear_preference",
]
