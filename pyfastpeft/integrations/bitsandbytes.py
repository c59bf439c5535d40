"""bitsandbytes-loaded models: their Linear4bit / Linear8bitLt layers become pyfastpeft's, without dequantizing.

A checkpoint loaded with transformers' `BitsAndBytesConfig(load_in_4bit=True)` (or `load_in_8bit=True`) holds
`bitsandbytes.nn.Linear4bit` (`Linear8bitLt`) layers. Their storage is already pyfastpeft's format, so the
conversion moves tensors, it never requantizes:

    bitsandbytes Linear4bit                      pyfastpeft Linear4bit
      weight: Params4bit uint8 [(n+1)//2, 1] ->    weight: Packed4bitParameter, the same tensor
      weight.quant_state (absmax, code, offset,  ->  quant_state: QuantState over the same tensors
        state2, blocksize, quant_type, dtype)
      compute_dtype, bias                        ->  compute_dtype, the same bias Parameter

    bitsandbytes Linear8bitLt (has_fp16_weights=False)
      weight: Int8Params int8 [out, in] (row-major codes)  ->  weight, the same tensor
      weight.SCB (or state.SCB) fp32 [out]                 ->  SCB buffer, the same tensor
      state.threshold, bias                                ->  threshold, the same bias Parameter

so the converted layer's state_dict() equals bitsandbytes' key for key and byte for byte. A weight packed into another
quant_storage (bnb_4bit_quant_storage=torch.bfloat16, FSDP1's QLoRA recipe) converts over the same bytes, viewed as
uint8 (so the converted layer's state_dict() holds the weight as uint8). What cannot convert is refused with a
ValueError naming the module path and the reason: a layer not quantized yet, has_fp16_weights=True, a weight on the
meta device (offloaded), a subclass with its own forward.

A 4-bit layer that bitsandbytes repacked for its CPU bf16 kernel (it does so on an inference call on a CPU with
AVX512-BF16: eval mode, no gradients) is unpacked first, as bitsandbytes' own state_dict() does: the weight bytes
come back exactly, the absmax as bitsandbytes then holds it (rounded to bf16; re-nested where it was nested).

PEFT's LoRA layers over bitsandbytes layers (a QLoRA PeftModel) are converted by pyfastpeft.from_peft, which
converts their base layers here.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from pyfastpeft.nn import Linear4bit, Linear8bitLt
from pyfastpeft.nn.linear4bit import Packed4bitParameter, packed_bytes
from pyfastpeft.quant.nf4 import QuantState

# bitsandbytes' 4-bit classes that differ from Linear4bit by their constructor defaults only
_LINEAR4BIT_NAMES = ("Linear4bit", "LinearNF4", "LinearFP4")


def _bnb_nn():
    """bitsandbytes.nn if bitsandbytes is imported (no bitsandbytes layer can exist otherwise), else None."""
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes.nn

    return bitsandbytes.nn


def is_bitsandbytes_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit (or LinearNF4 / LinearFP4) or Linear8bitLt, and their subclasses."""
    bnb_nn = _bnb_nn()
    return bnb_nn is not None and isinstance(module, (bnb_nn.Linear4bit, bnb_nn.Linear8bitLt))


def peft_bitsandbytes_lora_classes() -> tuple[type, ...]:
    """PEFT's LoRA layer classes over bitsandbytes layers (peft.tuners.lora.bnb.Linear4bit / Linear8bitLt), those
    the installed peft and bitsandbytes define."""
    if _bnb_nn() is None:
        return ()
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return ()
    return tuple(
        cls
        for cls in (getattr(peft_bnb, "Linear4bit", None), getattr(peft_bnb, "Linear8bitLt", None))
        if cls is not None
    )


def _refuse(fn: str, path: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"{fn}: {path} ({type(module).__module__}.{type(module).__name__}) cannot convert: {why}")


