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

LIBRARY = torch.library.Library("pyfastpeft", "DEF")


def define_op(name: str, schema: str, *, family: str, fake: Callable, reference: Callable,
              native: Callable, triton: Callable, triton_dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """Define pyfastpeft::<name><schema>; returns the op (torch.ops.pyfastpeft.<name>).

    native / triton take the same arguments as the op; the device is that of the first argument.
    Inputs of a dtype outside `triton_dtypes` (fp64: the Triton kernels compute in fp32) run the
    reference when Triton is chosen.
    """
    qualname = f"pyfastpeft::{name}"
    LIBRARY.define(name + schema)
    torch.library.register_fake(qualname, fake, lib=LIBRARY)
    torch.library.impl(qualname, "default", reference, lib=LIBRARY)

    def on_device(*args):
        first = args[0]
        backend = choose(family, first.device)
        if backend == "native":
            return native(*args)
        if backend == "triton" and first.dtype in triton_dtypes:
            return triton(*args)
        return reference(*args)

    torch.library.impl(qualname, "cpu", on_device, lib=LIBRARY)
    torch.library.impl(qualname, "cuda", on_device, lib=LIBRARY)
    return getattr(torch.ops.pyfastpeft, name)


def triton_module(family: str):
    """pyfastpeft.triton_kernels.<family>, imported on first use (importing triton is slow)."""
    import importlib

    return importlib.import_module(f"pyfastpeft.triton_kernels.{family}")
