"""pyfastpeft: fused CPU, CUDA and Triton kernels for LoRA/QLoRA fine-tuning and quantized inference.

import pyfastpeft
report = pyfastpeft.prepare_model(model, quant="nf4", lora=pyfastpeft.LoraSettings(r=16))  # fused QLoRA
pyfastpeft.backends()                      # what this install can run, and why not
with pyfastpeft.use_backend("reference"):  # force a backend for the ops in the block
    ...
report = pyfastpeft.patch_model(model)     # swap RMSNorm / SwiGLU MLP / RoPE of an HF model
report = pyfastpeft.add_lora(model, target_modules=("q_proj", "v_proj"), r=8)  # LoRA adapters
report = pyfastpeft.add_prompt_tuning(model, num_virtual_tokens=20)  # or add_prefix_tuning: PEFT's prompt learning
pyfastpeft.save_adapter(model, "out")      # a PEFT adapter directory; load_adapter reads one
"""

import torch  # noqa: F401  (before the native modules: they reuse torch's OpenMP runtime)

from pyfastpeft import functional, nn, ops, optim, quant  # noqa: F401
from pyfastpeft.backend import backends, current_backend, use_backend
from pyfastpeft.integrations.peft import from_peft, load_adapter, save_adapter
from pyfastpeft.integrations.perplexity import perplexity
from pyfastpeft.integrations.prepare import AdapterSettings, LoraSettings, PrepareReport, PromptSettings, prepare_model
from pyfastpeft.integrations.quantize import QuantizeReport, quantize_model
from pyfastpeft.integrations.transformers import PatchReport, patch_model, unpatch_model
from pyfastpeft.nn.bitfit import BitFitReport, add_bitfit
from pyfastpeft.nn.bottleneck import AdapterReport, add_adapters
from pyfastpeft.nn.lora import LoRAReport, add_lora
from pyfastpeft.nn.modules_to_save import add_modules_to_save
from pyfastpeft.nn.prompt_learning import PromptLearningReport, add_prefix_tuning, add_prompt_tuning

__version__ = "0.1.0"
__all__ = [
    "backends",
    "current_backend",
    "use_backend",
    "functional",
    "nn",
    "quant",
    "optim",
    "patch_model",
    "unpatch_model",
    "PatchReport",
    "quantize_model",
    "QuantizeReport",
    "add_lora",
    "LoRAReport",
    "add_bitfit",
    "add_adapters",
    "AdapterReport",
    "BitFitReport",
    "add_modules_to_save",
    "add_prompt_tuning",
    "add_prefix_tuning",
    "PromptLearningReport",
    "save_adapter",
    "load_adapter",
    "from_peft",
    "prepare_model",
    "LoraSettings",
    "AdapterSettings",
    "PromptSettings",
    "PrepareReport",
    "perplexity",
]
