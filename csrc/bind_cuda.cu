// pybind11 bindings of the CUDA kernels (pyfastpeft._cuda): the functions of pyfastpeft._C with
// (stream, device) in place of nthreads. Pointers arrive as integers from tensor.data_ptr(), stream as
// torch.cuda.current_stream(device).cuda_stream, device as the CUDA device index;
// pyfastpeft/ops/<family>.py has validated every argument against the contract written above each
// entry point in csrc/cuda/<family>.cu. The GIL is released around every call; launches are
// asynchronous on that stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

namespace py = pybind11;

namespace {

template <typename T> T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }
cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void rmsnorm_forward(uintptr_t x, uintptr_t weight, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t n,
                     int x_dtype, int weight_dtype, int y_dtype, double eps, double offset, int casting_mode,
                     uintptr_t stream, int device) {
  pfp_cuda::rmsnorm_forward(ptr<const void>(x), ptr<const void>(weight), ptr<void>(y), ptr<void>(rstd), rows, n,
                            x_dtype, weight_dtype, y_dtype, eps, offset, casting_mode, as_stream(stream), device);
}

void rmsnorm_backward(uintptr_t dy, uintptr_t x, uintptr_t weight, uintptr_t rstd, uintptr_t dx, uintptr_t dw_partial,
                      int64_t rows, int64_t n, int x_dtype, int weight_dtype, int dy_dtype, double offset,
                      int casting_mode, int64_t num_partials, uintptr_t stream, int device) {
  pfp_cuda::rmsnorm_backward(ptr<const void>(dy), ptr<const void>(x), ptr<const void>(weight), ptr<const void>(rstd),
                             ptr<void>(dx), ptr<void>(dw_partial), rows, n, x_dtype, weight_dtype, dy_dtype, offset,
                             casting_mode, num_partials, as_stream(stream), device);
}

void swiglu_forward(uintptr_t gate, uintptr_t up, uintptr_t out, int64_t numel, int dtype, uintptr_t stream,
                    int device) {
  pfp_cuda::swiglu_forward(ptr<const void>(gate), ptr<const void>(up), ptr<void>(out), numel, dtype,
                           as_stream(stream), device);
}

void swiglu_backward(uintptr_t dy, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup, int64_t numel,
                     int dtype, uintptr_t stream, int device) {
  pfp_cuda::swiglu_backward(ptr<const void>(dy), ptr<const void>(gate), ptr<const void>(up), ptr<void>(dgate),
                            ptr<void>(dup), numel, dtype, as_stream(stream), device);
}

using Strides = std::array<int64_t, 3>;

void rope(uintptr_t q, uintptr_t k, uintptr_t q_out, uintptr_t k_out, uintptr_t cos, uintptr_t sin, Strides q_strides,
          Strides k_strides, Strides q_out_strides, Strides k_out_strides, int64_t cos_batch_stride,
          int64_t cos_seq_stride, int64_t batch, int64_t seq, int64_t q_heads, int64_t k_heads, int64_t head_dim,
          int64_t rot_dim, int dtype, bool interleaved, bool backward, uintptr_t stream, int device) {
  pfp_cuda::rope(ptr<const void>(q), ptr<const void>(k), ptr<void>(q_out), ptr<void>(k_out), ptr<const void>(cos),
                 ptr<const void>(sin), q_strides.data(), k_strides.data(), q_out_strides.data(),
                 k_out_strides.data(), cos_batch_stride, cos_seq_stride, batch, seq, q_heads, k_heads, head_dim,
                 rot_dim, dtype, interleaved, backward, as_stream(stream), device);
}

// bias == 0: none (its dtype is out_dtype); addend == 0: none.
void int8_quantize(uintptr_t x, int x_dtype, uintptr_t q, uintptr_t stats, uintptr_t flags, int64_t m, int64_t k,
                   int axis, double threshold, uintptr_t stream, int device) {
  pfp_cuda::int8_quantize(ptr<const void>(x), x_dtype, ptr<int8_t>(q), ptr<float>(stats), ptr<int>(flags), m, k, axis,
                          threshold, as_stream(stream), device);
}

void int8_mm_dequant(uintptr_t c, uintptr_t row_stats, uintptr_t col_stats, uintptr_t bias, uintptr_t addend,
                     uintptr_t out, int out_dtype, int64_t m, int64_t n, uintptr_t stream, int device) {
  pfp_cuda::int8_mm_dequant(ptr<const int32_t>(c), ptr<const float>(row_stats), ptr<const float>(col_stats),
                            ptr<const void>(bias), ptr<const float>(addend), ptr<void>(out), out_dtype, m, n,
                            as_stream(stream), device);
}

