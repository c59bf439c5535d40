// pybind11 bindings of the CUDA kernels (pyfastpeft._cuda): one line per entry point of csrc/cuda/kernels.cuh, the
// Python function taking the kernel's parameters in its order: those of pyfastpeft._C's function of the same name
// with (stream, device) in place of nthreads (nf4_quantize and nf4_dequantize aside, see kernels.cuh). Pointers
// and the stream arrive as integers (csrc/bind_common.h), device as the CUDA device index;
// pyfastpeft/ops/<family>.py has validated every argument against the contract written above each entry point in
// csrc/cuda/<family>.cu. The GIL is released around every call; launches are asynchronous on that stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "bind_common.h"
#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pyfastpeft CUDA kernels (torch-free, pointer-based)";
#define PFP_DEF(name) m.def(#name, pfp_bind::python_call(&pfp_cuda::name), pfp_bind::release_gil())
  PFP_DEF(rmsnorm_forward);
  PFP_DEF(rmsnorm_backward);
  PFP_DEF(swiglu_forward);
  PFP_DEF(swiglu_backward);
  PFP_DEF(rope);
  PFP_DEF(int8_quantize);
  PFP_DEF(int8_mm_dequant);
  PFP_DEF(int8_gemv);
  PFP_DEF(int8_dequantize_rows);
  PFP_DEF(nf4_quantize);
  PFP_DEF(nf4_dequantize);
  PFP_DEF(nf4_gemv);
  PFP_DEF(flce_rows);
  PFP_DEF(distill_rows);
#undef PFP_DEF

  m.def(
      "device_count",
      [] {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) {
          (void)cudaGetLastError();  // clear it: no driver or no device is not an error here
          return 0;
        }
        return count;
      },
      "CUDA devices this module sees; 0 when there is no driver or no device.");
  m.def(
      "cuda_versions",
      [] {
        // (driver, runtime): the CUDA version the installed driver supports (0: no driver) and the one this module's
        // static runtime was built with, as 1000 * major + 10 * minor. Neither call creates a context or throws.
        int driver_version = 0;
        if (cudaDriverGetVersion(&driver_version) != cudaSuccess) {
          (void)cudaGetLastError();
          driver_version = 0;
        }
        return py::make_tuple(driver_version, int(CUDART_VERSION));
      },
      "(driver CUDA version, runtime CUDA version), 1000 * major + 10 * minor; driver 0 when there is none.");
  m.def("build_info", [] {
    int runtime_version = 0;
    PFP_CUDA_CHECK(cudaRuntimeGetVersion(&runtime_version));
    py::dict info;
    info["cuda_version"] = PFP_CUDA_VERSION;
    info["archs"] = PFP_CUDA_ARCHS;
    info["runtime_version"] = runtime_version;
    return info;
  });
}
