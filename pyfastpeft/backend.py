"""Which implementation runs an op: the single place that decides.

Backends: "reference" (pure PyTorch, every device), "native" (pyfastpeft._C on CPU,
pyfastpeft._cuda on CUDA), "triton" (pyfastpeft.triton_kernels; on CPU tensors it runs under the
interpreter, TRITON_INTERPRET=1, which tests use). "auto" (the default) picks native on CPU and the
measured-faster of native / Triton on CUDA (CUDA_PREFERENCE below, committed from benchmark results),
falling back to the reference when a backend is unavailable.

`PYFASTPEFT_BACKEND` sets the process default; `use_backend(...)` overrides it for a block, in the
calling thread (or asyncio task) only: the choice lives in a context variable, so threads whose blocks
overlap each keep their own backend, and a new thread starts on the process default. An autograd.Function
decorated with `carry_backend` records the block's backend at forward time and runs its backward under it,
wherever autograd runs that backward (CPU backward on the thread calling .backward(), CUDA backward on
autograd's device threads).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings

import torch

from pyfastpeft import _native

BACKENDS = ("auto", "reference", "native", "triton")

# Faster backend per op family on CUDA. Until GPU measurements are committed under bench/results/,
# native CUDA kernels are the default (they launch without Triton's JIT and Python overhead). For NF4 that
# is the fused dequant-GEMV up to 8 rows and, above, the CUDA dequantize feeding torch's GEMM (Triton's
# in-loop-dequantized GEMM is the alternative to measure against it); int8 likewise around torch._int_mm.
# LoRA's GPU kernel is Triton's; the general affine quantize family has no GPU kernel yet. Fused linear
# cross-entropy's row pass runs in Triton (Liger's design) until GPU measurements compare it with the CUDA
# row kernel, and distillation's likewise. Attention has no CUDA kernel of ours: on CUDA torch's own flash SDPA is
# what runs.
CUDA_PREFERENCE = {
    "rmsnorm": "native",
    "swiglu": "native",
    "rope": "native",
    "nf4": "native",
    "int8": "native",
    "lora": "triton",
    "quantize": "reference",
    "flce": "triton",
    "distill": "triton",
    "blockwise": "reference",
    "dora": "reference",
    "bottleneck": "reference",
    "attention": "reference",
}


def _default_backend() -> str:
    name = os.environ.get("PYFASTPEFT_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:  # a typo in the environment must not break `import pyfastpeft`
        warnings.warn(
            f"PYFASTPEFT_BACKEND must be one of {BACKENDS}, got {name!r}; using 'auto'", RuntimeWarning, stacklevel=2
        )
        return "auto"
    return name


_process_default = _default_backend()

# The backend of the innermost `use_backend` block of this thread / context; None outside every block.
_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("pyfastpeft_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops called inside the block on backend `name` ("auto", "reference", "native", "triton").
    Scoped to the calling thread (context): other threads keep their own choice or the process default.
    The backward of what the block builds runs on `name` too, for autograd.Functions marked
    `carry_backend`."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    token = _selected.set(name)
    try:
        yield
    finally:
        _selected.reset(token)


def current_backend() -> str:
    """The backend ops called here run on: the innermost `use_backend` block, else the process default."""
    selected = _selected.get()
    return _process_default if selected is None else selected


def carry_backend(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator for an autograd.Function whose forward and backward call pyfastpeft ops: forward
    records the `use_backend` block it runs in (none: nothing recorded) and backward runs under it, so the
    backward of tensors built in a block uses the block's backend even when autograd runs it on another
    thread or after the block has exited. Under torch.compile nothing is recorded (the ops choose at run
    time, in the thread that runs the compiled graph)."""
    forward, backward = function.forward, function.backward

    @functools.wraps(forward)
    def forward_recording_backend(ctx, *args, **kwargs):
        if not torch.compiler.is_compiling():
            ctx.pyfastpeft_backend = _selected.get()
        return forward(ctx, *args, **kwargs)

    @functools.wraps(backward)
    def backward_under_forward_backend(ctx, *grads):
        if torch.compiler.is_compiling():
            return backward(ctx, *grads)
        recorded = getattr(ctx, "pyfastpeft_backend", None)
        if recorded is None:
            return backward(ctx, *grads)
        with use_backend(recorded):
            return backward(ctx, *grads)

    function.forward = staticmethod(forward_recording_backend)
    function.backward = staticmethod(backward_under_forward_backend)
    return function


def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "GPU"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "CPU interpreter (TRITON_INTERPRET=1)"
    return False, "no GPU visible (set TRITON_INTERPRET=1 before importing triton to run the interpreter)"


def backends() -> dict:
    """What this install can run, and why not where it cannot."""
    cpu_ok = _native.cpu is not None
    cuda_built = _native.cuda is not None
    gpu = torch.cuda.is_available()
    triton_ok, triton_why = _triton_status()
    return {
        "reference": {"available": True, "detail": "pure PyTorch, every device"},
        "cpu_native": {
            "available": cpu_ok,
            "detail": f"pyfastpeft._C ({_native.cpu.current_isa()})"
            if cpu_ok
            else f"pyfastpeft._C failed to load: {_native.cpu_error}",
        },
        "cuda_native": {
            "available": cuda_built and gpu,
            "detail": (
                "pyfastpeft._cuda" if cuda_built and gpu else _native.cuda_error if not cuda_built else "no GPU visible"
            ),
        },
        "triton": {"available": triton_ok, "detail": triton_why},
    }


# Families with no native CUDA kernel: their native implementation is CPU-only, so forcing "native" on CUDA
# tensors runs the reference, with the fallback warning (LoRA's GPU kernel is Triton's; attention's GPU path is torch's
# own flash SDPA).
NO_CUDA_NATIVE = frozenset({"lora", "quantize", "blockwise", "dora", "bottleneck", "attention"})


def choose(family: str, device: torch.device) -> str:
    """The backend an op of `family` runs on for tensors on `device`: reference, native or triton."""
    wanted = current_backend()
    if wanted == "reference":
        return "reference"
    if device.type == "cpu":
        if wanted == "triton":
            return "triton" if _triton_usable(family) else "reference"
        if _native.cpu is None:
            _native.warn_fallback("pyfastpeft._C", _native.cpu_error or "not built")
            return "reference"
        return "native"
    if device.type == "cuda":
        if wanted == "auto":
            wanted = CUDA_PREFERENCE.get(family, "native")
            if wanted == "native" and _native.cuda is None:
                wanted = "triton"
        if wanted == "reference":
            return "reference"
        if wanted == "native":
            if _native.cuda is None:
                _native.warn_fallback("pyfastpeft._cuda", _native.cuda_error or "not built")
                return "reference"
            if family in NO_CUDA_NATIVE:
                _native.warn_fallback(f"a native CUDA kernel for {family}", "none is built; use_backend('triton')")
                return "reference"
            return "native"
        return "triton" if _triton_usable(family) else "reference"
    return "reference"


def _triton_usable(family: str) -> bool:
    ok, why = _triton_status()
    if not ok:
        _native.warn_fallback(f"triton kernels ({family})", why)
    return ok
