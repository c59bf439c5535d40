"""pyfastpeft: fused CPU, CUDA and Triton kernels for LoRA/QLoRA fine-tuning and quantized inference.

    import pyfastpeft
    pyfastpeft.backends()                      # what this install can run, and why not
    with pyfastpeft.use_backend("reference"):  # force a backend for the ops in the block
        ...
    report = pyfastpeft.patch_model(model)     # swap RMSNorm / SwiGLU MLP / RoPE of an HF model
"""
import torch  # noqa: F401  (before the native modules: they reuse torch's OpenMP runtime)

from pyfastpeft import functional, nn, ops, quant  # noqa: F401
from pyfastpeft.backend import backends, current_backend, use_backend
from pyfastpeft.integrations.quantize import QuantizeReport, quantize_model
from pyfastpeft.integrations.transformers import PatchReport, patch_model, unpatch_model

__version__ = "0.1.0"
__all__ = ["backends", "current_backend", "use_backend", "functional", "nn", "quant", "patch_model",
           "unpatch_model", "PatchReport", "quantize_model", "QuantizeReport"]
