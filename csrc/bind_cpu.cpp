// pybind11 bindings of the CPU kernels (pyfastpeft._C). Pointers arrive as integers from
// tensor.data_ptr(); pyfastpeft/ops/<family>.py has validated every argument against the contract
// written above each kernel. The GIL is released around every kernel call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdint>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace py = pybind11;

namespace {

template <typename T> T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

// Calls ns::name(args...) for the instruction set in use.
#define PFP_CALL_ISA(name, ...)                                        \
  switch (pfp::current_isa()) {                                        \
    case pfp::Isa::kAvx512: pfp_avx512::name(__VA_ARGS__); break;      \
    case pfp::Isa::kAvx2: pfp_avx2::name(__VA_ARGS__); break;          \
    default: pfp_scalar::name(__VA_ARGS__); break;                     \
  }

void rmsnorm_forward(uintptr_t x, uintptr_t weight, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t n,
                     int x_dtype, int weight_dtype, int y_dtype, double eps, double offset, int casting_mode,
                     int nthreads) {
  PFP_CALL_ISA(rmsnorm_forward, ptr<const void>(x), ptr<const void>(weight), ptr<void>(y), ptr<void>(rstd), rows, n,
               x_dtype, weight_dtype, y_dtype, eps, offset, casting_mode, nthreads);
}

void rmsnorm_backward(uintptr_t dy, uintptr_t x, uintptr_t weight, uintptr_t rstd, uintptr_t dx, uintptr_t dw,
                      int64_t rows, int64_t n, int x_dtype, int weight_dtype, int dy_dtype, double offset,
                      int casting_mode, int nthreads) {
  PFP_CALL_ISA(rmsnorm_backward, ptr<const void>(dy), ptr<const void>(x), ptr<const void>(weight),
               ptr<const void>(rstd), ptr<void>(dx), ptr<void>(dw), rows, n, x_dtype, weight_dtype, dy_dtype,
               offset, casting_mode, nthreads);
}

void swiglu_forward(uintptr_t gate, uintptr_t up, uintptr_t out, int64_t numel, int dtype, int nthreads) {
  PFP_CALL_ISA(swiglu_forward, ptr<const void>(gate), ptr<const void>(up), ptr<void>(out), numel, dtype, nthreads);
}

void swiglu_backward(uintptr_t dy, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup, int64_t numel,
                     int dtype, int nthreads) {
  PFP_CALL_ISA(swiglu_backward, ptr<const void>(dy), ptr<const void>(gate), ptr<const void>(up), ptr<void>(dgate),
               ptr<void>(dup), numel, dtype, nthreads);
}

using Strides = std::array<int64_t, 3>;

void rope(uintptr_t q, uintptr_t k, uintptr_t q_out, uintptr_t k_out, uintptr_t cos, uintptr_t sin, Strides q_strides,
          Strides k_strides, Strides q_out_strides, Strides k_out_strides, int64_t cos_batch_stride,
          int64_t cos_seq_stride, int64_t batch, int64_t seq, int64_t q_heads, int64_t k_heads, int64_t head_dim,
          int64_t rot_dim, int dtype, bool interleaved, bool backward, int nthreads) {
  PFP_CALL_ISA(rope, ptr<const void>(q), ptr<const void>(k), ptr<void>(q_out), ptr<void>(k_out), ptr<const void>(cos),
               ptr<const void>(sin), q_strides.data(), k_strides.data(), q_out_strides.data(), k_out_strides.data(),
               cos_batch_stride, cos_seq_stride, batch, seq, q_heads, k_heads, head_dim, rot_dim, dtype, interleaved,
               backward, nthreads);
}

void nf4_quantize(uintptr_t w, int w_dtype, uintptr_t packed, uintptr_t absmax, int64_t numel, int64_t blocksize,
                  uintptr_t code, int nthreads) {
  PFP_CALL_ISA(nf4_quantize, ptr<const void>(w), w_dtype, ptr<uint8_t>(packed), ptr<float>(absmax), numel, blocksize,
               ptr<const float>(code), nthreads);
}

void nf4_dequantize(uintptr_t packed, uintptr_t absmax, uintptr_t code, uintptr_t out, int out_dtype, int64_t start,
                    int64_t count, int64_t blocksize, int nthreads) {
  PFP_CALL_ISA(nf4_dequantize, ptr<const uint8_t>(packed), ptr<const float>(absmax), ptr<const float>(code),
               ptr<void>(out), out_dtype, start, count, blocksize, nthreads);
}

// bias == 0: no bias (bias_dtype is then ignored).
void nf4_gemv(uintptr_t x, int x_dtype, uintptr_t packed, uintptr_t absmax, uintptr_t code, uintptr_t bias,
              int bias_dtype, uintptr_t out, int64_t m, int64_t n, int64_t k, int64_t blocksize, int nthreads) {
  PFP_CALL_ISA(nf4_gemv, ptr<const void>(x), x_dtype, ptr<const uint8_t>(packed), ptr<const float>(absmax),
               ptr<const float>(code), ptr<const void>(bias), bias_dtype, ptr<void>(out), m, n, k, blocksize,
               nthreads);
}

// bias == 0: no bias (bias_dtype ignored); addend == 0: none.
void int8_quantize(uintptr_t x, int x_dtype, uintptr_t q, uintptr_t stats, uintptr_t outlier_flags, int64_t m,
                   int64_t k, int axis, double threshold, int nthreads) {
  PFP_CALL_ISA(int8_quantize, ptr<const void>(x), x_dtype, ptr<int8_t>(q), ptr<float>(stats),
               ptr<uint8_t>(outlier_flags), m, k, axis, threshold, nthreads);
}

void int8_mm_dequant(uintptr_t c, uintptr_t row_stats, uintptr_t col_stats, uintptr_t bias, int bias_dtype,
                     uintptr_t addend, uintptr_t out, int out_dtype, int64_t m, int64_t n, int nthreads) {
  PFP_CALL_ISA(int8_mm_dequant, ptr<const int32_t>(c), ptr<const float>(row_stats), ptr<const float>(col_stats),
               ptr<const void>(bias), bias_dtype, ptr<const float>(addend), ptr<void>(out), out_dtype, m, n, nthreads);
}

void int8_gemv(uintptr_t q, uintptr_t row_stats, uintptr_t w, uintptr_t col_stats, uintptr_t bias, int bias_dtype,
               uintptr_t addend, uintptr_t out, int out_dtype, int64_t m, int64_t n, int64_t k, int nthreads) {
  PFP_CALL_ISA(int8_gemv, ptr<const int8_t>(q), ptr<const float>(row_stats), ptr<const int8_t>(w),
               ptr<const float>(col_stats), ptr<const void>(bias), bias_dtype, ptr<const float>(addend),
               ptr<void>(out), out_dtype, m, n, k, nthreads);
}

void int8_dequantize_rows(uintptr_t q, uintptr_t stats, uintptr_t out, int out_dtype, int64_t rows, int64_t k,
                          int nthreads) {
  PFP_CALL_ISA(int8_dequantize_rows, ptr<const int8_t>(q), ptr<const float>(stats), ptr<void>(out), out_dtype, rows,
               k, nthreads);
}

// seed, offset: the int64 pair of the op's rng tensor; threshold = fp32(p), keep_scale = fp32(1 / (1 - p)).
void lora_dropout(uintptr_t src, uintptr_t dst, int64_t numel, int dtype, int64_t seed, int64_t offset, float threshold,
                  float keep_scale, double alpha, bool accumulate, int nthreads) {
  PFP_CALL_ISA(lora_dropout, ptr<const void>(src), ptr<void>(dst), numel, dtype, seed, offset, threshold, keep_scale,
               alpha, accumulate, nthreads);
}

// zero_point == 0: absmax (no zero point).
void quantize_affine(uintptr_t x, int x_dtype, uintptr_t codes, uintptr_t scale, uintptr_t zero_point, int64_t outer,
                     int64_t channels, int64_t inner, int64_t blocksize, int bits, bool zeropoint, int nthreads) {
  PFP_CALL_ISA(quantize_affine, ptr<const void>(x), x_dtype, ptr<void>(codes), ptr<float>(scale),
               ptr<int32_t>(zero_point), outer, channels, inner, blocksize, bits, zeropoint, nthreads);
}

void quantize_static(uintptr_t x, int x_dtype, uintptr_t scale, uintptr_t zero_point, uintptr_t codes, int64_t outer,
                     int64_t channels, int64_t inner, int64_t blocksize, int bits, bool zeropoint, int nthreads) {
  PFP_CALL_ISA(quantize_static, ptr<const void>(x), x_dtype, ptr<const float>(scale), ptr<const int32_t>(zero_point),
               ptr<void>(codes), outer, channels, inner, blocksize, bits, zeropoint, nthreads);
}

void dequantize_affine(uintptr_t codes, bool codes_signed, uintptr_t scale, uintptr_t zero_point, uintptr_t out,
                       int out_dtype, int64_t outer, int64_t channels, int64_t inner, int64_t blocksize,
                       int nthreads) {
  PFP_CALL_ISA(dequantize_affine, ptr<const void>(codes), codes_signed, ptr<const float>(scale),
               ptr<const int32_t>(zero_point), ptr<void>(out), out_dtype, outer, channels, inner, blocksize, nthreads);
}

// row_index: int64 [count]; scatter: dst rows are row_index, else src rows are (see csrc/cpu/lora.cpp).
void lora_dropout_rows(uintptr_t src, uintptr_t dst, uintptr_t row_index, int64_t count, int64_t cols, bool scatter,
                       int dtype, int64_t seed, int64_t offset, float threshold, float keep_scale, double alpha,
                       bool accumulate, int nthreads) {
  PFP_CALL_ISA(lora_dropout_rows, ptr<const void>(src), ptr<void>(dst), ptr<const int64_t>(row_index), count, cols,
               scatter, dtype, seed, offset, threshold, keep_scale, alpha, accumulate, nthreads);
}

// grad_weight == 0: no gradient (the logits keep the softcapped values).
void flce_rows(uintptr_t logits, uintptr_t labels, uintptr_t grad_weight, uintptr_t loss, uintptr_t lse, int64_t rows,
               int64_t vocab, int dtype, int64_t ignore_index, double label_smoothing, double softcap, int nthreads) {
  PFP_CALL_ISA(flce_rows, ptr<void>(logits), ptr<const int64_t>(labels), ptr<const void>(grad_weight), ptr<void>(loss),
               ptr<void>(lse), rows, vocab, dtype, ignore_index, label_smoothing, softcap, nthreads);
}

// Ask the kernel to back [address, address + nbytes) with 2 MiB pages, before its first touch.
// Fresh large tensors come straight from mmap, and with 4 KiB pages their first-touch page faults
// cost several times the kernel that fills them (about 15 ms for 64 MiB, against 3 ms here).
// Only whole aligned 2 MiB pages inside the range are advised; a no-op off Linux.
void advise_huge_pages(uintptr_t address, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  uintptr_t begin = (address + huge - 1) & ~(huge - 1), end = (address + nbytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)address;
  (void)nbytes;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfastpeft CPU kernels (torch-free, pointer-based)";
  auto release = py::call_guard<py::gil_scoped_release>();
  m.def("rmsnorm_forward", &rmsnorm_forward, release);
  m.def("rmsnorm_backward", &rmsnorm_backward, release);
  m.def("swiglu_forward", &swiglu_forward, release);
  m.def("swiglu_backward", &swiglu_backward, release);
  m.def("rope", &rope, release);
  m.def("nf4_quantize", &nf4_quantize, release);
  m.def("nf4_dequantize", &nf4_dequantize, release);
  m.def("nf4_gemv", &nf4_gemv, release);
  m.def("int8_quantize", &int8_quantize, release);
  m.def("int8_mm_dequant", &int8_mm_dequant, release);
  m.def("int8_gemv", &int8_gemv, release);
  m.def("int8_dequantize_rows", &int8_dequantize_rows, release);
  m.def("lora_dropout", &lora_dropout, release);
  m.def("quantize_affine", &quantize_affine, release);
  m.def("quantize_static", &quantize_static, release);
  m.def("dequantize_affine", &dequantize_affine, release);
  m.def("lora_dropout_rows", &lora_dropout_rows, release);
  m.def("flce_rows", &flce_rows, release);
  m.def("advise_huge_pages", &advise_huge_pages, py::arg("address"), py::arg("nbytes"));

  m.def("best_isa", [] { return std::string(pfp::isa_name(pfp::best_isa())); },
        "Best CPU instruction set this machine supports: avx512, avx2 or scalar.");
  m.def("current_isa", [] { return std::string(pfp::isa_name(pfp::current_isa())); },
        "The CPU instruction set the kernels use now.");
  m.def("set_isa", [](const std::string& name) { return std::string(pfp::isa_name(pfp::set_isa(pfp::isa_from_name(name)))); },
        py::arg("name"), "Use the kernels built for `name`; returns the previous choice.");
  m.def("build_info", [] {
    py::dict info;
    info["compiler"] = PFP_CXX_COMPILER;
    info["build_type"] = PFP_BUILD_TYPE;
    info["isas_built"] = std::vector<std::string>{"avx512", "avx2", "scalar"};
    info["openmp"] = _OPENMP;
    return info;
  });
}
