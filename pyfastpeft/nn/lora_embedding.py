"""LoRAEmbedding: PEFT's peft.tuners.lora.Embedding, LoRA on an input embedding (an nn.Embedding, e.g. embed_tokens).

    y = E[ids] + s * A^T[ids] B^T        A [r, num_embeddings], B [embedding_dim, r], s = alpha / r (rsLoRA: / sqrt r)

Names, shapes and init are PEFT's: lora_embedding_A[name] and lora_embedding_B[name] are bare parameters (state-dict
keys `...embed_tokens.lora_embedding_A.<adapter>`), A starts at zero and B normal, so a new adapter leaves the
embedding unchanged; no dropout (PEFT applies none to token ids). An embedding that scales its output (Gemma 3's
embed_scale) scales the adapter's part too, as PEFT does. The adapter's part is computed in the adapter's dtype and
the sum rounded once to the embedding's dtype. The gather and the rank-r product are a few percent of a model step:
they run in torch (F.embedding, one matmul), whose backward accumulates A's gradient by rows.

DoRA (use_dora=True), PEFT's DoraEmbeddingLayer: with m [embedding_dim] trained (lora_magnitude_vector[name].weight)
and the norm taken over the vocabulary, per embedding dimension, and detached,

    g = m / ||E + s (B A)^T||_col        y = g * (E[ids] + s * A^T[ids] B^T)

The norm (dora_embedding_norm) is accumulated over blocks of vocabulary rows in fp32: the [num_embeddings,
embedding_dim] sum PEFT builds each forward (a full copy of the embedding, in fp32) never exists.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from pyfastpeft.nn._adapters import NamedAdapters

_NORM_ROWS = 4096  # vocabulary rows per block of dora_embedding_norm: [4096, embedding_dim] fp32 at a time


def dora_embedding_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """||E + s (B A)^T|| over the vocabulary for each embedding dimension, fp32 [embedding_dim], no gradient.
    weight E [V, D], lora_A [r, V], lora_B [D, r]."""
    with torch.no_grad():
        lora_B_t = lora_B.detach().float().t()  # [r, D]
        total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
        for start in range(0, weight.shape[0], _NORM_ROWS):
            rows = weight[start : start + _NORM_ROWS].detach().float()
            rows = rows.addmm(lora_A[:, start : start + _NORM_ROWS].detach().float().t(), lora_B_t, alpha=scaling)
            total += rows.square().sum(0)
        return total.sqrt()


class LoRAEmbedding(NamedAdapters, nn.Module):
    """A frozen nn.Embedding plus named LoRA adapters (one active); only the active adapter's A and B train."""

    def __init__(
        self,
        base: nn.Embedding,
        r: int = 8,
        lora_alpha: float = 16,
        use_rslora: bool = False,
        adapter_name: str = "default",
        init_lora_weights: bool = True,
        use_dora: bool = False,
    ):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding: base must be an nn.Embedding, got {type(base).__name__}")
        if not base.weight.dtype.is_floating_point:
            raise TypeError(f"LoRAEmbedding: base's weight must be floating point, got {base.weight.dtype}")
        self.base_layer = base
        base.requires_grad_(False)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.use_dora: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA's m per adapter that has one
        self._merged_norms: dict[str, torch.Tensor] = {}  # DoRA's norm at merge time, which unmerge divides by
        self.merged_adapters: list[str] = []
        self._adapters_enabled = True
        self._active_adapter: str | None = adapter_name
        self.add_adapter(adapter_name, r, lora_alpha, use_rslora, init_lora_weights, use_dora)
        self.set_adapter(adapter_name)

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The base embedding's weight (transformers ties and resizes through it)."""
        return self.base_layer.weight

    def add_adapter(
        self,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 16,
        use_rslora: bool = False,
        init_lora_weights: bool = True,
        use_dora: bool = False,
    ) -> None:
        """Add a named adapter (not activated; set_adapter does that). With use_dora its magnitude starts at the norm of
        E + s (B A)^T, so the new adapter computes what plain LoRA would."""
        from pyfastpeft.nn.lora import _check_adapter_name, _check_alpha, _check_bool, _check_rank

        fn = "LoRAEmbedding.add_adapter"
        adapter_name = _check_adapter_name(fn, adapter_name)
        if adapter_name in self.lora_embedding_A:
            raise ValueError(f"{fn}: adapter {adapter_name!r} already exists")
        r = _check_rank(fn, r)
        lora_alpha = _check_alpha(fn, lora_alpha)
        _check_bool(fn, "use_rslora", use_rslora)
        _check_bool(fn, "init_lora_weights", init_lora_weights)
        _check_bool(fn, "use_dora", use_dora)
        weight = self.base_layer.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32 over half-precision bases, as PEFT's models
        lora_A = torch.randn(r, self.num_embeddings, device=weight.device, dtype=dtype)
        lora_B = torch.randn(self.embedding_dim, r, device=weight.device, dtype=dtype)
        if init_lora_weights:  # PEFT's init for embeddings: A zero, B normal
            nn.init.zeros_(lora_A)
            nn.init.normal_(lora_B)
        trains = adapter_name == self._active_adapter
        self.lora_embedding_A[adapter_name] = nn.Parameter(lora_A, requires_grad=trains)
        self.lora_embedding_B[adapter_name] = nn.Parameter(lora_B, requires_grad=trains)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = use_dora
        if use_dora:
            from pyfastpeft.nn.lora import DoRAMagnitude

            norm = dora_embedding_norm(weight, lora_A, lora_B, self.scaling[adapter_name])
            self.lora_magnitude_vector[adapter_name] = DoRAMagnitude(norm.to(dtype))
            self.lora_magnitude_vector[adapter_name].requires_grad_(trains)

    def set_adapter(self, adapter_name: str | None) -> None:
        if adapter_name is not None and adapter_name not in self.lora_embedding_A:
            raise ValueError(
                f"LoRAEmbedding.set_adapter: unknown adapter {adapter_name!r}; this layer has "
                f"{list(self.lora_embedding_A)}"
            )
        if self.merged and adapter_name != self._active_adapter:
            warnings.warn("LoRAEmbedding.set_adapter: the layer is merged; unmerging it first", stacklevel=2)
            self.unmerge()
        self._active_adapter = adapter_name
        for name in self.lora_embedding_A:
            self.lora_embedding_A[name].requires_grad_(name == adapter_name)
            self.lora_embedding_B[name].requires_grad_(name == adapter_name)
        for name, magnitude in self.lora_magnitude_vector.items():
            magnitude.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        fn = "LoRAEmbedding.delete_adapter"
        if adapter_name not in self.lora_embedding_A:
            raise ValueError(f"{fn}: unknown adapter {adapter_name!r}")
        if len(self.lora_embedding_A) == 1:
            raise ValueError(f"{fn}: {adapter_name!r} is the only adapter; use the base_layer instead")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"{fn}: adapter {adapter_name!r} is merged into the base; unmerge() first")
        for table in (self.lora_embedding_A, self.lora_embedding_B, self.r, self.lora_alpha, self.scaling):
            del table[adapter_name]
        del self.use_rslora[adapter_name]
        del self.use_dora[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if adapter_name == self._active_adapter:
            self.set_adapter(next(iter(self.lora_embedding_A)))

    def disable_adapters(self) -> None:
        if self.merged:
            self.unmerge()
        self._adapters_enabled = False

    def _delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s * (B A)^T in fp32, [num_embeddings, embedding_dim]."""
        lora_A = self.lora_embedding_A[adapter_name].detach().float()
        lora_B = self.lora_embedding_B[adapter_name].detach().float()
        return (lora_B @ lora_A).t() * self.scaling[adapter_name]

    def _dora_scale(self, adapter_name: str) -> torch.Tensor:
        """g = m / ||E + s (B A)^T||_col, fp32 [embedding_dim]; the norm from the unmerged E, detached."""
        norm = dora_embedding_norm(
            self.base_layer.weight,
            self.lora_embedding_A[adapter_name],
            self.lora_embedding_B[adapter_name],
            self.scaling[adapter_name],
        )
        return self.lora_magnitude_vector[adapter_name].weight.float() / norm, norm

    def merge(self) -> None:
        """E <- E + s (B A)^T for the active adapter (DoRA: E <- g * (E + s (B A)^T), the norm kept for unmerge), in
        fp32, rounded once to E's dtype."""
        name = self._active_adapter
        if not self._adapters_enabled or name is None:
            raise ValueError("LoRAEmbedding.merge: no adapter is active and enabled")
        if name in self.merged_adapters:
            warnings.warn(f"LoRAEmbedding.merge: adapter {name!r} is already merged", stacklevel=2)
            return
        if self.use_dora[name] and self.merged_adapters:
            raise ValueError("LoRAEmbedding.merge: a DoRA adapter merges into the unmerged embedding; unmerge() first")
        with torch.no_grad():
            weight = self.base_layer.weight
            merged = weight.float() + self._delta_weight(name)
            if self.use_dora[name]:
                scale, norm = self._dora_scale(name)
                merged *= scale
                self._merged_norms[name] = norm
            weight.copy_(merged)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("LoRAEmbedding.unmerge: nothing is merged", stacklevel=2)
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            merged = weight.float()
            for name in reversed(self.merged_adapters):
                if self.use_dora[name]:
                    norm = self._merged_norms.pop(name)
                    merged /= self.lora_magnitude_vector[name].weight.detach().float() / norm
                merged -= self._delta_weight(name)
            weight.copy_(merged)
        self.merged_adapters.clear()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        y = base(ids)
        name = self._active_adapter
        if not self._adapters_enabled or self.merged_adapters or name is None:
            return y
        lora_A, lora_B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        rows = F.embedding(
            ids, lora_A.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        adapter = (rows @ lora_B.t()) * self.scaling[name]
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is not None:
            adapter = adapter * (embed_scale.to(adapter.dtype) if torch.is_tensor(embed_scale) else embed_scale)
        if self.use_dora[name]:  # PEFT's order: g * E[ids] + g * (the adapter's part), in fp32
            norm = dora_embedding_norm(base.weight, lora_A, lora_B, self.scaling[name])
            scale = self.lora_magnitude_vector[name].weight / norm
            return (scale * y + scale * adapter).to(y.dtype)
        return (y + adapter).to(y.dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_embedding_A)}, active_adapter={self._active_adapter!r}"
