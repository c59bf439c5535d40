"""Storage formats: NF4/FP4 QuantState (bitsandbytes-compatible), vector-wise int8 (LLM.int8), 8-bit blockwise
dynamic quantization (bitsandbytes-compatible) and general affine quantization (QuantizedTensor, observers,
fake_quantize)."""

from pyfastpeft.quant.blockwise import BlockwiseState, create_dynamic_map, dequantize_blockwise, quantize_blockwise
from pyfastpeft.quant.int8 import (
    int8_colwise_quant,
    int8_double_quant,
    int8_matmul,
    int8_mm_dequant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    quantize_int8_weight,
)
from pyfastpeft.quant.nf4 import DYNAMIC_MAP, FP4_CODE, NF4_CODE, QuantState, dequantize_nf4, quantize_nf4
from pyfastpeft.quant.quantize import (
    MinMaxObserver,
    PercentileObserver,
    QuantizedTensor,
    dequantize,
    fake_quantize,
    quantize,
)

__all__ = [
    "QuantState",
    "quantize_nf4",
    "dequantize_nf4",
    "NF4_CODE",
    "FP4_CODE",
    "DYNAMIC_MAP",
    "int8_vectorwise_quant",
    "int8_colwise_quant",
    "int8_double_quant",
    "int8_vectorwise_dequant",
    "int8_matmul",
    "int8_mm_dequant",
    "quantize_int8_weight",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "fake_quantize",
    "MinMaxObserver",
    "PercentileObserver",
    "BlockwiseState",
    "quantize_blockwise",
    "dequantize_blockwise",
    "create_dynamic_map",
]
