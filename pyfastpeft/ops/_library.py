"""Definition of pyfastpeft's torch.library ops, shared by every family file in this package.

Each op gets: a schema, a fake impl (shapes only, checked with torch._check), the reference as the
kernel for every device ("default"), and on CPU and CUDA a kernel that asks pyfastpeft.backend which
implementation to run. So torch.compile traces through the op, opcheck passes, and the backend
choice happens at run time, outside the graph.
"""

from __future__ import annotations

from typing import Callable

import torch

from pyfastpeft.backend import choose
from pyfastpeft.ops._checks import check_op_devices

LIBRARY = torch.library.Library("pyfastpeft", "DEF")


def _without_graph(kernel: Callable) -> Callable:
    """An op kernel whose torch ops never record a graph of their own, as when the op is called directly on
    tensors that require grad (the native kernels' outputs never do; the reference and the fallbacks to it would)."""

    def run(*args):
        if torch.is_grad_enabled():
            with torch.no_grad():
                return kernel(*args)
        return kernel(*args)

    return run


def _without_autocast(qualname: str, device_type: str):
    def kernel(*args):
        op = getattr(torch.ops.pyfastpeft, qualname.split("::")[1])
        with torch.autocast(device_type, enabled=False):
            return op(*args)

    return kernel


def _argument_names(schema: str) -> list[str]:
    """The argument names of "(Tensor x, float eps, ...) -> ...", in order."""
    arguments = schema[schema.index("(") + 1 : schema.index(") ->")]
    return [argument.split()[-1].split("=")[0] for argument in arguments.split(",")]


def define_op(
    name: str,
    schema: str,
    *,
    family: str,
    fake: Callable,
    reference: Callable,
    native: Callable,
    triton: Callable,
    triton_dtypes=(torch.float32, torch.float16, torch.bfloat16),
    check: Callable | None = None,
):
    """Define pyfastpeft::<name><schema>; returns the op (torch.ops.pyfastpeft.<name>).

    native / triton take the same arguments as the op; the device is that of the first argument. An
    implementation runs only where it can: every tensor argument is on that one device (check_op_devices), and
    native runs only on a device whose built native module serves the family (pyfastpeft.backend.choose, which
    warns and picks the reference otherwise), so implementations test only their own limits (dtypes, sizes).
    Inputs of a dtype outside `triton_dtypes` (fp64: the Triton kernels compute in fp32) run the
    reference when Triton is chosen.

    Every call on real tensors is validated before any backend sees it, whoever calls the op (the public
    function, a module, torch.compile's graph or a user calling torch.ops.pyfastpeft directly): all tensor
    arguments on one device, then `check(*args)`, the op's own contract (sizes of every companion tensor
    against the data, dtypes, ranges of ints), which raises TypeError / ValueError naming the argument.
    That is what keeps a corrupt checkpoint from reaching a kernel's pointers.
    """
    qualname = f"pyfastpeft::{name}"
    LIBRARY.define(name + schema)
    argument_names = _argument_names(schema)

    def checked_fake(*args):  # also the Meta kernel: a CPU/meta mix must not return uninitialized CPU memory
        check_op_devices(name, argument_names, args)
        return fake(*args)

    torch.library.register_fake(qualname, checked_fake, lib=LIBRARY)

    def validated(*args):
        check_op_devices(name, argument_names, args)
        if check is not None:
            check(*args)

    def on_default(*args):
        validated(*args)
        return reference(*args)

    def on_device(*args):
        validated(*args)
        first = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]  # a Tensor[] first: its first tensor
        backend = choose(family, first.device)
        if backend == "native":
            return native(*args)
        if backend == "triton" and first.dtype in triton_dtypes:
            if first.is_cuda:  # Triton launches on the current device: make it the tensors' (cuda:1 under
                with torch.cuda.device(first.device):  # device_map="auto" while cuda:0 is current)
                    return triton(*args)
            return triton(*args)
        return reference(*args)

    torch.library.impl(qualname, "default", _without_graph(on_default), lib=LIBRARY)
    # No op is differentiable by itself: gradients are the business of each family's autograd.Function, whose
    # forward calls the ops with autograd off. Called directly on tensors that require grad, an op returns outputs
    # that do not, on every backend alike: autograd falls through (C++, no per-call Python) and the kernels run
    # without recording a graph.
    LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
    # Nothing inside an op is autocast (ops/_autocast.py says what the public functions do instead).
    for device_type in ("cpu", "cuda"):
        LIBRARY.impl(name, _without_autocast(qualname, device_type), f"Autocast{device_type.upper()}")

    torch.library.impl(qualname, "cpu", _without_graph(on_device), lib=LIBRARY)
    torch.library.impl(qualname, "cuda", _without_graph(on_device), lib=LIBRARY)
    return getattr(torch.ops.pyfastpeft, name)


def triton_module(family: str):
    """pyfastpeft.triton_kernels.<family>, imported on first use (importing triton is slow)."""
    import importlib

    return importlib.import_module(f"pyfastpeft.triton_kernels.{family}")
