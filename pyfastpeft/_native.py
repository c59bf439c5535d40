"""Loading of the native modules and the helpers every op uses to hand tensors to them.

A missing or broken native module never makes `import pyfastpeft` fail: `cpu` / `cuda` are None,
`cpu_error` / `cuda_error` say why, and the ops fall back to the reference (warning once). A `_cuda` whose
CUDA runtime is newer than the host's driver supports counts as missing (cuda_unusable), with one warning.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import torch  # torch first: _C reuses the OpenMP runtime torch has loaded

# dtype codes shared with csrc/cpu/common.h and csrc/cuda/common.cuh.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

cpu = None
cpu_error: str | None = None
try:
    cpu = importlib.import_module("pyfastpeft._C")
except Exception as exc:  # ImportError, or an OSError from a broken build
    cpu_error = f"{type(exc).__name__}: {exc}"
    if (Path(__file__).resolve().parent.parent / "setup.py").exists():
        cpu_error += (
            f" -- pyfastpeft was imported from its source tree ({Path(__file__).resolve().parent}), "
            "which holds no built modules: run from another directory, or pip install -e ."
        )


def _cuda_version(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def cuda_unusable(module) -> str | None:
    """Why a loaded pyfastpeft._cuda cannot run on this host's driver, or None.

    The module links the CUDA runtime of the toolkit that built it statically, and a runtime of CUDA major X
    needs a driver that supports CUDA X (minor-version compatibility holds within a major only): a CUDA 13 build
    on a CUDA 12 driver would fail every launch with "insufficient driver". No driver at all is not a reason:
    torch then sees no GPU either, and no CUDA tensor reaches the module.
    """
    versions = getattr(module, "cuda_versions", None)
    if versions is None:  # a build older than the probe
        return None
    driver, runtime = versions()
    if driver and driver // 1000 < runtime // 1000:
        return (
            f"built with CUDA {_cuda_version(runtime)}, whose runtime needs a driver for CUDA "
            f"{runtime // 1000}.x; this host's driver supports CUDA {_cuda_version(driver)}"
        )
    return None


def _load_cuda(import_module=importlib.import_module):
    """(pyfastpeft._cuda, None), or (None, why) for a module that is missing, fails to load or cannot run here;
    the last warns once, since a built module is expected to work."""
    try:
        module = import_module("pyfastpeft._cuda")
    except ModuleNotFoundError:
        return None, "built without nvcc"
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    why = cuda_unusable(module)
    if why is not None:
        warnings.warn(
            f"pyfastpeft: the native CUDA kernels (pyfastpeft._cuda) cannot run here ({why}); CUDA ops "
            "run the Triton kernels or the PyTorch reference instead. Rebuild pyfastpeft with a CUDA "
            "toolkit of the driver's major version to use them.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None, why
    return module, None


cuda, cuda_error = _load_cuda()

_warned: set[str] = set()


def warn_fallback(what: str, reason: str) -> None:
    """One warning per (what, reason) for the life of the process."""
    key = f"{what}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"pyfastpeft: {what} unavailable ({reason}); running the PyTorch reference instead",
            RuntimeWarning,
            stacklevel=3,
        )


HUGE_PAGE_MIN_BYTES = 4 << 20


def on_huge_pages(out: torch.Tensor) -> torch.Tensor:
    """Advise a freshly allocated, untouched large CPU tensor onto 2 MiB pages; returns it.
    (advise_huge_pages in csrc/bind_cpu.cpp: it cuts the first-touch page-fault cost ~5x.)"""
    # the size from the shape first: a small tensor (a decode step's output) skips the storage object's cost
    if out.numel() * out.element_size() < HUGE_PAGE_MIN_BYTES or out.device.type != "cpu" or cpu is None:
        return out
    storage = out.untyped_storage()
    if storage.nbytes() >= HUGE_PAGE_MIN_BYTES:
        cpu.advise_huge_pages(storage.data_ptr(), storage.nbytes())
    return out


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return on_huge_pages(torch.empty(shape, dtype=dtype, device=device))


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    """The address a kernel reads; 0 stands for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def num_threads() -> int:
    return torch.get_num_threads()


def cuda_stream(t: torch.Tensor) -> int:
    """torch's current stream on t's device, as the integer the CUDA kernels take."""
    return torch.cuda.current_stream(t.device).cuda_stream


def _argument(arg):
    if arg is None or isinstance(arg, torch.Tensor):
        return ptr(arg)
    if isinstance(arg, torch.dtype):
        return DTYPE_CODES[arg]
    return arg


def launch(name: str, like: torch.Tensor, *args) -> None:
    """Run native kernel `name` for tensors on like's device: pyfastpeft._cuda's for CUDA tensors, else _C's.

    args are the kernel's parameters in the order of its C++ signature (the same on both modules, but for the
    trailing launch arguments this adds: nthreads on the CPU, (stream, device index) on CUDA). A tensor is
    passed as its address, None as 0 (an absent optional tensor), a torch.dtype as its code; anything else as is.
    """
    values = [_argument(arg) for arg in args]
    if like.is_cuda:
        getattr(cuda, name)(*values, cuda_stream(like), like.device.index)
    else:
        getattr(cpu, name)(*values, num_threads())
