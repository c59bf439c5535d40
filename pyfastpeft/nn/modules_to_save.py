"""ModulesToSave: PEFT's modules_to_save, a module trained whole beside the adapters (a classification head, the
lm_head, a norm), and add_modules_to_save, which wraps a model's modules in it.

The wrapper keeps the frozen `original_module` and, per adapter, a trainable copy in `modules_to_save[name]`; forward
runs the active adapter's copy (the original when none is active or adapters are disabled). Names are PEFT's
ModulesToSaveWrapper's, so state-dict keys read `...score.original_module.weight` and
`...score.modules_to_save.<adapter>.weight`, and an adapter file holds the copy as `base_model.model.score.weight`.
Attributes the wrapper lacks (`weight`, `in_features`, ...) are the module in use's, as PEFT's wrapper answers them:
an output layer wrapped this way still serves get_output_embeddings().weight, and the fused loss trains the copy.
"""

from __future__ import annotations

import copy

from torch import nn

from pyfastpeft.nn._adapters import ForwardsAttributes, NamedAdapters


class ModulesToSave(NamedAdapters, ForwardsAttributes, nn.Module):
    """A module trained whole (PEFT's ModulesToSaveWrapper): one trainable copy per adapter, the original frozen."""

    _OWNER = "original_module"

    def __init__(self, module: nn.Module, adapter_name: str = "default"):
        super().__init__()
        if isinstance(module, ModulesToSave):
            raise TypeError("ModulesToSave: module is already a ModulesToSave; add_adapter adds another copy to it")
        if not isinstance(module, nn.Module):
            raise TypeError(f"ModulesToSave: module must be an nn.Module, got {type(module).__name__}")
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: str | None = None
        self._adapters_enabled = True
        module.requires_grad_(False)
        self.add_adapter(adapter_name)
        self.set_adapter(adapter_name)

    @classmethod
    def sharing(cls, original: nn.Module, copies: nn.ModuleDict, active: str | None, enabled: bool) -> ModulesToSave:
        """A ModulesToSave over these very modules (no copy made, trainability as it is): what from_peft builds from
        PEFT's ModulesToSaveWrapper."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.original_module, module.modules_to_save = original, copies
        module._active_adapter = active if active in copies else None
        module._adapters_enabled = enabled
        return module

    def add_adapter(self, adapter_name: str) -> None:
        """A fresh trainable copy of the original for adapter_name (not activated)."""
        from pyfastpeft.nn.lora import _check_adapter_name

        adapter_name = _check_adapter_name("ModulesToSave.add_adapter", adapter_name)
        if adapter_name in self.modules_to_save:
            raise ValueError(f"ModulesToSave.add_adapter: adapter {adapter_name!r} already exists")
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(adapter_name == self._active_adapter)
        self.modules_to_save[adapter_name] = module

    def set_adapter(self, adapter_name: str | None) -> None:
        """Run and train adapter_name's copy; None runs the frozen original (the model's adapter is not on this one)."""
        if adapter_name is not None and adapter_name not in self.modules_to_save:
            raise ValueError(
                f"ModulesToSave.set_adapter: unknown adapter {adapter_name!r}; this module has "
                f"{list(self.modules_to_save)}"
            )
        self._active_adapter = adapter_name
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            raise ValueError(f"ModulesToSave.delete_adapter: unknown adapter {adapter_name!r}")
        del self.modules_to_save[adapter_name]
        if adapter_name == self._active_adapter:
            self.set_adapter(next(iter(self.modules_to_save), None))

    def disable_adapters(self) -> None:
        self._adapters_enabled = False

    def module_in_use(self) -> nn.Module:
        if not self._adapters_enabled or self._active_adapter is None:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    def forward(self, *args, **kwargs):
        return self.module_in_use()(*args, **kwargs)

    def _attribute_owner(self) -> nn.Module:
        return self.module_in_use()

    def extra_repr(self) -> str:
        return f"adapters={list(self.modules_to_save)}, active_adapter={self._active_adapter!r}"


def matches_module_to_save(path: str, module_names) -> bool:
    """PEFT's rule for modules_to_save: the module's path ends with one of the names (a plain string suffix, so "norm"
    also names every "...layernorm")."""
    return any(path.endswith(name) for name in module_names)


def check_module_names(fn: str, module_names) -> tuple[str, ...]:
    if isinstance(module_names, str) or not isinstance(module_names, (list, tuple, set, frozenset)):
        raise TypeError(f"{fn}: modules_to_save must be a list of module names, got {module_names!r}")
    if not module_names or not all(isinstance(name, str) and name for name in module_names):
        raise ValueError(f"{fn}: modules_to_save must be a non-empty list of non-empty names, got {module_names!r}")
    return tuple(module_names)


def modules_to_save_targets(model: nn.Module, module_names) -> list[tuple[str, nn.Module]]:
    """(path, module) of the outermost modules whose paths match module_names (already wrapped ones included), none
    inside a ModulesToSave or an adapter layer."""
    from pyfastpeft.nn.lora import LoRALinear

    found, inside = [], ()
    for path, module in model.named_modules():
        if not path or path.startswith(inside):
            continue
        if isinstance(module, (ModulesToSave, LoRALinear)):
            inside += (path + ".",)
            if isinstance(module, LoRALinear):
                continue
        if matches_module_to_save(path, module_names):
            found.append((path, module))
            inside += (path + ".",)
    return found


def add_modules_to_save(model: nn.Module, module_names, adapter_name: str = "default") -> list[str]:
    """Wrap, in place, the modules of model whose paths end with one of module_names in ModulesToSave with a trainable
    copy for adapter_name, activated; a module already wrapped gets the copy added. Returns the wrapped paths."""
    from pyfastpeft.nn.lora import _check_adapter_name, _set_submodule

    fn = "add_modules_to_save"
    module_names = check_module_names(fn, module_names)
    _check_adapter_name(fn, adapter_name)
    targets = modules_to_save_targets(model, module_names)
    if not targets:
        raise ValueError(f"{fn}: no module of the model matches modules_to_save={list(module_names)}")
    clashes = [p for p, m in targets if isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save]
    if clashes:
        raise ValueError(f"{fn}: adapter {adapter_name!r} already exists in {clashes[:4]}")
    for path, module in targets:
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name)
            module.set_adapter(adapter_name)
        else:
            _set_submodule(model, path, ModulesToSave(module, adapter_name))
    return [path for path, _ in targets]


def trainable_copies(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """(path, the copy) of every ModulesToSave of model holding adapter_name."""
    return [
        (path, module.modules_to_save[adapter_name])
        for path, module in model.named_modules()
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save
    ]


__all__ = ["ModulesToSave", "add_modules_to_save", "modules_to_save_targets", "trainable_copies"]
