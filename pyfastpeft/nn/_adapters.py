"""What every adapter-holding module (LoRALinear, LoRAEmbedding, ModulesToSave, AdapterLayer) answers about its named
adapters: which one is active, whether adapters are enabled, whether any is merged into the base; and, for the
wrappers that stand in for a module (ModulesToSave, AdapterLayer), the attributes of the module they wrap."""

from __future__ import annotations


class NamedAdapters:
    """Mixin over `_active_adapter` (a name or None) and `_adapters_enabled`; `merged_adapters` where merging exists."""

    _active_adapter: str | None
    _adapters_enabled: bool

    @property
    def active_adapter(self) -> str | None:
        """The adapter forward applies; None when none is (the module computes its base alone)."""
        return self._active_adapter

    @property
    def adapters_enabled(self) -> bool:
        return self._adapters_enabled

    @property
    def merged(self) -> bool:
        return bool(getattr(self, "merged_adapters", ()))

    def enable_adapters(self) -> None:
        self._adapters_enabled = True


class ForwardsAttributes:
    """Mixin for a wrapper standing in for a module: an attribute the wrapper lacks (weight, in_features, ...) is the
    wrapped module's, as PEFT's wrappers answer them, so code that inspects the module keeps working. `_OWNER` names
    the child that must exist first (while the wrapper is being built nothing is forwarded)."""

    _OWNER: str

    def _attribute_owner(self):
        return self.__dict__["_modules"][self._OWNER]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if self._OWNER not in self.__dict__.get("_modules", {}):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(self._attribute_owner(), name)
