"""patch_model / unpatch_model: swap our fused ops into a loaded HF transformers model, in place.

Modules are recognised by what they are and what they compute, not by architecture name:
- an RMSNorm-like module: a 1-D `weight`, an epsilon (`variance_epsilon` or `eps`), no other
  parameters or children. A copy with a random weight is run on a bf16 probe and compared with
  each casting setting (llama / gemma order, offset 0 / 1); the one that reproduces it is used.
- a gated MLP: `gate_proj`, `up_proj`, `down_proj` and an activation (`act_fn`) that computes SiLU;
  the swap is checked on a probe input before it is kept.
- RoPE: a module-level `apply_rotary_pos_emb` in the Python module that defines one of the model's
  classes, probed against our rotate_half and GPT-J interleaved layouts and for its output dtype (some
  cast q/k back to their input dtype, others keep torch's promotion). Where the attention looks it up:
  * transformers 5.x with the `kernels` package wraps the function in a kernels `Func` module and gives
    each attention module a private copy (`_kernel_funcs`) that the global one dispatches to while that
    attention runs. Those private copies get our forward: only this model changes, and it pickles.
  * otherwise (older transformers, no `kernels`, modeling files without the decorator) the attention
    calls the global function by name, so the global is replaced. That affects every model using the
    modeling file, so global replacements are reference-counted: the original returns when the last
    model is unpatched.
- attention: where the model's config asks for transformers' "sdpa", it asks for "pyfastpeft" instead, an attention
  function registered with transformers' AttentionInterface (and sdpa's mask function under the same name, so the
  masks are sdpa's). It runs our attention op where that computes what sdpa would: CPU tensors, no mask (sdpa's
  mask function leaves none for a batch without padding), no dropout, no softcap, sliding window or sinks, one head
  dim. Anything else goes to sdpa itself, on the same arguments.
Whatever looks like one of these but does not match is listed in the report, with the reason.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
import types
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyfastpeft.nn import RMSNorm, SwiGLUMLP
from pyfastpeft.ops.attention import scaled_dot_product_attention
from pyfastpeft.ops.rmsnorm import rms_norm
from pyfastpeft.ops.rope import apply_rotary_pos_emb as fused_apply_rotary_pos_emb

# Candidate RMSNorm settings, most common first: (casting_mode, offset).
_NORM_SETTINGS = (("llama", 0.0), ("gemma", 1.0), ("gemma", 0.0), ("llama", 1.0), ("none", 0.0))
_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
_ACT_NAMES = ("act_fn", "activation_fn", "act")
_STATE_ATTR = "_pyfastpeft_patch"

# modeling module name -> [original apply_rotary_pos_emb, number of patched models using it]
_ROPE_PATCHES: dict[str, list] = {}


@dataclass
class PatchReport:
    """What patch_model replaced (module paths / modeling modules) and what it left, with reasons."""

    rms_norm: list[str] = field(default_factory=list)
    swiglu: list[str] = field(default_factory=list)
    rope: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)  # the configs (class names) switched from sdpa to ours
    not_patched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what else patch_model changed on the model, and why

    @property
    def total(self) -> int:
        return len(self.rms_norm) + len(self.swiglu) + len(self.rope) + len(self.attention)

    def __str__(self) -> str:
        lines = [
            f"pyfastpeft.patch_model: {len(self.rms_norm)} RMSNorm, {len(self.swiglu)} SwiGLU MLP, "
            f"{len(self.rope)} RoPE function(s) replaced, attention in {len(self.attention)} config(s)"
        ]
        lines += [f"  not patched: {reason}" for reason in self.not_patched]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class FusedRope:
    """A drop-in for one HF apply_rotary_pos_emb: the fused op with the original's layout (rotate_half or GPT-J
    interleaved), its argument order (older transformers put position_ids before unsqueeze_dim) and its
    output dtype (OLMo2's casts q/k back to their input dtype; Llama's keeps the promotion q * cos gives).
    A module-level class with plain fields, so a model holding one pickles."""

    interleaved: bool = False
    cast_to_input_dtype: bool = False
    takes_position_ids: bool = False

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        if self.takes_position_ids:
            return self._apply(q, k, cos, sin, *args, **kwargs)
        return self._apply(q, k, cos, sin, None, *args, **kwargs)

    def _apply(self, q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        q_embed, k_embed = fused_apply_rotary_pos_emb(
            q, k, cos, sin, unsqueeze_dim, position_ids=position_ids, interleaved=self.interleaved
        )
        if self.cast_to_input_dtype:
            return q_embed.to(q.dtype), k_embed.to(k.dtype)
        return q_embed, k_embed


@dataclass(frozen=True)
class _RopeForward:
    """FusedRope as the forward of a kernels `Func` wrapper module, which calls it with the module first."""

    rope: FusedRope

    def __call__(self, module, *args, **kwargs):
        return self.rope(*args, **kwargs)


def _acquire_global_rope(name: str, replacement: FusedRope) -> None:
    if name in _ROPE_PATCHES:
        _ROPE_PATCHES[name][1] += 1
    else:
        modeling = sys.modules[name]
        _ROPE_PATCHES[name] = [modeling.apply_rotary_pos_emb, 1]
        modeling.apply_rotary_pos_emb = replacement


def _release_global_rope(name: str) -> None:
    entry = _ROPE_PATCHES[name]
    entry[1] -= 1
    if entry[1] == 0:
        sys.modules[name].apply_rotary_pos_emb = entry[0]
        del _ROPE_PATCHES[name]


@dataclass
class _PatchState:
    modules: list = field(default_factory=list)  # (parent, attribute name, original module)
    global_ropes: list = field(default_factory=list)  # (modeling module name, FusedRope put there)
    rope_wrappers: list = field(default_factory=list)  # (kernels Func wrapper, its own forward before, or None)
    hub_kernels_turned_off: bool = False  # the model's use_kernels, True before patch_model turned it off
    attention_configs: list = field(default_factory=list)  # configs whose "sdpa" patch_model made ours
    report: PatchReport = field(default_factory=PatchReport)

    # Runs once, when unpatch_model asks or when this state (its model) is garbage-collected: a patched model
    # deleted without unpatch_model must not leave the modeling modules' RoPE replaced for every later model.
    releaser: weakref.finalize | None = field(default=None, repr=False, compare=False)

    def hold_global_ropes(self) -> None:
        if self.releaser is None and self.global_ropes:
            self.releaser = weakref.finalize(self, _release_global_ropes, [name for name, _ in self.global_ropes])

    def release_global_ropes(self) -> None:
        if self.releaser is not None:
            self.releaser()

    def __getstate__(self):
        return {**self.__dict__, "releaser": None}

    def __setstate__(self, state):
        # a copy or an unpickled model uses the replaced global functions too: count it as a user
        self.__dict__.update(state)
        if self.attention_configs:
            register_attention()
        for name, replacement in self.global_ropes:
            importlib.import_module(name)
            _acquire_global_rope(name, replacement)
        self.hold_global_ropes()


def _release_global_ropes(names: list[str]) -> None:
    for name in names:
        _release_global_rope(name)


def _param_device_dtype(module: nn.Module):
    """Device and dtype of module's first floating-point parameter (quantized layers also hold int8/uint8 ones)."""
    p = next((p for p in module.parameters() if p.dtype.is_floating_point), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _norm_setting(module: nn.Module):
    """(casting_mode, offset, eps) reproducing `module`, or (None, reason)."""
    eps_name = next((n for n in _EPS_NAMES if isinstance(getattr(module, n, None), (float, int))), None)
    weight = getattr(module, "weight", None)
    if eps_name is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None, "no 1-D weight and epsilon"
    eps = float(getattr(module, eps_name))
    probe = copy.deepcopy(module)
    with torch.no_grad():
        probe.weight.copy_(torch.randn_like(probe.weight) * 0.5 + 1.0)
        x = torch.randn(4, weight.shape[0], device=weight.device).to(torch.bfloat16) * 3
        try:
            expected = probe(x)
        except Exception as exc:  # a norm that cannot run on this probe is not ours to replace
            return None, f"probe forward failed ({type(exc).__name__}: {exc})"
        best = None
        for mode, offset in _NORM_SETTINGS:
            got = rms_norm(x, probe.weight, eps, offset, mode)
            if got.dtype != expected.dtype:
                continue
            err = (got.float() - expected.float()).abs().max().item()
            if best is None or err < best[0]:
                best = (err, mode, offset)
    tolerance = 2**-7 * max(1.0, expected.float().abs().max().item())
    if best is None or not best[0] <= tolerance:
        return None, "its output matches no RMSNorm casting order (llama/gemma, offset 0/1)"
    return (best[1], best[2], eps), None


def _is_norm_like(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return (
        set(params) == {"weight"}
        and not list(module.children())
        and params["weight"].dim() == 1
        and any(hasattr(module, n) for n in _EPS_NAMES)
    )


def _silu_activation(module: nn.Module):
    act = next((getattr(module, n) for n in _ACT_NAMES if callable(getattr(module, n, None))), None)
    if act is None:
        return False, "no activation attribute (act_fn)"
    x = torch.linspace(-6, 6, 97)
    try:
        same = torch.allclose(act(x), F.silu(x), atol=1e-6)
    except Exception as exc:
        return False, f"activation probe failed ({type(exc).__name__})"
    return same, None if same else f"activation is not SiLU ({type(act).__name__})"


def _swap_mlp(module: nn.Module):
    """Our SwiGLUMLP around module's projections if it computes the same thing; else (None, reason)."""
    ok, reason = _silu_activation(module)
    if not ok:
        return None, reason
    fused = SwiGLUMLP.from_projections(module.gate_proj, module.up_proj, module.down_proj)
    device, dtype = _param_device_dtype(module)
    in_features = getattr(module.gate_proj, "in_features", None)
    if in_features is None:
        return None, "gate_proj has no in_features"
    was_training = module.training
    module.eval()  # LoRA dropout inside the projections would draw different masks for the two calls
    try:
        with torch.no_grad():
            x = torch.randn(2, in_features, device=device, dtype=dtype)
            expected, got = module(x), fused(x)
    finally:
        module.train(was_training)
    if not torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.float().abs().max().item()):
        return None, "its forward is not down_proj(silu(gate_proj(x)) * up_proj(x))"
    return fused, None


def _rope_signature(original) -> list[str]:
    """Parameter names of an HF apply_rotary_pos_emb, seen through wrappers: functools.wraps (`__wrapped__`) and
    the kernels `Func` module (an nn.Module whose forward carries the function's signature)."""
    target = original.forward if isinstance(original, nn.Module) else inspect.unwrap(original)
    return list(inspect.signature(target).parameters)


def _rope_replacement(original):
    """A FusedRope matching `original` (an HF apply_rotary_pos_emb) in layout and output dtypes; else (None, reason)."""
    params = _rope_signature(original)
    if params[:4] != ["q", "k", "cos", "sin"] or params[4:] not in (
        ["unsqueeze_dim"],
        ["position_ids", "unsqueeze_dim"],
    ):
        return None, f"unrecognised signature {params}"
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=gen), torch.randn(1, 2, 3, 8, generator=gen)
    cos, sin = torch.randn(1, 3, 8, generator=gen), torch.randn(1, 3, 8, generator=gen)
    try:
        expected = original(q, k, cos, sin)
        # bf16 q/k with fp32 tables (what most rotary embeddings hand over): does it cast back to q's dtype?
        expected_mixed = original(q.bfloat16(), k.bfloat16(), cos, sin)
    except Exception as exc:
        return None, f"probe call failed ({type(exc).__name__}: {exc})"
    for interleaved in (False, True):
        got = fused_apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved)
        if all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected)):
            break
    else:
        return None, "its rotation matches neither rotate_half nor the GPT-J interleaved layout"
    expected_dtypes = [t.dtype for t in expected_mixed]
    if expected_dtypes == [torch.bfloat16, torch.bfloat16]:
        cast = True
    elif expected_dtypes == [torch.float32, torch.float32]:
        cast = False
    else:
        return None, f"bf16 q/k with fp32 cos/sin give {expected_dtypes}, neither the input nor the promoted dtype"
    replacement = FusedRope(
        interleaved=interleaved, cast_to_input_dtype=cast, takes_position_ids="position_ids" in params
    )
    got_mixed = replacement(q.bfloat16(), k.bfloat16(), cos, sin)
    if not all(
        a.dtype == b.dtype and torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
        for a, b in zip(got_mixed, expected_mixed)
    ):
        return None, "its result on bf16 q/k with fp32 cos/sin differs from the fused one"
    return replacement, None