def _cpu_unpacked(data: torch.Tensor, state):
    """(weight bytes, state) of a layer bitsandbytes repacked for its CPU bf16 kernel, in the standard layout,
    through bitsandbytes' own inverse on a shallow copy of the state (the bitsandbytes layer is left as it is).
    bitsandbytes' inverse leaves a non-nested absmax in its kernel's layout ([in/blocksize, out] bf16): it is
    put back in block order, as fp32."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, state = _convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
    if state.absmax.dim() == 2:
        state.absmax = state.absmax.t().reshape(-1).float()
    return data, state


def _convert_4bit(fn: str, path: str, layer: nn.Module) -> Linear4bit:
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        state = getattr(layer, "quant_state", None)  # where bitsandbytes keeps it when the parameter lost it (FSDP)
    data = weight.data
    if state is None or not getattr(weight, "bnb_quantized", True):
        raise _refuse(
            fn,
            path,
            layer,
            "it is not quantized yet (bitsandbytes quantizes a Linear4bit when it is "
            "moved to a device); load the model with a BitsAndBytesConfig or move it first",
        )
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _cpu_unpacked(data, state)
    data = packed_bytes(data)  # bnb_4bit_quant_storage=bf16 and the like: the same bytes under another dtype
    if data.dtype != torch.uint8:
        raise _refuse(fn, path, layer, f"its packed weight is {data.dtype}, not a quant_storage bitsandbytes writes")
    nested = bool(getattr(state, "nested", False))
    state2 = None
    if nested:
        inner = state.state2
        state2 = QuantState(absmax=inner.absmax, code=inner.code, blocksize=inner.blocksize, dtype=inner.dtype)
    ours = QuantState(
        absmax=state.absmax,
        shape=torch.Size(state.shape),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
        offset=state.offset if nested else None,
        state2=state2,
    )
    try:
        ours.validate(f"{fn}: {path}'s quant_state")
    except (TypeError, ValueError) as error:
        raise _refuse(fn, path, layer, str(error)) from None
    expected_shape = (layer.out_features, layer.in_features)
    if tuple(ours.shape) != expected_shape:
        raise _refuse(
            fn,
            path,
            layer,
            f"its quant_state's shape is {tuple(ours.shape)}, the layer is "
            f"{expected_shape} (out_features, in_features)",
        )
    needed = (layer.out_features * layer.in_features + 1) // 2
    if data.numel() != needed:
        raise _refuse(fn, path, layer, f"its packed weight has {data.numel()} bytes, {expected_shape} needs {needed}")

    module = Linear4bit.__new__(Linear4bit)
    nn.Module.__init__(module)
    module.in_features, module.out_features = layer.in_features, layer.out_features
    module.blocksize, module.double_quant, module.quant_type = ours.blocksize, nested, ours.quant_type
    # bitsandbytes: compute_dtype None until set, then the dtype the first input fixed (None after a float16 one,
    # which computes in x's dtype); ours: None computes in x's dtype on every call
    module.compute_dtype = getattr(layer, "compute_dtype", None)
    module.weight = Packed4bitParameter(data.view(needed, 1), requires_grad=False, quant_state=ours)
    module.quant_state = ours
    module._refresh_absmax()
    module.bias = layer.bias
    return module


def _convert_8bit(fn: str, path: str, layer: nn.Module) -> Linear8bitLt:
    weight, state = layer.weight, getattr(layer, "state", None)
    if getattr(state, "has_fp16_weights", False) or getattr(weight, "has_fp16_weights", False):
        raise _refuse(
            fn,
            path,
            layer,
            "has_fp16_weights=True keeps a dense, trainable 16-bit weight, not int8 codes; "
            "load with load_in_8bit=True (has_fp16_weights=False)",
        )
    expected_shape = (layer.out_features, layer.in_features)
    if weight.dtype != torch.int8 or tuple(weight.shape) != expected_shape:
        raise _refuse(
            fn,
            path,
            layer,
            f"its weight is {weight.dtype} {tuple(weight.shape)}, not the row-major int8 "
            f"codes {expected_shape} of a quantized layer (bitsandbytes quantizes when the "
            "layer is moved to a device)",
        )
    row_stats = getattr(weight, "SCB", None)
    if row_stats is None:
        row_stats = getattr(state, "SCB", None)  # moved to the state by bitsandbytes' first forward
    if (
        not isinstance(row_stats, torch.Tensor)
        or row_stats.dtype != torch.float32
        or tuple(row_stats.shape) != (layer.out_features,)
    ):
        got = f"{row_stats.dtype} {tuple(row_stats.shape)}" if isinstance(row_stats, torch.Tensor) else "none"
        raise _refuse(fn, path, layer, f"its row statistics SCB are {got}, expected float32 ({layer.out_features},)")
    if row_stats.device != weight.device:
        raise _refuse(fn, path, layer, f"its SCB is on {row_stats.device}, its weight on {weight.device}")
    threshold = float(getattr(state, "threshold", 0.0))
    try:
        Linear8bitLt._check_sizes(f"{fn}: {path}", layer.in_features, layer.out_features, threshold)
    except ValueError as error:
        raise _refuse(fn, path, layer, str(error)) from None

    module = Linear8bitLt.__new__(Linear8bitLt)
    nn.Module.__init__(module)
    module.in_features, module.out_features, module.threshold = layer.in_features, layer.out_features, threshold
    module.weight = nn.Parameter(weight.data, requires_grad=False)
    module.register_buffer("SCB", row_stats)
    module.bias = layer.bias
    return module


def from_bitsandbytes(layer: nn.Module, path: str = "layer") -> nn.Module:
    """pyfastpeft's Linear4bit / Linear8bitLt over the very tensors of a bitsandbytes Linear4bit / Linear8bitLt
    (no copy, no requantization; the bias is the same Parameter). `layer` itself is not changed. `path` names the
    layer in errors. Raises TypeError for anything else and ValueError for a layer that cannot convert."""
    fn = "from_bitsandbytes"
    bnb_nn = _bnb_nn()
    if not is_bitsandbytes_linear(layer):
        raise TypeError(
            f"{fn}: {path} must be a bitsandbytes.nn.Linear4bit or Linear8bitLt, got "
            f"{type(layer).__module__}.{type(layer).__name__}"
        )
    known = [getattr(bnb_nn, name) for name in _LINEAR4BIT_NAMES if hasattr(bnb_nn, name)] + [bnb_nn.Linear8bitLt]
    if type(layer) not in known:
        raise _refuse(
            fn,
            path,
            layer,
            "it subclasses a bitsandbytes layer, and its forward may differ from the one pyfastpeft reproduces",
        )
    if layer.weight.device.type == "meta":
        raise _refuse(
            fn,
            path,
            layer,
            "its weight is on the meta device (offloaded by accelerate); load the model without offloading",
        )
    if isinstance(layer, bnb_nn.Linear4bit):
        return _convert_4bit(fn, path, layer)
    return _convert_8bit(fn, path, layer)


def bitsandbytes_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every bitsandbytes Linear4bit / Linear8bitLt in model."""
    return [(path, module) for path, module in model.named_modules() if is_bitsandbytes_linear(module)]


def check_bitsandbytes_modules(model: nn.Module) -> list[str]:
    """The paths convert_bitsandbytes_modules would convert; raises its errors, and changes nothing."""
    for path, layer in bitsandbytes_linears(model):
        from_bitsandbytes(layer, path)
    return [path for path, _ in bitsandbytes_linears(model)]


def convert_bitsandbytes_modules(model: nn.Module) -> list[str]:
    """Replace, in place, every bitsandbytes Linear4bit / Linear8bitLt of model with pyfastpeft's over the same
    tensors (see from_bitsandbytes); returns the converted paths. Every layer is converted before any is replaced:
    one that cannot convert raises ValueError naming its path and why, and leaves the model as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_bitsandbytes_modules: model must be a torch.nn.Module, got {type(model).__name__}")
    if is_bitsandbytes_linear(model):
        raise TypeError(
            "convert_bitsandbytes_modules: model is itself a bitsandbytes layer; convert it with "
            "from_bitsandbytes(layer)"
        )
    converted = [(path, from_bitsandbytes(layer, path)) for path, layer in bitsandbytes_linears(model)]
    for path, ours in converted:
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, ours)
    return [path for path, _ in converted]
