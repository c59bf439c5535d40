from __future__ import annotations

import math

import torch
from torch import nn

from pyfastpeft.ops.int8 import MAX_IN_FEATURES, Int8LinearFunction
from pyfastpeft.quant.int8 import int8_vectorwise_dequant, quantize_int8_weight

# bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING: only the row-major layout is written today.
WEIGHT_FORMATS = {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}


class Linear8bitLt(nn.Module):
    """A frozen linear layer in LLM.int8 storage, bitsandbytes' Linear8bitLt drop-in (inference and LoRA bases).

    `weight` holds the row-wise int8 codes [out, in] (no grad) and `SCB` their fp32 absmax [out]; state_dict()
    writes bitsandbytes' keys (weight, SCB, weight_format = 0 for "row", bias), so a bitsandbytes / HF 8-bit
    checkpoint loads here and this one loads there. forward runs the mixed-precision product: x's columns
    holding any |x| >= threshold in 16-bit, the rest in int8 (threshold 0: everything in int8).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 6.0,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self._check_sizes("Linear8bitLt", in_features, out_features, threshold)
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        weight = torch.empty(out_features, in_features, device=device)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's initialisation
        self._store(weight)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32)) if bias else None
        )

    @staticmethod
    def _check_sizes(fn: str, in_features: int, out_features: int, threshold: float) -> None:
        if in_features < 1 or out_features < 1:
            raise ValueError(f"{fn}: in_features and out_features must be >= 1, got {in_features}, {out_features}")
        if in_features > MAX_IN_FEATURES:
            raise ValueError(f"{fn}: in_features is {in_features}, at most {MAX_IN_FEATURES} is supported")
        if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
            raise ValueError(f"{fn}: threshold must be a number >= 0, got {threshold!r}")

    def _store(self, weight: torch.Tensor) -> None:
        codes, stats = quantize_int8_weight(weight.detach())
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("SCB", stats)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> Linear8bitLt:
        """Quantize an nn.Linear row-wise; the bias keeps its dtype and requires_grad."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear8bitLt.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        cls._check_sizes("Linear8bitLt.from_linear", linear.in_features, linear.out_features, threshold)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.threshold = float(threshold)
        module._store(linear.weight)
        module.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        )
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear8bitLt: x's last dim is {x.shape[-1]}, in_features is {self.in_features}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return Int8LinearFunction.apply(x, self.weight, self.SCB, bias, self.threshold)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense [out_features, in_features] tensor: codes * SCB / 127."""
        return int8_vectorwise_dequant(self.weight, self.SCB, 0).to(dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.SCB = self.SCB.float()  # .half() / .to(dtype) convert buffers: the stats stay fp32
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.dtype != torch.int8:
            # The weight was replaced by a dense parameter (tied, or assigned by hand): SCB and weight_format
            # describe codes that are gone, and a state dict holding them with a float weight loads nowhere.
            # Write what the layer now is, a dense weight (and bias), as bitsandbytes does for unquantized weights.
            destination.pop(f"{prefix}SCB", None)
            return
        destination[f"{prefix}weight_format"] = torch.tensor(WEIGHT_FORMATS["row"], dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = f"{prefix}weight_format"
        weight_format = state_dict.get(key, WEIGHT_FORMATS["row"])
        if isinstance(weight_format, torch.Tensor):
            weight_format = weight_format.item()
        if weight_format not in ("row", WEIGHT_FORMATS["row"]):
            error_msgs.append(f"Linear8bitLt: only the row-major weight_format (0) is supported, got {weight_format!r}")
            return
        own = {k: v for k, v in state_dict.items() if k != key}
        weight = own.get(f"{prefix}weight")
        if weight is not None and weight.dtype != torch.int8:
            error_msgs.append(
                f"Linear8bitLt: checkpoint weight must hold int8 codes, got {weight.dtype} "
                "(quantize a dense layer with Linear8bitLt.from_linear)"
            )
            return
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={self.threshold}"
        )