def _modeling_modules(model: nn.Module) -> list[str]:
    names = []
    for module in model.modules():
        name = type(module).__module__
        if (
            name not in names
            and name.startswith("transformers.")
            and hasattr(sys.modules.get(name), "apply_rotary_pos_emb")
        ):
            names.append(name)
    return names


def _private_rope_wrappers(model: nn.Module, original) -> list[nn.Module]:
    """The attention modules' private copies of a kernels-wrapped `original` (transformers 5.x with `kernels`)."""
    if not isinstance(original, nn.Module):
        return []
    return [
        wrapper
        for module in model.modules()
        for wrapper in (module.__dict__.get("_kernel_funcs") or {}).values()
        if type(wrapper) is type(original)
    ]


def _patch_rope(model: nn.Module, state: _PatchState) -> None:
    names = _modeling_modules(model)
    if not names:
        state.report.not_patched.append("rope: no module-level apply_rotary_pos_emb in the model's modeling files")
    for name in names:
        modeling = sys.modules[name]
        if name in _ROPE_PATCHES:  # already replaced globally for another model
            state.global_ropes.append((name, modeling.apply_rotary_pos_emb))
            _acquire_global_rope(name, modeling.apply_rotary_pos_emb)
            state.report.rope.append(name)
            continue
        replacement, reason = _rope_replacement(modeling.apply_rotary_pos_emb)
        if replacement is None:
            state.report.not_patched.append(f"rope ({name}.apply_rotary_pos_emb): {reason}")
            continue
        wrappers = _private_rope_wrappers(model, modeling.apply_rotary_pos_emb)
        if wrappers:
            for wrapper in wrappers:
                state.rope_wrappers.append((wrapper, wrapper.__dict__.get("forward")))
                wrapper.forward = types.MethodType(_RopeForward(replacement), wrapper)
        else:
            state.global_ropes.append((name, replacement))
            _acquire_global_rope(name, replacement)
        state.report.rope.append(name)


