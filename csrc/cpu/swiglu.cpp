// SwiGLU forward and backward on the CPU, elementwise over flat buffers in chunks that stay in L1.
//
// forward:   s = sigmoid(g) = 1 / (1 + exp(-g)),   y = g * s * u
// backward:  du = dy * g * s,   dg = dy * u * s * (1 + g * (1 - s))
// (the activation is recomputed from g in backward, never saved). Compute in fp32 (fp64 for fp64),
// one rounding at the store.
#include "cpu/common.h"
#include "cpu/kernels.h"

#include <stdexcept>
#include <type_traits>

namespace PFP_ISA {
namespace {

using pfp::bf16;
using pfp::half;

constexpr int64_t kChunk = 512;

template <typename C>
inline C sigmoid(C g) {
  return C(1) / (C(1) + pfp::exp_approx(-g));
}

template <typename T>
void forward_impl(const T* gate, const T* up, T* out, int64_t numel, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  int64_t chunks = (numel + kChunk - 1) / kChunk;
  pfp::parallel_for(chunks, kChunk * 8, nthreads, [&](int64_t begin, int64_t end, int) {
    alignas(64) C g[kChunk], u[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      int64_t start = c * kChunk, len = numel - start < kChunk ? numel - start : kChunk;
      pfp::load_row(gate + start, g, len);
      pfp::load_row(up + start, u, len);
      for (int64_t i = 0; i < len; ++i) g[i] = g[i] * sigmoid(g[i]) * u[i];
      pfp::store_row(g, out + start, len);
    }
  });
}

template <typename T>
void backward_impl(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t numel, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  int64_t chunks = (numel + kChunk - 1) / kChunk;
  pfp::parallel_for(chunks, kChunk * 12, nthreads, [&](int64_t begin, int64_t end, int) {
    alignas(64) C d[kChunk], g[kChunk], u[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      int64_t start = c * kChunk, len = numel - start < kChunk ? numel - start : kChunk;
      pfp::load_row(dy + start, d, len);
      pfp::load_row(gate + start, g, len);
      pfp::load_row(up + start, u, len);
      for (int64_t i = 0; i < len; ++i) {
        C s = sigmoid(g[i]);
        C dyu = d[i] * u[i];
        u[i] = d[i] * g[i] * s;                       // du
        g[i] = dyu * s * (C(1) + g[i] * (C(1) - s));  // dg
      }
      pfp::store_row(g, dgate + start, len);
      pfp::store_row(u, dup + start, len);
    }
  });
}

}  // namespace

// swiglu_forward: out[numel] = silu(gate) * up; gate, up, out contiguous, one dtype (pfp::DType).
void swiglu_forward(const void* gate, const void* up, void* out, int64_t numel, int dtype, int nthreads) {
  pfp::dispatch_float(dtype, "swiglu_forward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    forward_impl(static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), numel, nthreads);
  });
}

// swiglu_backward: dgate, dup [numel] from dy, gate, up [numel]; all contiguous, one dtype.
void swiglu_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t numel, int dtype,
                     int nthreads) {
  pfp::dispatch_float(dtype, "swiglu_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    backward_impl(static_cast<const T*>(dy), static_cast<const T*>(gate), static_cast<const T*>(up),
                  static_cast<T*>(dgate), static_cast<T*>(dup), numel, nthreads);
  });
}

}  // namespace PFP_ISA