void int8_gemv(uintptr_t q, uintptr_t row_stats, uintptr_t w, uintptr_t col_stats, uintptr_t bias, uintptr_t addend,
               uintptr_t out, int out_dtype, int64_t m, int64_t n, int64_t k, uintptr_t stream, int device) {
  pfp_cuda::int8_gemv(ptr<const int8_t>(q), ptr<const float>(row_stats), ptr<const int8_t>(w),
                      ptr<const float>(col_stats), ptr<const void>(bias), ptr<const float>(addend), ptr<void>(out),
                      out_dtype, m, n, k, as_stream(stream), device);
}

void int8_dequantize_rows(uintptr_t q, uintptr_t stats, uintptr_t out, int out_dtype, int64_t rows, int64_t k,
                          uintptr_t stream, int device) {
  pfp_cuda::int8_dequantize_rows(ptr<const int8_t>(q), ptr<const float>(stats), ptr<void>(out), out_dtype, rows, k,
                                 as_stream(stream), device);
}

void nf4_quantize(uintptr_t w, int w_dtype, uintptr_t packed, uintptr_t absmax, int64_t numel, int64_t blocksize,
                  uintptr_t midpoints, uintptr_t order, uintptr_t stream, int device) {
  pfp_cuda::nf4_quantize(ptr<const void>(w), w_dtype, ptr<uint8_t>(packed), ptr<float>(absmax), numel, blocksize,
                         ptr<const float>(midpoints), ptr<const int32_t>(order), as_stream(stream), device);
}

void nf4_dequantize(uintptr_t packed, uintptr_t absmax, uintptr_t code, uintptr_t out, int out_dtype, int64_t numel,
                    int64_t blocksize, uintptr_t stream, int device) {
  pfp_cuda::nf4_dequantize(ptr<const uint8_t>(packed), ptr<const float>(absmax), ptr<const float>(code),
                           ptr<void>(out), out_dtype, numel, blocksize, as_stream(stream), device);
}

void nf4_gemv(uintptr_t x, int x_dtype, uintptr_t packed, uintptr_t absmax, uintptr_t code, uintptr_t bias,
              int bias_dtype, uintptr_t out, int64_t m, int64_t n, int64_t k, int64_t blocksize, uintptr_t stream,
              int device) {
  pfp_cuda::nf4_gemv(ptr<const void>(x), x_dtype, ptr<const uint8_t>(packed), ptr<const float>(absmax),
                     ptr<const float>(code), ptr<const void>(bias), bias_dtype, ptr<void>(out), m, n, k, blocksize,
                     as_stream(stream), device);
}

// grad_weights == 0: no gradient (the logits are left as they are).
void flce_rows(uintptr_t logits, uintptr_t labels, uintptr_t grad_weights, uintptr_t loss, uintptr_t lse, int64_t rows,
               int64_t vocab, int dtype, int64_t ignore_index, double label_smoothing, double softcap,
               uintptr_t stream, int device) {
  pfp_cuda::flce_rows(ptr<void>(logits), ptr<const int64_t>(labels), ptr<const void>(grad_weights), ptr<void>(loss),
                      ptr<void>(lse), rows, vocab, dtype, ignore_index, label_smoothing, softcap, as_stream(stream),
                      device);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pyfastpeft CUDA kernels (torch-free, pointer-based)";
  auto release = py::call_guard<py::gil_scoped_release>();
  m.def("rmsnorm_forward", &rmsnorm_forward, release);
  m.def("rmsnorm_backward", &rmsnorm_backward, release);
  m.def("swiglu_forward", &swiglu_forward, release);
  m.def("swiglu_backward", &swiglu_backward, release);
  m.def("rope", &rope, release);
  m.def("int8_quantize", &int8_quantize, release);
  m.def("int8_mm_dequant", &int8_mm_dequant, release);
  m.def("int8_gemv", &int8_gemv, release);
  m.def("int8_dequantize_rows", &int8_dequantize_rows, release);
  m.def("nf4_quantize", &nf4_quantize, release);
  m.def("nf4_dequantize", &nf4_dequantize, release);
  m.def("nf4_gemv", &nf4_gemv, release);
  m.def("flce_rows", &flce_rows, release);

  m.def("device_count", [] {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      (void)cudaGetLastError();  // clear it: no driver or no device is not an error here
      return 0;
    }
    return count;
  }, "CUDA devices this module sees; 0 when there is no driver or no device.");
  m.def("cuda_versions", [] {
    // (driver, runtime): the CUDA version the installed driver supports (0: no driver) and the one this module's
    // static runtime was built with, as 1000 * major + 10 * minor. Neither call creates a context or throws.
    int driver_version = 0;
    if (cudaDriverGetVersion(&driver_version) != cudaSuccess) {
      (void)cudaGetLastError();
      driver_version = 0;
    }
    return py::make_tuple(driver_version, int(CUDART_VERSION));
  }, "(driver CUDA version, runtime CUDA version), 1000 * major + 10 * minor; driver 0 when there is none.");
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
