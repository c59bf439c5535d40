"""Storage formats: NF4/FP4 QuantState (bitsandbytes-compatible); general affine quantization (QuantizedTensor)."""
from pyfastpeft.quant.nf4 import DYNAMIC_MAP, FP4_CODE, NF4_CODE, QuantState, dequantize_nf4, quantize_nf4
from pyfastpeft.quant.quantize import (MinMaxObserver, PercentileObserver, QuantizedTensor, dequantize, fake_quantize,
                                       quantize)

__all__ = ["QuantState", "quantize_nf4", "dequantize_nf4", "NF4_CODE", "FP4_CODE", "DYNAMIC_MAP",
           "QuantizedTensor", "quantize", "dequantize", "fake_quantize", "MinMaxObserver", "PercentileObserver"]