# ---- attention ------------------------------------------------------------------------------------------------
ATTENTION_NAME = "pyfastpeft"


def _attention_fallback_reason(query, key, value, attention_mask, dropout, kwargs) -> str | None:
    """Why our attention op would not compute what transformers' sdpa_attention_forward computes here, or None."""
    if query.device.type != "cpu":
        return "not on the CPU (torch's SDPA is flash attention there)"
    if attention_mask is not None:
        return "a mask (padding, or a pattern sdpa's mask function did not reduce to is_causal)"
    if dropout:
        return "attention dropout"
    for name in ("softcap", "sliding_window", "position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return name
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if not (query.dim() == key.dim() == value.dim() == 4):
        return "not [B, H, S, D]"
    if not (query.shape[-1] == key.shape[-1] == value.shape[-1]) or key.shape != value.shape:
        return "head dims differ"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return "query heads not a multiple of key/value heads"
    if not (query.dtype == key.dtype == value.dtype) and not torch.is_autocast_enabled(query.device.type):
        return "q, k, v of different dtypes"
    return None


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention interface (sdpa_attention_forward's signature and result: attn_output [B, S, H, D],
    None): pyfastpeft's attention op where it computes what sdpa would (see _attention_fallback_reason), sdpa's
    own function on the same arguments elsewhere. is_causal as sdpa takes it: the argument, else the module's
    is_causal, and only for more than one query."""
    if _attention_fallback_reason(query, key, value, attention_mask, dropout, kwargs) is not None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = scaled_dot_product_attention(query, key, value, is_causal=bool(query.shape[2] > 1 and causal), scale=scaling)
    return out.transpose(1, 2).contiguous(), None  # no copy when out took query's [B, S, H, D] layout


def register_attention() -> bool:
    """Register ATTENTION_NAME with transformers' attention and mask interfaces (the masks sdpa's); False where
    this transformers has neither."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    except ImportError:
        return False
    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, attention_forward)
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return True


