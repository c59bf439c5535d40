"""LoRALinear (PEFT's lora.Linear over a frozen dense, NF4 or LLM.int8 base, one fused lora_linear call per forward) and
add_lora, which wraps a model's linear layers in it.

    y = x W^T + b + s * dropout(x) A^T B^T      A [r, in], B [out, r], s = alpha / r (rsLoRA: alpha / sqrt(r))
and, for an adapter with use_dora=True (DoRA, pyfastpeft.functional.dora_linear), the same product rescaled per
output row by a trained magnitude m over the detached norm ||W + s B A||_row.

Names and shapes are PEFT's, so state-dict keys read `...q_proj.base_layer.weight`,
`...q_proj.lora_A.<adapter>.weight`, `...q_proj.lora_B.<adapter>.weight` and, for DoRA,
`...q_proj.lora_magnitude_vector.<adapter>.weight`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from typing import Callable

import torch
from torch import nn

from pyfastpeft.nn._adapters import NamedAdapters
from pyfastpeft.nn.experts import LoRAExperts, LoRAParameter, QuantizedExperts, experts_layout_problem, up_name
from pyfastpeft.nn.linear4bit import Linear4bit
from pyfastpeft.nn.linear8bitlt import Linear8bitLt
from pyfastpeft.nn.lora_embedding import LoRAEmbedding
from pyfastpeft.nn.modules_to_save import (
    ModulesToSave,
    add_modules_to_save,
    check_module_names,
    modules_to_save_targets,
)
from pyfastpeft.ops import _dtensor
from pyfastpeft.ops._autocast import autocast_dtype
from pyfastpeft.ops._dtensor import is_dtensor
from pyfastpeft.ops.dora import dora_linear, dora_weight_norm
from pyfastpeft.ops.lora import lora_linear, lora_nf4_no_grad
from pyfastpeft.quant.nf4 import QuantState

# ---- base kinds: how each type of frozen base layer computes its product and stores merged weights ---------


@dataclasses.dataclass(frozen=True)
class _BaseKind:
    """One row of the table below: a new kind of base is one more row, once lora_linear accepts its weight."""

    # (base, x) -> the dtype x, bias, A and B are cast to before lora_linear; y returns in x's dtype
    compute_dtype: Callable[[nn.Module, torch.Tensor], torch.dtype]
    # base -> the `weight` argument of lora_linear: a dense [out, in] tensor, an NF4 (packed, state) pair or an
    # int8 (codes, SCB, threshold) tuple
    lora_weight: Callable[[nn.Module], object]
    # base -> its weight as a dense fp32 [out, in] tensor (merge and unmerge work on it)
    dense_weight: Callable[[nn.Module], torch.Tensor]
    # (base, fp32 [out, in]) -> stores it, rounded once to the base's format; a quantized kind returns the
    # max abs error of what it stored against the fp32 weight, a dense one None
    store_weight: Callable[[nn.Module, torch.Tensor], float | None]
    # the dtype new adapters are created in: fp32 over half-precision bases, as PEFT's models keep them
    adapter_dtype: Callable[[nn.Module], torch.dtype]
    # (base, x) -> the dtype the layer returns: the base layer's own output dtype, autocast included
    output_dtype: Callable[[nn.Module, torch.Tensor], torch.dtype] = lambda base, x: x.dtype


def _dense_store(base: nn.Linear, weight: torch.Tensor) -> None:
    with torch.no_grad():
        base.weight.copy_(weight)


def _nf4_lora_weight(base: Linear4bit):
    """(packed, state) with the layer's cached de-nested fp32 absmax, so a nested (double-quantized) state
    is not decoded again on every call."""
    state = base.quant_state
    flat_state = QuantState(
        absmax=base._absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    return base.weight, flat_state


def _nf4_store(base: Linear4bit, weight: torch.Tensor) -> float:
    base._store(weight.to(base.quant_state.dtype))
    return (base.dequantize().float() - weight).abs().max().item() if weight.numel() else 0.0


def _int8_store(base: Linear8bitLt, weight: torch.Tensor) -> float:
    base._store(weight)
    return (base.dequantize().float() - weight).abs().max().item() if weight.numel() else 0.0


# (module type, its row), first match wins, the default (nn.Linear) last; lora_weight's value is the `weight`
# argument of lora_linear, which pyfastpeft.ops.lora_base dispatches to the base kind of the ops the same way.
_BASE_KINDS: tuple[tuple[type, _BaseKind], ...] = (
    (
        Linear4bit,
        _BaseKind(
            compute_dtype=lambda base, x: base.compute_dtype or x.dtype,  # Linear4bit.forward's rule
            lora_weight=_nf4_lora_weight,
            dense_weight=lambda base: base.dequantize().float(),
            store_weight=_nf4_store,
            adapter_dtype=lambda base: torch.float32,
        ),
    ),
    (
        Linear8bitLt,
        _BaseKind(
            compute_dtype=lambda base, x: x.dtype,  # Linear8bitLt.forward's rule: the product in x's dtype
            lora_weight=lambda base: (base.weight, base.SCB, base.threshold),
            dense_weight=lambda base: base.dequantize(torch.float32),
            store_weight=_int8_store,
            adapter_dtype=lambda base: torch.float32,
        ),
    ),
    (
        nn.Linear,
        _BaseKind(
            # nn.Linear's rule: x must already be the weight's dtype, or autocast casts both (F.linear's entry in
            # autocast's lists), and so does PEFT's LoRA layer over it, which then returns the autocast dtype
            compute_dtype=lambda base, x: autocast_dtype(x) or x.dtype,
            lora_weight=lambda base: base.weight,
            dense_weight=lambda base: base.weight.detach().float(),
            store_weight=_dense_store,
            adapter_dtype=lambda base: torch.promote_types(base.weight.dtype, torch.float32),
            output_dtype=lambda base, x: autocast_dtype(x) or x.dtype,
        ),
    ),
)


def base_kind(module: nn.Module) -> _BaseKind | None:
    """The row of the first listed type module is an instance of; None when LoRALinear cannot wrap it."""
    for cls, kind in _BASE_KINDS:
        if isinstance(module, cls):
            if cls is nn.Linear and not module.weight.dtype.is_floating_point:
                return None  # a quantized nn.Linear subclass (bitsandbytes' layers): its weight is not dense
            return kind
    return None


def _supported_bases() -> str:
    return " or ".join(
        f"{cls.__module__.replace('torch.nn.modules.linear', 'torch.nn')}.{cls.__name__}"
        for cls, _ in reversed(_BASE_KINDS)
    )


# ---- argument checks ---------------------------------------------------------------------------------------


def _check_rank(fn: str, r) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"{fn}: r must be an int, got {type(r).__name__}")
    if r < 1:
        raise ValueError(f"{fn}: r must be >= 1, got {r}")
    return int(r)


def _check_alpha(fn: str, lora_alpha) -> numbers.Real:
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise TypeError(f"{fn}: lora_alpha must be a real number, got {type(lora_alpha).__name__}")
    return lora_alpha


def _check_dropout(fn: str, lora_dropout) -> float:
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real):
        raise TypeError(f"{fn}: lora_dropout must be a real number, got {type(lora_dropout).__name__}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{fn}: lora_dropout must be in [0, 1), got {lora_dropout}")
    return float(lora_dropout)


def _check_bool(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    return value


def _check_adapter_name(fn: str, adapter_name) -> str:
    if not isinstance(adapter_name, str):
        raise TypeError(f"{fn}: adapter_name must be a str, got {type(adapter_name).__name__}")
    if not adapter_name or "." in adapter_name or hasattr(nn.ModuleDict, adapter_name):
        raise ValueError(
            f"{fn}: adapter_name must be a non-empty module name without '.' that is not an "
            f"nn.ModuleDict attribute, got {adapter_name!r}"
        )
    return adapter_name


# ---- the module ----------------------------------------------------------------------------------------------


class DoRAMagnitude(nn.Module):
    """DoRA's trained magnitude m [out] of one adapter, as `weight` (PEFT's DoraLinearLayer holds it the same way, so
    the state-dict key reads `lora_magnitude_vector.<adapter>.weight`)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoRALinear(NamedAdapters, nn.Module):
    """A frozen linear layer plus named LoRA adapters, PEFT's peft.tuners.lora.Linear with one fused call.

    base: an nn.Linear, a pyfastpeft.nn.Linear4bit (NF4/FP4) or a pyfastpeft.nn.Linear8bitLt (LLM.int8); its
    parameters are frozen. One adapter is
    active at a time and only its A and B train. lora_A[name] = nn.Linear(in, r, bias=False) (A is its
    weight [r, in]), lora_B[name] = nn.Linear(r, out, bias=False); init_lora_weights=True draws A
    kaiming-uniform (a = sqrt(5)) and zeroes B, so a new adapter starts as the identity; False leaves
    nn.Linear's default init in both. Adapters are kept in fp32 over half-precision bases (PEFT's models do
    the same) and cast to the compute dtype in forward: the base's dtype for nn.Linear, Linear4bit's
    compute_dtype for NF4 (x is cast to it and y back to x's dtype, as Linear4bit.forward does), x's own for
    int8.
    Dropout applies to the LoRA path only, and only in training mode.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = "default",
        init_lora_weights: bool = True,
        use_dora: bool = False,
        lora_bias: bool = False,
    ):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise TypeError("LoRALinear: base is already a LoRALinear; add_adapter adds another adapter to it")
        if not isinstance(base, nn.Module) or base_kind(base) is None:
            got = type(base).__name__
            if isinstance(base, nn.Linear):
                got += f" with a {base.weight.dtype} weight"
            raise TypeError(
                f"LoRALinear: base must be a {_supported_bases()} with a floating-point or NF4 weight, got {got}"
            )
        self.base_layer = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only: name -> DoRAMagnitude
        self._merged_norms: dict[str, torch.Tensor] = {}  # DoRA adapters merged: the norm unmerge divides back by
        self.merged_adapters: list[str] = []
        self._adapters_enabled = True
        self._active_adapter = adapter_name
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora, lora_bias)
        self.set_adapter(adapter_name)

    # -- adapters --

    def add_adapter(
        self,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool = True,
        use_dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        """Add a named adapter; it is not activated (set_adapter does that) and does not train until it is.
        use_dora: a DoRA adapter, whose magnitude starts at ||W + s B A||_row (||W|| when B starts at zero), so the
        new adapter leaves the layer's output as it was, as PEFT's does. lora_bias: PEFT's option of a trained bias on
        B (lora_B[name].bias [out], zero at the start), which adds s * b_B to the output."""
        fn = "LoRALinear.add_adapter"
        adapter_name = _check_adapter_name(fn, adapter_name)
        if adapter_name in self.lora_A:
            raise ValueError(f"{fn}: adapter {adapter_name!r} already exists")
        r = _check_rank(fn, r)
        lora_alpha = _check_alpha(fn, lora_alpha)
        lora_dropout = _check_dropout(fn, lora_dropout)
        _check_bool(fn, "use_rslora", use_rslora)
        _check_bool(fn, "init_lora_weights", init_lora_weights)
        _check_bool(fn, "use_dora", use_dora)
        _check_bool(fn, "lora_bias", lora_bias)
        if use_dora and lora_bias:
            raise ValueError(f"{fn}: lora_bias is not supported with use_dora (PEFT refuses the pair too)")
        kind = base_kind(self.base_layer)
        factory = dict(device=self.base_layer.weight.device, dtype=kind.adapter_dtype(self.base_layer))
        lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        lora_B = nn.Linear(r, self.out_features, bias=lora_bias, **factory)
        if init_lora_weights:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
            if lora_bias:
                nn.init.zeros_(lora_B.bias)
        if is_dtensor(self.base_layer.weight):
            self._shard_adapter(fn, lora_A, lora_B, use_dora or lora_bias)
        trains = adapter_name == self._active_adapter
        lora_A.requires_grad_(trains)
        lora_B.requires_grad_(trains)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = lora_A, lora_B
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout[adapter_name], self.use_rslora[adapter_name] = lora_dropout, use_rslora
        self.use_dora[adapter_name], self.lora_bias[adapter_name] = use_dora, lora_bias
        if use_dora:
            norm = dora_weight_norm(
                kind.lora_weight(self.base_layer), lora_A.weight, lora_B.weight, self.scaling[adapter_name]
            )
            magnitude = DoRAMagnitude(norm.to(factory["dtype"]))
            magnitude.weight.requires_grad_(trains)
            self.lora_magnitude_vector[adapter_name] = magnitude

    def _shard_adapter(self, fn: str, lora_A: nn.Linear, lora_B: nn.Linear, refused: bool) -> None:
        """A tensor-parallel base (its weight a DTensor sharded on out or in, as torch's parallelize_module leaves
        an nn.Linear): the adapter's A and B become DTensors sharded with it, rank 0's values on every rank."""
        from torch.distributed.tensor import distribute_tensor

        if refused:
            raise ValueError(f"{fn}: use_dora and lora_bias are not supported over a tensor-parallel base")
        weight = self.base_layer.weight
        for linear, placements in zip((lora_A, lora_B), _dtensor.adapter_placements(weight)):
            linear.weight = nn.Parameter(distribute_tensor(linear.weight.detach(), weight.device_mesh, placements))

    def _check_known(self, fn: str, adapter_name) -> None:
        if adapter_name not in self.lora_A:
            raise ValueError(f"{fn}: unknown adapter {adapter_name!r}; this layer has {list(self.lora_A)}")

    def set_adapter(self, adapter_name: str | None) -> None:
        """Make adapter_name the active adapter: the one forward applies and the only one that trains.
        None activates none, as PEFT's layers do when the model's active adapter targets other layers.
        A merged layer is unmerged first (with a warning), as PEFT does."""
        if adapter_name is not None:
            self._check_known("LoRALinear.set_adapter", adapter_name)
        if self.merged and adapter_name != self._active_adapter:
            warnings.warn("LoRALinear.set_adapter: the layer is merged; unmerging it first", stacklevel=2)
            self.unmerge()
        self._active_adapter = adapter_name
        for name in self.lora_A:
            self.lora_A[name].requires_grad_(name == adapter_name)
            self.lora_B[name].requires_grad_(name == adapter_name)
        for name, magnitude in self.lora_magnitude_vector.items():
            magnitude.weight.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; deleting the active one activates the first remaining adapter."""
        fn = "LoRALinear.delete_adapter"
        self._check_known(fn, adapter_name)
        if len(self.lora_A) == 1:
            raise ValueError(f"{fn}: {adapter_name!r} is the only adapter; use the base_layer instead")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"{fn}: adapter {adapter_name!r} is merged into the base; unmerge() first")
        for table in (
            self.lora_A,
            self.lora_B,
            self.r,
            self.lora_alpha,
            self.scaling,
            self.lora_dropout,
            self.use_rslora,
            self.use_dora,
            self.lora_bias,
        ):
            del table[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if adapter_name == self._active_adapter:
            self.set_adapter(next(iter(self.lora_A)))

    def disable_adapters(self) -> None:
        """Forward computes the base alone until enable_adapters(); a merged layer is unmerged first."""
        if self.merged:
            self.unmerge()
        self._adapters_enabled = False

    # -- merging --

    def _delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s * B A in fp32, [out, in]."""
        lora_A = self.lora_A[adapter_name].weight.detach().float()
        lora_B = self.lora_B[adapter_name].weight.detach().float()
        return (lora_B @ lora_A) * self.scaling[adapter_name]

    def _store_base_weight(self, fn: str, weight: torch.Tensor) -> None:
        error = base_kind(self.base_layer).store_weight(self.base_layer, weight)
        if error is not None:
            warnings.warn(
                f"{fn}: the {type(self.base_layer).__name__} base was re-quantized; the stored weight "
                f"differs from the exact fp32 result by up to {error:.3g} (max abs)",
                stacklevel=3,
            )

    def _add_lora_bias(self, adapter_name: str, sign: float) -> None:
        """base bias += sign * s * b_B for an adapter with lora_bias (PEFT's merge of it)."""
        if self.lora_bias[adapter_name]:
            with torch.no_grad():
                lora_bias = self.lora_B[adapter_name].bias.detach().float() * self.scaling[adapter_name]
                self.base_layer.bias.copy_(self.base_layer.bias.float() + sign * lora_bias)

    def merge(self) -> None:
        """W <- W + s * B A for the active adapter, computed in fp32 and rounded once to the base's format
        (a quantized base is dequantized, added to and re-quantized, with a warning stating the error)."""
        if not self._adapters_enabled:
            raise ValueError("LoRALinear.merge: adapters are disabled; enable_adapters() first")
        if self._active_adapter is None:
            raise ValueError("LoRALinear.merge: no adapter is active; set_adapter(name) first")
        if self._active_adapter in self.merged_adapters:
            warnings.warn(f"LoRALinear.merge: adapter {self._active_adapter!r} is already merged", stacklevel=2)
            return
        kind = base_kind(self.base_layer)
        name = self._active_adapter
        if self.lora_bias[name] and self.base_layer.bias is None:
            raise ValueError(
                f"LoRALinear.merge: adapter {name!r} has lora_bias and the base layer has no bias to merge it into"
            )
        weight = kind.dense_weight(self.base_layer)
        merged = weight + self._delta_weight(name)
        if self.use_dora[name]:
            # PEFT's DoRA merge: W <- (m / n) (W + s B A), n = ||W + s B A||_row of the unmerged W, kept for unmerge
            norm = torch.linalg.vector_norm(merged, dim=1)
            self._merged_norms[name] = norm
            merged = merged * (self.lora_magnitude_vector[name].weight.detach().float() / norm).unsqueeze(1)
        self._store_base_weight("LoRALinear.merge", merged)
        self._add_lora_bias(name, 1.0)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W <- W - s * B A for every merged adapter, last merged first, in fp32 (see merge)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge: nothing is merged", stacklevel=2)
            return
        kind = base_kind(self.base_layer)
        weight = kind.dense_weight(self.base_layer)
        for adapter_name in reversed(self.merged_adapters):
            if adapter_name in self._merged_norms:  # DoRA: W = W' / (m / n) - s B A
                scale = self.lora_magnitude_vector[adapter_name].weight.detach().float()
                weight = weight / (scale / self._merged_norms.pop(adapter_name)).unsqueeze(1)
            weight -= self._delta_weight(adapter_name)
            self._add_lora_bias(adapter_name, -1.0)
        self._store_base_weight("LoRALinear.unmerge", weight)
        self.merged_adapters.clear()

    # -- forward --

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._adapters_enabled or self.merged_adapters or self._active_adapter is None:
            return self.base_layer(x)
        base = self.base_layer
        kind = base_kind(base)
        name = self._active_adapter
        compute = kind.compute_dtype(base, x)
        bias = None if base.bias is None else base.bias.to(compute)
        if self.lora_bias[name]:  # (xa B^T + b_B) * s: s * b_B joins the base's bias, and autograd splits its gradient
            lora_bias = self.lora_B[name].bias.to(compute) * self.scaling[name]
            bias = lora_bias if bias is None else bias + lora_bias
        if self.use_dora[name]:
            return self._dora_forward(x, kind, compute, bias).to(kind.output_dtype(base, x))
        if isinstance(base, Linear4bit) and self._infers_over_nf4(x, name):
            # inference (a decode step): lora_linear's op without re-describing the base on every call, as
            # Linear4bit.forward runs its own; every tensor is still tested against the op's contract (lora_nf4_no_grad)
            y = lora_nf4_no_grad(
                x if x.dtype == compute else x.to(compute),
                base.weight,
                base._absmax,
                base.quant_state.code.float(),
                bias,
                self.lora_A[name].weight.to(compute),
                self.lora_B[name].weight.to(compute),
                base.blocksize,
                base.out_features,
                base.in_features,
                self.scaling[name],
                0.0,
                None,
            )
        else:
            weight = kind.lora_weight(base)
            local_io = is_dtensor(weight) and not is_dtensor(x)  # a tensor-parallel base between plain layers
            x_in = _dtensor.module_input(x, weight) if local_io else x
            y = lora_linear(
                x_in if x_in.dtype == compute else x_in.to(compute),
                weight,
                bias,
                self.lora_A[name].weight.to(compute),
                self.lora_B[name].weight.to(compute),
                self.scaling[name],
                self.lora_dropout[name],
                self.training,
            )
            y = _dtensor.module_output(y) if local_io else y
        output_dtype = kind.output_dtype(base, x)
        return y if y.dtype == output_dtype else y.to(output_dtype)  # a no-op .to costs microseconds at decode

    def _infers_over_nf4(self, x, name: str) -> bool:
        """Whether forward over a Linear4bit base is lora_linear's no-grad path with nothing lora_linear would add:
        gradients off, no dropout mask to draw, no autocast, no DTensor."""
        return (
            not torch.is_grad_enabled()
            and (not self.training or self.lora_dropout[name] == 0.0)
            and isinstance(x, torch.Tensor)
            and autocast_dtype(x) is None
            and not is_dtensor(x)
            and not is_dtensor(self.base_layer.weight)
        )

    def _dora_forward(self, x, kind: _BaseKind, compute: torch.dtype, bias):
        """The active DoRA adapter: the norm from A and B as stored (fp32 over half-precision bases, as PEFT computes
        it), the products in the compute dtype."""
        name, base = self._active_adapter, self.base_layer
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        weight = kind.lora_weight(base)
        norm = dora_weight_norm(weight, lora_A, lora_B, self.scaling[name])
        return dora_linear(
            x.to(compute),
            weight,
            bias,
            lora_A.to(compute),
            lora_B.to(compute),
            self.lora_magnitude_vector[name].weight,
            self.scaling[name],
            self.lora_dropout[name],
            self.training,
            weight_norm=norm,
        )

    def extra_repr(self) -> str:
        return (
            f"adapters={list(self.lora_A)}, active_adapter={self._active_adapter!r}, "
            f"enabled={self._adapters_enabled}, merged_adapters={self.merged_adapters}"
        )


# ---- add_lora ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoRAReport:
    """What add_lora wrapped (module paths) and the model's trainable / total parameter counts (stored
    elements: an NF4 weight counts its packed bytes)."""

    adapter_name: str
    wrapped: list[str] = dataclasses.field(default_factory=list)  # linear layers
    experts: list[str] = dataclasses.field(default_factory=list)  # MoE experts blocks (LoRAExperts)
    routers: list[str] = dataclasses.field(default_factory=list)  # bare router weights (LoRAParameter)
    modules_to_save: list[str] = dataclasses.field(default_factory=list)  # modules trained whole (ModulesToSave)
    embeddings: list[str] = dataclasses.field(default_factory=list)  # input embeddings (LoRAEmbedding)
    not_adapted: dict[str, str] = dataclasses.field(default_factory=dict)  # MoE path -> why all-linear left it
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        lines = [
            f"pyfastpeft.add_lora: adapter {self.adapter_name!r} on {len(self.wrapped)} linear layers, "
            + (f"{len(self.embeddings)} embeddings, " if self.embeddings else "")
            + f"{len(self.experts)} MoE experts blocks and {len(self.routers)} routers"
            + (f", {len(self.modules_to_save)} modules trained whole" if self.modules_to_save else "")
            + "; "
            f"trainable params {self.trainable_params:,} of {self.total_params:,} ({share:.4f}%)"
        ]
        return "\n".join(lines + [f"  not adapted: {path} ({why})" for path, why in self.not_adapted.items()])


def _output_layer(model: nn.Module):
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            return get_output()
        except NotImplementedError:
            return None
    return None


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every layer LoRALinear can wrap or already wraps, outside LoRALinear's own children and
    QuantizedExperts' per-expert layers."""
    found, inside = [], []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, (QuantizedExperts, LoRAExperts, LoRAParameter)):
            inside.append(path + ".")  # per-expert layers: experts take LoRA as a block (moe_targets)
        elif isinstance(module, ModulesToSave):
            inside.append(path + ".")  # trained whole, never adapted
        elif isinstance(module, LoRALinear):
            inside.append(path + ".")
            found.append((path, module))
        elif base_kind(module) is not None:
            found.append((path, module))
    return found


def embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every floating-point nn.Embedding LoRAEmbedding can wrap or already wraps, outside the
    adapter layers' and ModulesToSave's own children."""
    found, inside = [], ()
    for path, module in model.named_modules():
        if path.startswith(inside):
            continue
        if isinstance(module, (LoRALinear, ModulesToSave, LoRAEmbedding)):
            inside += (path + ".",)
            if isinstance(module, LoRAEmbedding):
                found.append((path, module))
        elif isinstance(module, nn.Embedding) and module.weight.dtype.is_floating_point:
            found.append((path, module))
    return found


def _stacked_parameters(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]


def moe_targets(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]], dict[str, str]]:
    """The MoE parts PEFT's "all-linear" adapts through target_parameters: (experts blocks, routers, left), where an
    experts block is a transformers 5.x block of 3-D expert weights whose layout LoRAExperts reproduces (dense, a
    QuantizedExperts, or one already adapted), a router is a module beside such a block whose 2-D `weight` is used
    bare rather than through nn.Linear, and left maps each block of 3-D weights that is not covered to why."""
    blocks, left, inside = [], {}, ()
    for path, module in model.named_modules():
        if path.startswith(inside):
            continue
        if isinstance(module, (QuantizedExperts, LoRAExperts)):
            blocks.append((path, module))
            inside += (path + ".",)
        elif _stacked_parameters(module):
            problem = experts_layout_problem(module)
            if problem is None:
                blocks.append((path, module))
            else:
                left[path] = f"{type(module).__name__}: {problem}"
    routers = []
    for path, _ in blocks:
        parent_path, _, name = path.rpartition(".")
        for sibling_name, sibling in model.get_submodule(parent_path).named_children():
            weight = sibling._parameters.get("weight")
            if isinstance(sibling, LoRAParameter) or (
                sibling_name != name
                and isinstance(weight, torch.Tensor)
                and weight.dim() == 2
                and weight.is_floating_point()
                and not isinstance(sibling, nn.Linear)
            ):
                routers.append((f"{parent_path}.{sibling_name}" if parent_path else sibling_name, sibling))
    return blocks, routers, left


def matches_target(path: str, target_modules) -> bool:
    """PEFT's rule: a str is a regex the whole path must match; a sequence of names matches a path equal to
    one of them or ending in '.' + one of them (so a bare name matches the path's last component)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == target or path.endswith("." + target) for target in target_modules)


def _check_target_modules(fn: str, target_modules):
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError(f"{fn}: target_modules must not be empty")
        return target_modules
    if (
        not isinstance(target_modules, (list, tuple, set, frozenset))
        or not target_modules
        or not all(isinstance(name, str) and name for name in target_modules)
    ):
        raise TypeError(
            f"{fn}: target_modules must be 'all-linear', a regex str or a non-empty sequence of "
            f"module names, got {target_modules!r}"
        )
    return tuple(target_modules)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def add_lora(
    model: nn.Module,
    target_modules=("q_proj", "v_proj"),
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    adapter_name: str = "default",
    use_dora: bool = False,
    lora_bias: bool = False,
    modules_to_save=None,
) -> LoRAReport:
    """Wrap, in place, the matching nn.Linear / Linear4bit / Linear8bitLt layers of model in LoRALinear with a new
    adapter, activate it, and freeze every parameter but its A and B matrices.

    target_modules: names matched against the last path components (("q_proj", "v_proj")), or a regex str
    the whole path must match, or "all-linear": every linear layer but the output layer (lm_head), as PEFT, and,
    as PEFT's all-linear does through target_parameters on transformers 5.x, each MoE experts block of 3-D weights
    (LoRAExperts: gate_up_proj at rank 2r and alpha 2 * lora_alpha, standing for PEFT's gate_proj and up_proj;
    up_proj and down_proj at r) and the bare router weight beside it (LoRAParameter); report.not_adapted says which
    MoE parts stayed frozen and why (an unsupported layout; lora_dropout > 0, which PEFT's ParamWrapper refuses).
    A layer already wrapped gets the adapter added (and activated); an experts block or router holds one adapter.
    use_dora: DoRA adapters on the linear layers (PEFT's use_dora; MoE experts and routers are then left out, as
    PEFT's ParamWrapper has no DoRA, and report.not_adapted says so); lora_bias: PEFT's trained bias on each B (not
    with use_dora, and not on experts or routers either). modules_to_save: PEFT's option of that name, names of modules
    trained whole beside the adapters (a classification head, say; PEFT's rule: the module's path ends with the
    name), each wrapped in ModulesToSave with a trainable copy for this adapter and left out of LoRA.
    Returns a LoRAReport.
    """
    fn = "add_lora"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    target_modules = _check_target_modules(fn, target_modules)
    # Validate the adapter settings once, before the model is touched.
    _check_adapter_name(fn, adapter_name)
    _check_rank(fn, r)
    _check_alpha(fn, lora_alpha)
    _check_dropout(fn, lora_dropout)
    _check_bool(fn, "use_rslora", use_rslora)
    _check_bool(fn, "use_dora", use_dora)
    _check_bool(fn, "lora_bias", lora_bias)
    if use_dora and lora_bias:
        raise ValueError(f"{fn}: lora_bias is not supported with use_dora (PEFT refuses the pair too)")
    saved_paths = ()
    if modules_to_save is not None:
        modules_to_save = check_module_names(fn, modules_to_save)
        targets = modules_to_save_targets(model, modules_to_save)
        if not targets:
            raise ValueError(f"{fn}: no module of the model matches modules_to_save={list(modules_to_save)}")
        saved_paths = tuple(path for path, _ in targets)
    candidates = [
        (path, module)
        for path, module in linear_modules(model)
        if not any(path == saved or path.startswith(saved + ".") for saved in saved_paths)
    ]
    if target_modules == "all-linear":
        output_layer = _output_layer(model)
        chosen = [
            (path, module)
            for path, module in candidates
            if path.rpartition(".")[2] != "lm_head"
            and module is not output_layer
            and not (isinstance(module, LoRALinear) and module.base_layer is output_layer)
        ]
        embeddings = []
    else:
        chosen = [(path, module) for path, module in candidates if matches_target(path, target_modules)]
        embeddings = [
            (path, module)
            for path, module in embedding_modules(model)
            if matches_target(path, target_modules)
            and not any(path == saved or path.startswith(saved + ".") for saved in saved_paths)
        ]
    if embeddings and lora_bias:
        raise ValueError(
            f"{fn}: target_modules names the embeddings {[path for path, _ in embeddings][:4]}, and LoRA on "
            "embeddings has no lora_bias (PEFT refuses it there too)"
        )
    if not chosen and not embeddings:
        names = sorted({path.rpartition(".")[2] for path, _ in candidates})
        raise ValueError(
            f"{fn}: no linear layer matches target_modules={target_modules!r}; the model's linear "
            f"layers are named {names[:12]}{' ...' if len(names) > 12 else ''}"
        )
    clashes = [path for path, module in chosen if isinstance(module, LoRALinear) and adapter_name in module.lora_A]
    clashes += [
        path
        for path, module in embeddings
        if isinstance(module, LoRAEmbedding) and adapter_name in module.lora_embedding_A
    ]
    if clashes:
        raise ValueError(f"{fn}: adapter {adapter_name!r} already exists in {clashes[:4]}")
    blocks, routers, left = moe_targets(model) if target_modules == "all-linear" else ([], [], {})
    not_adapted = dict(left)
    if lora_dropout and (blocks or routers):
        # PEFT's ParamWrapper has no dropout: an adapter with both could not be read back by PEFT
        why = "lora_dropout > 0: PEFT adapts experts and routers (target_parameters) only without dropout"
        not_adapted.update({path: why for path, _ in blocks + routers})
        blocks, routers = [], []
    if (use_dora or lora_bias) and (blocks or routers):
        why = "use_dora / lora_bias: PEFT adapts experts and routers (target_parameters) with plain LoRA only"
        not_adapted.update({path: why for path, _ in blocks + routers})
        blocks, routers = [], []
    held = [path for path, module in blocks + routers if isinstance(module, (LoRAExperts, LoRAParameter))]
    if held:
        raise ValueError(
            f"{fn}: {held[:4]} already hold an adapter and an experts block or router holds one (as PEFT's "
            "target_parameters); name the linear layers in target_modules to add another adapter to those"
        )

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    report = LoRAReport(adapter_name=adapter_name)
    for path, module in chosen:
        if isinstance(module, LoRALinear):
            module.add_adapter(
                adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora=use_dora, lora_bias=lora_bias
            )
            module.set_adapter(adapter_name)
        else:
            layer = LoRALinear(
                module, r, lora_alpha, lora_dropout, use_rslora, adapter_name, use_dora=use_dora, lora_bias=lora_bias
            )
            _set_submodule(model, path, layer)
        report.wrapped.append(path)
    for path, module in embeddings:  # no dropout on token ids, as PEFT
        if isinstance(module, LoRAEmbedding):
            module.add_adapter(adapter_name, r, lora_alpha, use_rslora, use_dora=use_dora)
            module.set_adapter(adapter_name)
        else:
            layer = LoRAEmbedding(module, r, lora_alpha, use_rslora, adapter_name, use_dora=use_dora)
            _set_submodule(model, path, layer)
        report.embeddings.append(path)
    for path, module in blocks:
        # the gated block's gate_up_proj stands for PEFT's gate_proj and up_proj adapters: twice the rank and alpha,
        # the rule PEFT's all-linear applies to fused expert weights (same scaling, same capacity)
        times = {up_name(module): 2 if module.has_gate else 1, "down_proj": 1}
        ranks = {name: r * k for name, k in times.items()}
        alphas = {name: lora_alpha * k for name, k in times.items()}
        _set_submodule(model, path, LoRAExperts(module, ranks, alphas, use_rslora, adapter_name))
        report.experts.append(path)
    for path, module in routers:
        _set_submodule(model, path, LoRAParameter(module, "weight", r, lora_alpha, use_rslora, adapter_name))
        report.routers.append(path)
    if modules_to_save is not None:
        report.modules_to_save = add_modules_to_save(model, modules_to_save, adapter_name)
    report.not_adapted = not_adapted
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_params = sum(p.numel() for p in model.parameters())
    return report
