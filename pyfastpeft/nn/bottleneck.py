"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): BottleneckAdapter, AdapterLayer, add_adapters.

An adapter maps a sublayer's output h to h + s (act(h W_d^T + b_d) W_u^T + b_u) (pyfastpeft.functional.
bottleneck_adapter: the down-projection, activation, up-projection, bias and residual in two GEMM calls a pass).
add_adapters puts one after the attention output (o_proj) and/or the MLP output (down_proj): "houlsby" places both,
"pfeiffer" the MLP one only, as the two papers do. W_u and b_u start at zero, so every adapter starts as the
identity and the model's outputs are unchanged until it trains.

Checkpoint format: each adapted module becomes an AdapterLayer (`base_layer`, `adapters[<name>]`), and an adapter's
parameters carry AdapterHub's names inside it: `adapter_down.0.weight` [r, d], `adapter_down.0.bias` [r],
`adapter_up.weight` [d, r], `adapter_up.bias` [d]. A model's state dict therefore reads
`model.layers.0.mlp.down_proj.adapters.default.adapter_down.0.weight`, ...; add_adapters with the same settings on a
fresh model, then load_state_dict(strict=False) of the saved trainable tensors, restores it. (AdapterHub's own models
name the enclosing modules per architecture; its adapter-internal names are these.)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pyfastpeft.nn._adapters import ForwardsAttributes, NamedAdapters
from pyfastpeft.ops._checks import check_real
from pyfastpeft.ops.bottleneck import ACTIVATION_CODES, bottleneck_adapter

_ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
PLACEMENTS = {"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)}


class BottleneckAdapter(nn.Module):
    """x + s (act(x W_d^T + b_d) W_u^T + b_u) over the last dim d, rank r = d // reduction_factor. Parameters are
    kept in fp32 over a half-precision model (as PEFT keeps adapters) and cast to x's dtype in forward."""

    def __init__(
        self,
        features: int,
        rank: int,
        activation: str = "relu",
        scaling: float = 1.0,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        if activation not in ACTIVATION_CODES:
            raise ValueError(
                f"BottleneckAdapter: activation must be one of {list(ACTIVATION_CODES)}, got {activation!r}"
            )
        if rank < 1 or features < 1:
            raise ValueError(f"BottleneckAdapter: features and rank must be >= 1, got {features} and {rank}")
        factory = dict(dtype=dtype, device=device)
        self.adapter_down = nn.Sequential(nn.Linear(features, rank, **factory), _ACTIVATION_MODULES[activation]())
        self.adapter_up = nn.Linear(rank, features, **factory)
        self.activation, self.scaling = activation, float(scaling)
        with torch.no_grad():  # near identity: a small down-projection, a zero up-projection (Houlsby's init)
            nn.init.normal_(self.adapter_down[0].weight, std=1e-2)
            nn.init.zeros_(self.adapter_down[0].bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.adapter_down[0], self.adapter_up
        dtype = x.dtype
        return bottleneck_adapter(
            x,
            down.weight.to(dtype),
            down.bias.to(dtype),
            up.weight.to(dtype),
            up.bias.to(dtype),
            self.scaling,
            self.activation,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, scaling={self.scaling}"


class AdapterLayer(NamedAdapters, ForwardsAttributes, nn.Module):
    """A sublayer followed by named bottleneck adapters, one active: y = adapter(base_layer(x)). Attributes the layer
    lacks are the base layer's (in_features, weight, ...), so code that inspects the sublayer keeps working."""

    _OWNER = "base_layer"

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter, adapter_name: str = "default"):
        super().__init__()
        self.base_layer = base
        self.adapters = nn.ModuleDict({adapter_name: adapter})
        self._active_adapter: str | None = adapter_name
        self._adapters_enabled = True

    def set_adapter(self, adapter_name: str | None) -> None:
        if adapter_name is not None and adapter_name not in self.adapters:
            raise ValueError(f"AdapterLayer.set_adapter: unknown adapter {adapter_name!r}; have {list(self.adapters)}")
        self._active_adapter = adapter_name
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name == adapter_name)

    def disable_adapters(self) -> None:
        self._adapters_enabled = False

    def forward(self, *args, **kwargs):
        y = self.base_layer(*args, **kwargs)
        if not self._adapters_enabled or self._active_adapter is None:
            return y
        return self.adapters[self._active_adapter](y)


@dataclasses.dataclass
class AdapterReport:
    """What add_adapters wrapped (module paths), the norms it made trainable, and the trainable / total counts."""

    adapter_name: str
    wrapped: list[str] = dataclasses.field(default_factory=list)
    norms: list[str] = dataclasses.field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        return (
            f"pyfastpeft.add_adapters: adapter {self.adapter_name!r} after {len(self.wrapped)} sublayers"
            + (f", {len(self.norms)} norms trained" if self.norms else "")
            + f"; trainable params {self.trainable_params:,} of {self.total_params:,} ({share:.4f}%)"
        )


def _output_features(module: nn.Module) -> int | None:
    for name in ("out_features", "embedding_dim"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    return None


def plan_adapters(fn: str, model, reduction_factor, placement, activation, scaling, adapter_name, train_norms):
    """add_adapters' checks, nothing changed: [(path, module)] of the sublayers that get an adapter."""
    from pyfastpeft.nn.lora import _check_adapter_name, _check_bool, _check_target_modules, matches_target

    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor < 1:
        raise ValueError(f"{fn}: reduction_factor must be an int >= 1, got {reduction_factor!r}")
    targets = PLACEMENTS.get(placement) if isinstance(placement, str) and placement in PLACEMENTS else None
    if targets is None:
        targets = _check_target_modules(fn, placement)
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"{fn}: activation must be one of {list(ACTIVATION_CODES)}, got {activation!r}")
    check_real(fn, "scaling", scaling)
    _check_adapter_name(fn, adapter_name)
    _check_bool(fn, "train_norms", train_norms)
    chosen, inside = [], ()
    for path, module in model.named_modules():
        if not path or path.startswith(inside):
            continue
        if isinstance(module, AdapterLayer):
            inside += (path + ".",)
        if matches_target(path, targets):
            chosen.append((path, module))
            inside += (path + ".",)
    if not chosen:
        raise ValueError(f"{fn}: no module matches placement={placement!r}")
    missing = [path for path, module in chosen if _output_features(module) is None]
    if missing:
        raise ValueError(f"{fn}: {missing[:4]} do not say their output size (no out_features)")
    clashes = [path for path, module in chosen if isinstance(module, AdapterLayer) and adapter_name in module.adapters]
    if clashes:
        raise ValueError(f"{fn}: adapter {adapter_name!r} already exists in {clashes[:4]}")
    return chosen


def add_adapters(
    model: nn.Module,
    reduction_factor: int = 16,
    placement="pfeiffer",
    activation: str = "relu",
    scaling: float = 1.0,
    adapter_name: str = "default",
    train_norms: bool = False,
    freeze_others: bool = True,
) -> AdapterReport:
    """Put a bottleneck adapter (rank = d // reduction_factor) after the matched sublayers of model, in place, freeze
    every other parameter, and return an AdapterReport.

    placement: "pfeiffer" (after each MLP output, down_proj), "houlsby" (after the attention output o_proj and the MLP
    output), or a sequence of module names / a regex as add_lora's target_modules. train_norms: also train the
    norms' weights (Houlsby's recipe: RMSNorm / LayerNorm modules). A sublayer already adapted gets the new adapter
    added and activated. freeze_others=False keeps what trains already (LoRA beside the adapters). Every check runs
    before the model changes.
    """
    from pyfastpeft.nn.lora import _check_bool

    fn = "add_adapters"
    _check_bool(fn, "freeze_others", freeze_others)
    chosen = plan_adapters(fn, model, reduction_factor, placement, activation, scaling, adapter_name, train_norms)
    if freeze_others:
        model.requires_grad_(False)
    report = AdapterReport(adapter_name=adapter_name)
    for path, module in chosen:
        features = _output_features(module)
        reference = next(module.parameters())
        dtype = torch.promote_types(reference.dtype, torch.float32) if reference.is_floating_point() else torch.float32
        adapter = BottleneckAdapter(
            features, max(1, features // reduction_factor), activation, scaling, dtype, reference.device
        )
        if isinstance(module, AdapterLayer):
            module.adapters[adapter_name] = adapter
            module.set_adapter(adapter_name)
        else:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, AdapterLayer(module, adapter, adapter_name))
        report.wrapped.append(path)
    if train_norms:
        for path, module in model.named_modules():
            weight = module._parameters.get("weight")
            if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor):
                module.requires_grad_(True)
                report.norms.append(path)
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_params = sum(p.numel() for p in model.parameters())
    return report
