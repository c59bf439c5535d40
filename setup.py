"""Build pyfastpeft's native modules with CMake + Ninja.

`pyfastpeft._C` (C++ CPU kernels) is always built. `pyfastpeft._cuda` is built when nvcc is found.

Environment:
  PYFASTPEFT_CUDA=0|1        0 turns CUDA off; 1 requires it (the build fails without nvcc);
                             unset: build CUDA when nvcc is found.
  PYFASTPEFT_CUDA_ARCHS      CMake CUDA architectures, default "80-real;90" (sm_80, sm_90 + PTX).
  PYFASTPEFT_BUILD_TYPE      CMake build type, default Release.
  PYFASTPEFT_BUILD_JOBS      parallel compile jobs (default: all cores).
  PYFASTPEFT_SANITIZE        -fsanitize= checks for _C, e.g. "address,undefined" (.ci/sanitize); default none.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    for candidate in (
        os.environ.get("CUDACXX"),
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_wanted():
    """(build_cuda, nvcc path). Fails loudly when CUDA is required but nvcc is missing."""
    setting = os.environ.get("PYFASTPEFT_CUDA", "").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return False, None
    nvcc = find_nvcc()
    if setting in ("1", "on", "true", "yes") and nvcc is None:
        raise RuntimeError("PYFASTPEFT_CUDA=1 but no nvcc was found (set CUDACXX or CUDA_HOME, or put nvcc on PATH)")
    return nvcc is not None, nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """One CMake configure+build produces every module; each Extension then copies its file."""

    def run(self):
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        out_dir = build_dir / "out"
        build_cuda, nvcc = cuda_wanted()
        import pybind11

        cmake = shutil.which("cmake")
        try:
            import cmake as cmake_pkg  # the PyPI wheel, present under build isolation

            cmake = os.path.join(cmake_pkg.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            pass
        if cmake is None:
            raise RuntimeError("cmake >= 3.24 is required to build pyfastpeft")
        args = [
            cmake,
            str(ROOT),
            "-G",
            "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('PYFASTPEFT_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYFASTPEFT_OUTPUT_DIR={out_dir}",
            f"-DPYFASTPEFT_CUDA={'ON' if build_cuda else 'OFF'}",
            f"-DPYFASTPEFT_SANITIZE={os.environ.get('PYFASTPEFT_SANITIZE', '')}",
        ]
        try:
            import ninja

            args.append(f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}")
        except ImportError:
            pass
        if build_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('PYFASTPEFT_CUDA_ARCHS', '80-real;90')}")
        subprocess.run(args, cwd=build_dir, check=True)
        build = [cmake, "--build", ".", "--parallel", os.environ.get("PYFASTPEFT_BUILD_JOBS", str(os.cpu_count() or 1))]
        subprocess.run(build, cwd=build_dir, check=True)

        for ext in self.extensions:
            stem = ext.name.split(".")[-1]
            built = sorted(out_dir.glob(f"{stem}.*.so")) + sorted(out_dir.glob(f"{stem}.so"))
            if not built:
                raise RuntimeError(f"CMake did not produce {ext.name} in {out_dir}")
            target = Path(self.get_ext_fullpath(ext.name))
            target.parent.mkdir(parents=True, exist_ok=True)
            # Copy beside the target, then rename over it: a process that has the old module mapped
            # keeps its (now unlinked) file, instead of faulting on pages rewritten under it.
            staging = target.with_name(target.name + ".tmp")
            shutil.copyfile(built[0], staging)
            os.replace(staging, target)


def extensions():
    exts = [CMakeExtension("pyfastpeft._C")]
    if cuda_wanted()[0]:
        exts.append(CMakeExtension("pyfastpeft._cuda"))
    return exts


setup(
    packages=[
        "pyfastpeft",
        "pyfastpeft.ops",
        "pyfastpeft.reference",
        "pyfastpeft.nn",
        "pyfastpeft.integrations",
        "pyfastpeft.bench",
        "pyfastpeft.bench.cases",
        "pyfastpeft.quant",
        "pyfastpeft.triton_kernels",
    ],
    package_dir={"pyfastpeft": "pyfastpeft", "pyfastpeft.triton_kernels": "triton_kernels"},
    # py.typed (PEP 561): the annotations are for type checkers too; the benchmark ETA reads its recorded case times
    package_data={"pyfastpeft": ["py.typed", "bench/case_seconds.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": CMakeBuild},
)
