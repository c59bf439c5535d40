"""patch_model / unpatch_model: swap our fused ops into a loaded HF transformers model, in place.

Modules are recognised by what they are and what they compute, not by architecture name:
- an RMSNorm-like module: a 1-D `weight`, an epsilon (`variance_epsilon` or `eps`), no other
  parameters or children. A copy with a random weight is run on a bf16 probe and compared with
  each casting setting (llama / gemma order, offset 0 / 1); the one that reproduces it is used.
- a gated MLP: `gate_proj`, `up_proj`, `down_proj` and an activation (`act_fn`) that computes SiLU;
  the swap is checked on a probe input before it is kept.
- RoPE: a module-level `apply_rotary_pos_emb` in the Python module that defines one of the model's
  classes (HF attention calls it by its global name), probed against our rotate_half and GPT-J
  interleaved layouts. Replacing a module-level function affects every model using that modeling
  file, so replacements are reference-counted: the original returns when the last model is unpatched.
Whatever looks like one of these but does not match is listed in the report, with the reason.
"""
from __future__ import annotations

import copy
import inspect
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyfastpeft.nn import RMSNorm, SwiGLUMLP
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
    not_patched: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.rms_norm) + len(self.swiglu) + len(self.rope)

    def __str__(self) -> str:
        lines = [f"pyfastpeft.patch_model: {len(self.rms_norm)} RMSNorm, {len(self.swiglu)} SwiGLU MLP, "
                 f"{len(self.rope)} RoPE function(s) replaced"]
        lines += [f"  not patched: {reason}" for reason in self.not_patched]
        return "\n".join(lines)


@dataclass
class _PatchState:
    modules: list = field(default_factory=list)  # (parent, attribute name, original module)
    rope_modules: list = field(default_factory=list)  # modeling module names
    report: PatchReport = field(default_factory=PatchReport)


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
    tolerance = 2 ** -7 * max(1.0, expected.float().abs().max().item())
    if best is None or not best[0] <= tolerance:
        return None, "its output matches no RMSNorm casting order (llama/gemma, offset 0/1)"
    return (best[1], best[2], eps), None


def _is_norm_like(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return (set(params) == {"weight"} and not list(module.children()) and params["weight"].dim() == 1
            and any(hasattr(module, n) for n in _EPS_NAMES))


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


def _rope_replacement(original):
    """A drop-in for `original` (an HF apply_rotary_pos_emb) if it matches a layout we fuse; else (None, reason)."""
    params = list(inspect.signature(original).parameters)
    if params[:4] != ["q", "k", "cos", "sin"] or params[4:] not in (["unsqueeze_dim"], ["position_ids", "unsqueeze_dim"]):
        return None, f"unrecognised signature {params}"
    takes_position_ids = "position_ids" in params
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=gen), torch.randn(1, 2, 3, 8, generator=gen)
    cos, sin = torch.randn(1, 3, 8, generator=gen), torch.randn(1, 3, 8, generator=gen)
    try:
        expected = original(q, k, cos, sin)
    except Exception as exc:
        return None, f"probe call failed ({type(exc).__name__}: {exc})"
    for interleaved in (False, True):
        got = fused_apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved)
        if all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected)):
            break
    else:
        return None, "its rotation matches neither rotate_half nor the GPT-J interleaved layout"

    if takes_position_ids:
        def replacement(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            return fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, position_ids=position_ids,
                                              interleaved=interleaved)
    elif interleaved:
        def replacement(q, k, cos, sin, unsqueeze_dim=1):
            return fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, interleaved=True)
    else:
        replacement = fused_apply_rotary_pos_emb
    return replacement, None


def _modeling_modules(model: nn.Module) -> list[str]:
    names = []
    for module in model.modules():
        name = type(module).__module__
        if name not in names and name.startswith("transformers.") and hasattr(sys.modules.get(name), "apply_rotary_pos_emb"):
            names.append(name)
    return names


def _patch_rope(model: nn.Module, state: _PatchState) -> None:
    names = _modeling_modules(model)
    if not names:
        state.report.not_patched.append("rope: no module-level apply_rotary_pos_emb in the model's modeling files")
    for name in names:
        modeling = sys.modules[name]
        if name in _ROPE_PATCHES:
            _ROPE_PATCHES[name][1] += 1
        else:
            replacement, reason = _rope_replacement(modeling.apply_rotary_pos_emb)
            if replacement is None:
                state.report.not_patched.append(f"rope ({name}.apply_rotary_pos_emb): {reason}")
                continue
            _ROPE_PATCHES[name] = [modeling.apply_rotary_pos_emb, 1]
            modeling.apply_rotary_pos_emb = replacement
        state.rope_modules.append(name)
        state.report.rope.append(name)


def patch_model(model: nn.Module, rms_norm: bool = True, swiglu: bool = True, rope: bool = True) -> PatchReport:
    """Swap pyfastpeft's RMSNorm, SwiGLU MLP and RoPE into `model` in place; returns a PatchReport.

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
            replacement = RMSNorm(module.weight.shape[0], eps=eps, offset=offset, casting_mode=mode,
                                  device="meta")
            replacement.weight = module.weight
            report.rms_norm.append(path)
        elif swiglu and all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
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
        _patch_rope(model, state)
    # A kind with no candidate at all gets one line; candidates that did not match have their own.
    if rms_norm and not candidates["rms_norm"]:
        report.not_patched.append("rms_norm: no RMSNorm-like module found")
    if swiglu and not candidates["swiglu"]:
        report.not_patched.append("swiglu: no gated SiLU MLP (gate_proj/up_proj/down_proj) found")
    object.__setattr__(model, _STATE_ATTR, state)
    if report.not_patched:
        warnings.warn(str(report), UserWarning, stacklevel=2)
    return report


def unpatch_model(model: nn.Module) -> None:
    """Undo patch_model(model): original modules back in place, RoPE functions restored when unused."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("unpatch_model: this model was not patched by pyfastpeft.patch_model")
    for parent, attr, original in reversed(state.modules):
        setattr(parent, attr, original)
    for name in state.rope_modules:
        entry = _ROPE_PATCHES[name]
        entry[1] -= 1
        if entry[1] == 0:
            sys.modules[name].apply_rotary_pos_emb = entry[0]
            del _ROPE_PATCHES[name]
    object.__delattr__(model, _STATE_ATTR)
