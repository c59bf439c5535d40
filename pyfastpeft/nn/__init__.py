"""nn.Module drop-ins for HF transformers modules; each forward is one call into pyfastpeft.ops."""

from pyfastpeft.nn.bottleneck import AdapterLayer, BottleneckAdapter
from pyfastpeft.nn.experts import LoRAExperts, LoRAParameter, QuantizedExperts
from pyfastpeft.nn.linear4bit import Linear4bit
from pyfastpeft.nn.linear8bitlt import Linear8bitLt
from pyfastpeft.nn.lora import LoRALinear
from pyfastpeft.nn.losses import FusedLinearCrossEntropyLoss, FusedLinearDistillationLoss, FusedLinearPreferenceLoss
from pyfastpeft.nn.modules_to_save import ModulesToSave, add_modules_to_save
from pyfastpeft.nn.prompt_learning import PrefixTuning, PromptTuning
from pyfastpeft.nn.rmsnorm import RMSNorm
from pyfastpeft.nn.swiglu import SwiGLUMLP

__all__ = [
    "AdapterLayer",
    "BottleneckAdapter",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearDistillationLoss",
    "FusedLinearPreferenceLoss",
    "Linear4bit",
    "Linear8bitLt",
    "LoRAExperts",
    "LoRALinear",
    "LoRAParameter",
    "ModulesToSave",
    "add_modules_to_save",
    "PrefixTuning",
    "PromptTuning",
    "QuantizedExperts",
    "RMSNorm",
    "SwiGLUMLP",
]
