// SwiGLU forward and backward on the CPU, elementwise over flat buffers in chunks that stay in L1.
//
// forward:   s = sigmoid(g) = 1 / (1 + exp(-g)),   y = g * s * u
// backward:  du = dy * g * s,   dg = dy * u * s * (1 + g * (1 - s))
// (the activation is recomputed from g in backward, never saved). Compute in fp32 (fp64 for fp64),
// one rounding at the store.
#include "cpu/common.h"
#include "cpu/dispatch.h"
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

#if defined(__AVX512F__)
// 32 lanes at a time straight from memory (no staging through a chunk buffer), in load32's order: on hosts that run
// a 512-bit operation in two halves (AMD Zen 4) the chunked loops below are bound by their arithmetic, not by
// memory, and the bf16 case ran at 40% of the copy rate. The sigmoid's e^-g comes from exp16 (vscalefps saturates
// it: s = 0 or 1 with no branch).
inline __m512 sigmoid16(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, pfp::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

inline __m512 swiglu16(__m512 g, __m512 u) { return _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u); }

// du and dg of 16 lanes: du = dy g s, dg = dy u s (1 + g (1 - s)).
inline void swiglu_grads16(__m512 d, __m512 g, __m512 u, __m512& dg, __m512& du) {
  const __m512 s = sigmoid16(g), dyus = _mm512_mul_ps(_mm512_mul_ps(d, u), s);
  du = _mm512_mul_ps(_mm512_mul_ps(d, g), s);
  dg = _mm512_fmadd_ps(dyus, _mm512_fnmadd_ps(g, s, g), dyus);
}

// Elements [start, start + len) of the flat buffers.
template <bool kBf16Ins, typename T>
inline void forward_range(const T* gate, const T* up, T* out, int64_t start, int64_t len, bool stream) {
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m512 g0, g1, u0, u1;
    pfp::load32(gate + start + i, g0, g1);
    pfp::load32(up + start + i, u0, u1);
    pfp::put32_if<kBf16Ins>(out + start + i, swiglu16(g0, u0), swiglu16(g1, u1), stream);
  }
  for (; i < len; i += 16) {
    const __mmask16 valid = pfp::lanes16(len - i);
    const __m512 g = pfp::load16(gate + start + i, valid), u = pfp::load16(up + start + i, valid);
    pfp::store16(out + start + i, valid, swiglu16(g, u));
  }
}

template <bool kBf16Ins, typename T>
inline void backward_range(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t start, int64_t len,
                           bool stream) {
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m512 d0, d1, g0, g1, u0, u1, dg0, dg1, du0, du1;
    pfp::load32(dy + start + i, d0, d1);
    pfp::load32(gate + start + i, g0, g1);
    pfp::load32(up + start + i, u0, u1);
    swiglu_grads16(d0, g0, u0, dg0, du0);
    swiglu_grads16(d1, g1, u1, dg1, du1);
    pfp::put32_if<kBf16Ins>(dgate + start + i, dg0, dg1, stream);
    pfp::put32_if<kBf16Ins>(dup + start + i, du0, du1, stream);
  }
  for (; i < len; i += 16) {
    const __mmask16 valid = pfp::lanes16(len - i);
    __m512 dg, du;
    swiglu_grads16(pfp::load16(dy + start + i, valid), pfp::load16(gate + start + i, valid),
                   pfp::load16(up + start + i, valid), dg, du);
    pfp::store16(dgate + start + i, valid, dg);
    pfp::store16(dup + start + i, valid, du);
  }
}

// The bf16 ranges with AVX512-BF16 stores: flatten inlines the loops, and the store into them, under this target.
__attribute__((target("avx512bf16"), flatten)) void forward_range_bf16ins(const bf16* gate, const bf16* up, bf16* out,
                                                                          int64_t start, int64_t len, bool stream) {
  forward_range<true>(gate, up, out, start, len, stream);
}
__attribute__((target("avx512bf16"), flatten)) void backward_range_bf16ins(const bf16* dy, const bf16* gate,
                                                                           const bf16* up, bf16* dgate, bf16* dup,
                                                                           int64_t start, int64_t len, bool stream) {
  backward_range<true>(dy, gate, up, dgate, dup, start, len, stream);
}

template <typename T>
constexpr bool kVector16 = !std::is_same_v<T, double>;

// body(start, len) over [0, numel) in ranges of whole kChunk pieces, one a thread.
template <typename F>
void over_ranges(int64_t numel, int64_t work_per_chunk, int nthreads, F&& body) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  pfp::parallel_for(chunks, work_per_chunk, nthreads, [&](int64_t begin, int64_t end, int) {
    const int64_t start = begin * kChunk, stop = end * kChunk < numel ? end * kChunk : numel;
    body(start, stop - start);
  });
}
#else
template <typename T>
constexpr bool kVector16 = false;
#endif

template <typename T>
void forward_impl(const T* gate, const T* up, T* out, int64_t numel, int nthreads) {
  using C = typename pfp::Compute<T>::type;
#if defined(__AVX512F__)
  if constexpr (kVector16<T>) {
    const bool bf16ins = pfp::avx512_bf16_in_use();
    const bool stream = pfp::streams(numel * int64_t(sizeof(T)));  // out past the caches (common.h)
    over_ranges(numel, kChunk * 8, nthreads, [&](int64_t start, int64_t len) {
      if constexpr (std::is_same_v<T, bf16>) {
        if (bf16ins) forward_range_bf16ins(gate, up, out, start, len, stream);
      }
      if (!(std::is_same_v<T, bf16> && bf16ins)) forward_range<false>(gate, up, out, start, len, stream);
      if (stream) pfp::stream_fence();
    });
    return;
  }
#endif
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
#if defined(__AVX512F__)
  if constexpr (kVector16<T>) {
    const bool bf16ins = pfp::avx512_bf16_in_use();
    const bool stream = pfp::streams(2 * numel * int64_t(sizeof(T)));  // dgate and dup past the caches
    over_ranges(numel, kChunk * 12, nthreads, [&](int64_t start, int64_t len) {
      if constexpr (std::is_same_v<T, bf16>) {
        if (bf16ins) backward_range_bf16ins(dy, gate, up, dgate, dup, start, len, stream);
      }
      if (!(std::is_same_v<T, bf16> && bf16ins)) backward_range<false>(dy, gate, up, dgate, dup, start, len, stream);
      if (stream) pfp::stream_fence();
    });
    return;
  }
#endif
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
