import math

import torch
from torch import nn

from pyfastpeft.ops.nf4 import PLAIN_TENSOR_TYPES, NF4LinearFunction, nf4_linear_no_grad
from pyfastpeft.quant.nf4 import BLOCKSIZES, QUANT_TYPES, QuantState, dequantize_nf4, quantize_nf4


def _quant_state_attribute(name: str, getter):
    def get(self):
        state = self.__dict__.get("quant_state")
        value = getter(state) if state is not None else None
        if value is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return value

    return property(get)


QUANT_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32)


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """A packed 4-bit weight as uint8 [bytes, 1], the same memory. bitsandbytes' quant_storage (the dtype FSDP1 needed
    to flatten the weight with the rest) keeps the same bytes under another dtype: bf16, fp16, fp32 or int8."""
    if packed.dtype == torch.uint8 or packed.dtype not in QUANT_STORAGE_DTYPES:
        return packed
    return packed.contiguous().view(torch.uint8).reshape(-1, 1)


class Packed4bitParameter(nn.Parameter):
    """The packed uint8 weight of a Linear4bit, holding its QuantState (`quant_state`, the layer's own object).

    Like bitsandbytes' Params4bit it answers, as attributes, the quant-state keys the layer's state dict writes
    under "weight." (absmax, quant_map, nested_absmax, ...): FSDP resolves a key such as "weight.absmax" with
    getattr on the parameter. Deep copies and pickles keep the class and the state."""

    def __new__(cls, data=None, requires_grad=False, quant_state=None):
        param = super().__new__(cls, data, requires_grad)
        param.quant_state = quant_state
        return param

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            import copy

            memo[id(self)] = type(self)(
                self.data.clone(memory_format=torch.preserve_format),
                self.requires_grad,
                copy.deepcopy(self.quant_state, memo),
            )
        return memo[id(self)]

    def __reduce_ex__(self, protocol):
        return type(self), (self.data, self.requires_grad, self.quant_state)

    absmax = _quant_state_attribute("absmax", lambda state: state.absmax)
    code = _quant_state_attribute("code", lambda state: state.code)
    quant_map = _quant_state_attribute("quant_map", lambda state: state.code)
    offset = _quant_state_attribute("offset", lambda state: state.offset)
    state2 = _quant_state_attribute("state2", lambda state: state.state2)
    nested_absmax = _quant_state_attribute("nested_absmax", lambda state: state.state2 and state.state2.absmax)
    nested_blocksize = _quant_state_attribute("nested_blocksize", lambda state: state.state2 and state.state2.blocksize)
    nested_quant_map = _quant_state_attribute("nested_quant_map", lambda state: state.state2 and state.state2.code)
    nested_dtype = _quant_state_attribute("nested_dtype", lambda state: state.state2 and state.state2.dtype)
    nested_offset = _quant_state_attribute("nested_offset", lambda state: state.offset)


PLAIN_TENSOR_TYPES.add(Packed4bitParameter)  # a Parameter over a plain tensor: a decode step may pass its storage


