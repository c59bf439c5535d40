"""What every adapter-holding module (LoRALinear, LoRAEmbedding, ModulesToSave, AdapterLayer) answers about its named
adapters: which one is active, whether adapters are enabled, whether any is merged into the base."""

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