def _set_attn_implementation(config, value: str) -> None:
    """config's attention implementation, and not its sub-configs' (the public setter sets theirs too)."""
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = value
    else:
        config._attn_implementation = value


def _patch_attention(model: nn.Module, state: _PatchState) -> None:
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) is not None:
            configs[id(config)] = config
    sdpa = [config for config in configs.values() if config._attn_implementation == "sdpa"]
    if not sdpa:
        found = sorted({str(config._attn_implementation) for config in configs.values()})
        state.report.not_patched.append(f"attention: no config asks for sdpa (found {found or 'none'})")
        return
    if not register_attention():
        state.report.not_patched.append("attention: this transformers has no AttentionInterface")
        return
    for config in sdpa:
        _set_attn_implementation(config, ATTENTION_NAME)
        state.attention_configs.append(config)
        state.report.attention.append(type(config).__name__)


def patch_model(
    model: nn.Module, rms_norm: bool = True, swiglu: bool = True, rope: bool = True, attention: bool = True
) -> PatchReport:
    """Swap pyfastpeft's RMSNorm, SwiGLU MLP, RoPE and attention into `model` in place; returns a PatchReport.

    Parameters are shared, not copied (optimizers and tied weights keep working). What could not be
    patched is listed in the report and warned about; `unpatch_model(model)` restores the originals.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, _STATE_ATTR):
        raise RuntimeError("patch_model: this model is already patched; call unpatch_model(model) first")
    state = _PatchState()
    report = state.report
    candidates = {"rms_norm": 0, "swiglu": 0}
    for path, module in list(model.named_modules()):
        if not path or isinstance(module, (RMSNorm, SwiGLUMLP)):
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        replacement = None
        if rms_norm and _is_norm_like(module):
            candidates["rms_norm"] += 1
            setting, reason = _norm_setting(module)
            if setting is None:
                report.not_patched.append(f"{path} ({type(module).__name__}): {reason}")
                continue
            mode, offset, eps = setting
            replacement = RMSNorm(module.weight.shape[0], eps=eps, offset=offset, casting_mode=mode, device="meta")
            replacement.weight = module.weight
            report.rms_norm.append(path)
        elif swiglu and all(
            isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")
        ):
            candidates["swiglu"] += 1
            replacement, reason = _swap_mlp(module)
            if replacement is None:
                report.not_patched.append(f"{path} ({type(module).__name__}): {reason}")
                continue
            report.swiglu.append(path)
        if replacement is not None:
            replacement.train(module.training)
            setattr(parent, attr, replacement)
            state.modules.append((parent, attr, module))
    if rope:
        if getattr(model, "use_kernels", False) is True and callable(getattr(model, "set_use_kernels", None)):
            # With hub kernels on (from_pretrained's default when `kernels` is installed), every train() /
            # eval() re-kernelizes the model and strips the RoPE forward patched onto its attention modules'
            # kernel wrappers: the fused RoPE would silently stop running at Trainer's first step. Our kernels
            # replace the hub's for what we patch; unpatch_model turns them back on.
            model.set_use_kernels(False)
            state.hub_kernels_turned_off = True
            state.report.notes.append(
                "hub kernels (use_kernels) are off while the model is patched: its "
                "train()/eval() would otherwise undo the fused RoPE"
            )
        _patch_rope(model, state)
    if attention:
        _patch_attention(model, state)
    # A kind with no candidate at all gets one line; candidates that did not match have their own.
    if rms_norm and not candidates["rms_norm"]:
        report.not_patched.append("rms_norm: no RMSNorm-like module found")
    if swiglu and not candidates["swiglu"]:
        report.not_patched.append("swiglu: no gated SiLU MLP (gate_proj/up_proj/down_proj) found")
    state.hold_global_ropes()
    object.__setattr__(model, _STATE_ATTR, state)
    if report.not_patched:
        warnings.warn(str(report), UserWarning, stacklevel=2)
    return report


def unpatch_model(model: nn.Module) -> None:
    """Undo patch_model(model): original modules back in place, RoPE functions restored when unused. (A patched
    model that is deleted instead stops using them when it is garbage-collected.)"""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("unpatch_model: this model was not patched by pyfastpeft.patch_model")
    for parent, attr, original in reversed(state.modules):
        setattr(parent, attr, original)
    for wrapper, previous_forward in state.rope_wrappers:
        if previous_forward is None:
            del wrapper.forward
        else:
            wrapper.forward = previous_forward
    state.release_global_ropes()
    for config in state.attention_configs:
        if config._attn_implementation == ATTENTION_NAME:  # unless someone chose another since
            _set_attn_implementation(config, "sdpa")
    object.__delattr__(model, _STATE_ATTR)
    if state.hub_kernels_turned_off:
        model.set_use_kernels(True)