class Linear4bit(nn.Module):
    """A frozen linear layer stored in NF4 (or FP4), bitsandbytes' Linear4bit drop-in.

    `weight` is the packed uint8 parameter ([(out*in + 1) // 2, 1], no grad) and `quant_state` its
    QuantState; state_dict() writes bitsandbytes' keys (weight, weight.absmax, weight.quant_map,
    weight.nested_absmax, weight.nested_quant_map, weight.quant_state.bitsandbytes__nf4, bias), so a
    bitsandbytes / HF 4-bit checkpoint loads here and this one loads there. forward casts x to
    compute_dtype (None: x's own), multiplies, and returns x's dtype, as bitsandbytes does.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        quant_type: str = "nf4",
        device=None,
    ):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"Linear4bit: in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"Linear4bit: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"Linear4bit: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.quant_type = blocksize, double_quant, quant_type
        self.compute_dtype = compute_dtype
        weight = torch.empty(out_features, in_features, device=device)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's initialisation
        self._store(weight)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=compute_dtype or torch.float32))
            if bias
            else None
        )

    def _store(self, weight: torch.Tensor) -> None:
        packed, state = quantize_nf4(weight.detach(), self.blocksize, self.double_quant, self.quant_type)
        self.weight = Packed4bitParameter(packed, requires_grad=False, quant_state=state)
        self.quant_state = state
        self._refresh_absmax()

    def _refresh_absmax(self) -> None:
        """Keep the de-nested fp32 absmax (4 bytes per block, +1/8 of the packed weight at blocksize 64):
        recomputing it per call costs decode (M=1) several times the GEMV itself."""
        self.register_buffer("_absmax", self.quant_state.dequantized_absmax(), persistent=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
    ) -> "Linear4bit":
        """Quantize an nn.Linear; compute_dtype None keeps the layer's own dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"Linear4bit.from_linear: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"Linear4bit.from_linear: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        module.blocksize, module.double_quant, module.quant_type = blocksize, double_quant, quant_type
        module.compute_dtype = compute_dtype if compute_dtype is not None else linear.weight.dtype
        module._store(linear.weight)
        module.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        )
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit: x's last dim is {x.shape[-1]}, in_features is {self.in_features}")
        compute = self.compute_dtype or x.dtype
        xc = x if x.dtype == compute else x.to(compute)
        bias = self.bias if self.bias is None or self.bias.dtype == compute else self.bias.to(compute)
        args = (xc, self.weight, self._absmax, self.quant_state.code, bias, self.blocksize, self.out_features)
        if not (torch.is_grad_enabled() and (xc.requires_grad or (bias is not None and bias.requires_grad))):
            # nothing to differentiate (inference, a decode step): no autograd.Function (about 15 us a call), and
            # a decode step's GEMV without the op's dispatch (ops/nf4.py says when)
            y = nf4_linear_no_grad(*args, self.in_features)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        return NF4LinearFunction.apply(
            xc,
            self.weight,
            self._absmax,
            self.quant_state.code,
            bias,
            self.blocksize,
            self.out_features,
            self.in_features,
        ).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight as a dense [out_features, in_features] tensor of its original dtype."""
        return dequantize_nf4(self.weight, self.quant_state)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "quant_state" and isinstance(self._parameters.get("weight"), Packed4bitParameter):
            self._parameters["weight"].quant_state = value  # one QuantState object, the layer's

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not isinstance(self.weight, Packed4bitParameter):  # nn.Module._apply may rebuild a plain Parameter
            self.weight = Packed4bitParameter(self.weight.data, self.weight.requires_grad, self.quant_state)
        self.quant_state.to(self.weight.device)  # device moves only: absmax stays fp32 under .half()
        self._refresh_absmax()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        quant_prefix = f"{prefix}weight."
        quant_items = {
            key[len(quant_prefix) :]: value for key, value in state_dict.items() if key.startswith(quant_prefix)
        }
        if quant_items:
            # Validated before anything is assigned: a corrupt checkpoint raises and leaves the layer as it was.
            state = QuantState.from_dict(quant_items, device=self.weight.device)
            if tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"Linear4bit: checkpoint weight shape {tuple(state.shape)} does not match "
                    f"({self.out_features}, {self.in_features})"
                )
                return
            packed = state_dict.get(f"{prefix}weight")
            if isinstance(packed, torch.Tensor) and packed.dtype != torch.uint8:  # bitsandbytes' quant_storage
                packed = packed_bytes(packed)
                state_dict = {**state_dict, f"{prefix}weight": packed}
            needed = (self.out_features * self.in_features + 1) // 2
            if isinstance(packed, torch.Tensor) and (packed.dtype != torch.uint8 or packed.numel() != needed):
                raise ValueError(
                    f"Linear4bit.load_state_dict: {prefix}weight is {packed.dtype} with {packed.numel()} "
                    f"elements, the packed {self.out_features}x{self.in_features} weight needs {needed} "
                    "uint8 bytes"
                )
            self.quant_state = state
            self.blocksize, self.quant_type, self.double_quant = state.blocksize, state.quant_type, state.nested
            self._refresh_absmax()
        elif strict:
            missing_keys.append(f"{quant_prefix}quant_state.bitsandbytes__{self.quant_type}")
        # The quant-state entries are ours, not unexpected: hand the rest to nn.Module.
        own = {key: value for key, value in state_dict.items() if not key.startswith(quant_prefix)}
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )
