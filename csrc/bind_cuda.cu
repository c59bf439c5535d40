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

// Unified (managed) memory for paged optimizer states, in the interface of torch.cuda.memory.CUDAPluggableAllocator
// (pyfastpeft/optim.py routes the states' allocations to a torch.cuda.MemPool of it). Managed pages live where they
// were last touched: under memory pressure the driver evicts them to host memory instead of failing, and the next
// kernel to touch them faults them back (or a prefetch moves them ahead of it). Exported by name for ctypes (the
// module is built with hidden visibility). A failed allocation returns nullptr, which torch reports as out of memory.
extern "C" {
__attribute__((visibility("default"))) void* pfp_managed_alloc(size_t size, int /*device*/, cudaStream_t /*s*/) {
  void* ptr = nullptr;
  if (cudaMallocManaged(&ptr, size, cudaMemAttachGlobal) != cudaSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  return ptr;
}

__attribute__((visibility("default"))) void pfp_managed_free(void* ptr, size_t /*size*/, int /*device*/,
                                                             cudaStream_t /*stream*/) {
  if (cudaFree(ptr) != cudaSuccess) (void)cudaGetLastError();  // a free cannot report; never leave an error behind
}
}

namespace {

// Moves the managed pages [ptr, ptr + nbytes) to a device (device >= 0) or to host memory (device < 0), ordered on
// the stream: a step's kernels then find its states resident instead of faulting them in page by page.
void prefetch_managed(uintptr_t ptr, size_t nbytes, int device, uintptr_t stream) {
  const void* begin = reinterpret_cast<const void*>(ptr);
  cudaStream_t on = reinterpret_cast<cudaStream_t>(stream);
#if CUDART_VERSION >= 13000
  cudaMemLocation location{};
  location.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  location.id = device < 0 ? 0 : device;
  PFP_CUDA_CHECK(cudaMemPrefetchAsync(begin, nbytes, location, 0, on));
#else
  PFP_CUDA_CHECK(cudaMemPrefetchAsync(begin, nbytes, device < 0 ? cudaCpuDeviceId : device, on));
#endif
}

}  // namespace

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
  m.def("prefetch", &prefetch_managed, pfp_bind::release_gil(),
        "Prefetch managed memory to a device (>= 0) or to the host (< 0), ordered on a stream.");
  m.def(
      "is_managed",
      [](uintptr_t ptr) {
        cudaPointerAttributes attributes{};
        if (cudaPointerGetAttributes(&attributes, reinterpret_cast<const void*>(ptr)) != cudaSuccess) {
          (void)cudaGetLastError();
          return false;
        }
        return attributes.type == cudaMemoryTypeManaged;
      },
      "Whether ptr points into managed (unified) memory.");
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
