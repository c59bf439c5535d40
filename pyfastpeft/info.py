"""`python -m pyfastpeft.info`: what was built (compiler, CPU instruction sets, CUDA version and
architectures) and what this install can run."""

import json
import platform

import torch

from pyfastpeft import _native
from pyfastpeft.backend import backends


def build_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if _native.cpu is not None:
        info["cpu"] = {
            **_native.cpu.build_info(),
            "best_isa": _native.cpu.best_isa(),
            "isa_in_use": _native.cpu.current_isa(),
            "amx_in_use": _native.cpu.amx_in_use(),
            "avx512_bf16_in_use": _native.cpu.avx512_bf16_in_use(),
            "avx512_vbmi_in_use": _native.cpu.avx512_vbmi_in_use(),
        }
    else:
        info["cpu"] = {"error": _native.cpu_error}
    info["cuda"] = _native.cuda.build_info() if _native.cuda is not None else {"error": _native.cuda_error}
    info["backends"] = backends()
    return info


if __name__ == "__main__":
    print(json.dumps(build_info(), indent=2))
