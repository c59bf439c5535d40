// RMSNorm forward and backward on the CPU, one row of n elements at a time, rows split over threads.
//
// forward, one row:  r = 1 / sqrt(mean(x^2) + eps),  w' = offset + w   (fp32, or fp64 for fp64 x)
//   llama: y = w' * round_x(x * r)            (HF LlamaRMSNorm: normalize in fp32, cast, then scale)
//   gemma: y = x * r * w'                      (all in fp32, one cast at the store)
//   none : y = round_x(round_x(x * round_x(r)) * round_x(w'))   (every step in x's dtype)
// where round_x(v) is v stored as x's dtype and read back.
// backward, one row (the casts treated as identity):  m = dy * w'
//   dx = r * m - (r^3 / n) * dot(m, x) * x
//   dw += dy * xn,  xn = round_x(x * r) (llama, none) or x * r (gemma)
// dw is summed in an order fixed by rows alone, whatever the thread count (bitwise the same dW on 1 or 64
// threads): rows split into P = min(ceil(rows / 16), 256) contiguous ranges, one partial row each, the
// threads taking whole ranges; then every column adds the P partials in index order.
#include "cpu/common.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace PFP_ISA {
namespace {

using pfp::bf16;
using pfp::half;

enum CastingMode { kLlama = 0, kGemma = 1, kNone = 2 };

// w' = offset + w in the compute type, whatever the weight's dtype.
template <typename C>
void load_weight(const void* weight, int weight_dtype, double offset, int64_t n, C* dst) {
  switch (weight_dtype) {
    case pfp::kFloat32: pfp::load_row(static_cast<const float*>(weight), dst, n); break;
    case pfp::kFloat16: pfp::load_row(static_cast<const half*>(weight), dst, n); break;
    case pfp::kBFloat16: pfp::load_row(static_cast<const bf16*>(weight), dst, n); break;
    case pfp::kFloat64: pfp::load_row(static_cast<const double*>(weight), dst, n); break;
    default: throw std::invalid_argument("rmsnorm: unsupported weight dtype code");
  }
  const C off = C(offset);
  for (int64_t i = 0; i < n; ++i) dst[i] = off + dst[i];
}

#if defined(__AVX512F__)
// fp32 and bf16 rows in 16-lane vectors: GCC's vectorization of the scalar loops below spent far more on the bf16
// conversions and roundings (a bf16 forward of 4096 x 4096 rows on 2 AMX-host cores: 6.6 ms there, 5.0 ms here).
// The sums add in lane_sum's order; the elementwise math is the scalar loops' (multiply-adds contracted).
template <typename T>
constexpr bool kVector16 = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

// lane_sum's fold of its 16 lane sums: lane j += lane j + w for w = 8, 4, 2, 1.
inline float fold16(__m512 acc) {
  const __m256 v8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  const __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  const __m128 v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
  return _mm_cvtss_f32(_mm_add_ss(v2, _mm_movehdup_ps(v2)));
}

// lane_sum over a row, 16 lanes at a time: term(acc, i, valid) returns acc plus the terms of elements [i, i + 16)
// (lanes outside valid are discarded, so a tail's missing lanes add nothing).
template <typename Term>
inline float row_sum16(int64_t n, Term&& term) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = term(acc, i, __mmask16(0xFFFF));
  if (i < n) {
    const __mmask16 valid = pfp::lanes16(n - i);
    acc = _mm512_mask_mov_ps(acc, valid, term(acc, i, valid));
  }
  return fold16(acc);
}

// 16 lanes of y from x, w' and rv = r (kNone: r rounded to Tround), in the casting mode (normalize_row's formulas).
template <typename Tround, bool kBf16Ins>
__attribute__((always_inline)) inline __m512 normalized16(__m512 xv, __m512 wv, __m512 rv, int mode) {
  if (mode == kLlama) return _mm512_mul_ps(wv, pfp::round16_if<kBf16Ins, Tround>(_mm512_mul_ps(xv, rv)));
  if (mode == kGemma) return _mm512_mul_ps(_mm512_mul_ps(xv, rv), wv);
  return pfp::round16_if<kBf16Ins, Tround>(
      _mm512_mul_ps(pfp::round16_if<kBf16Ins, Tround>(_mm512_mul_ps(xv, rv)), pfp::round16_if<kBf16Ins, Tround>(wv)));
}

template <typename Tround, bool kBf16Ins, typename Tsrc, typename Tdst>
inline float normalize_row16(const Tsrc* __restrict x, Tdst* __restrict y, const float* __restrict w, int64_t n,
                             double eps, int mode, const Tsrc* x_ahead = nullptr, bool stream = false) {
  const float sum_sq = row_sum16(n, [&](__m512 acc, int64_t i, __mmask16 valid) {
    const __m512 v = pfp::load16(x + i, valid);
    return _mm512_fmadd_ps(v, v, acc);
  });
  const float r = 1.0f / std::sqrt(sum_sq / float(n) + float(eps));
  const __m512 rv = _mm512_set1_ps(mode == kNone ? pfp::round_to<Tround>(r) : r);
  auto step = [&](int64_t i, __mmask16 valid) __attribute__((always_inline)) {
    if (x_ahead != nullptr && (i * int64_t(sizeof(Tsrc))) % 64 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(x_ahead + i), _MM_HINT_T1);
    const __m512 xv = pfp::load16(x + i, valid), wv = _mm512_maskz_loadu_ps(valid, w + i);
    const __m512 yv = normalized16<Tround, kBf16Ins>(xv, wv, rv, mode);
    pfp::put16_if<kBf16Ins>(y + i, valid, yv, stream);
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) step(i, __mmask16(0xFFFF));
  if (i < n) step(i, pfp::lanes16(n - i));
  return r;
}

// One row's normalize pass (y from x and r), modes as normalize_row16, while the sum of squares of the row at
// x_next accumulates into next_acc in lane_sum's order: its chain of dependent multiply-adds (one per 16 elements)
// then runs under this pass's work instead of alone before it. Full vectors unmasked, the tail masked. x_ahead (null:
// none), the row after x_next, is prefetched into L2 line by line, as normalize_row16 does for its next row: without
// it the memory sat idle while a row computed (4096 x 4096 on Zen 4, two threads: bf16 2.7-2.9 ms without,
// 2.4-2.6 ms with; fp32 5.2-6.0 ms and 4.8-5.3 ms).
//
// bf16 x and y (kPaired): the elementwise work runs 32 elements a step in pfp::load32's lane order, one widening and
// one narrowing operation a vector against load16/store16's two and three, w' laid out in that order (pair_order)
// over the row's whole 32-element steps; the sum of squares keeps its own loads in lane_sum's order. Each element's
// arithmetic is the same, so are its bits. A bf16 llama forward of 4096 rows of 4096 on Zen 4, two threads, took
// 0.85-0.95x the time from memory and 0.76-0.82x from cache (256 rows), old and new alternating in one process.
template <typename Tsrc, typename Tdst>
constexpr bool kPaired = std::is_same_v<Tsrc, bf16> && std::is_same_v<Tdst, bf16>;

// w' over [0, n) with each whole step of 32 in pfp::load32's lane order (lanes 0-15: elements 0-3, 8-11, 16-19,
// 24-27 of the step; lanes 16-31: the rest), the last n % 32 in place: what kPaired rows read.
inline void pair_order(float* w, int64_t n) {
  float step[32];
  for (int64_t c = 0; c + 32 <= n; c += 32) {
    for (int lane = 0; lane < 32; ++lane) {
      const int within = lane % 16;
      step[lane] = w[c + (within / 4) * 8 + (lane / 16) * 4 + within % 4];
    }
    std::copy(step, step + 32, w + c);
  }
}

template <int kMode, typename Tround, bool kBf16Ins, typename Tsrc, typename Tdst>
inline __m512 normalize_pass16(const Tsrc* __restrict x, Tdst* __restrict y, const float* __restrict w, float r,
                               int64_t n, const Tsrc* __restrict x_next, const Tsrc* x_ahead, bool stream) {
  const __m512 rv = _mm512_set1_ps(kMode == kNone ? pfp::round_to<Tround>(r) : r);
  __m512 next_acc = _mm512_setzero_ps();
  auto step = [&](int64_t i, __mmask16 valid) __attribute__((always_inline)) {
    if (x_ahead != nullptr && (i * int64_t(sizeof(Tsrc))) % 64 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(x_ahead + i), _MM_HINT_T1);
    const __m512 xn = pfp::load16(x_next + i, valid);
    next_acc = _mm512_mask_mov_ps(next_acc, valid, _mm512_fmadd_ps(xn, xn, next_acc));
    const __m512 xv = pfp::load16(x + i, valid), wv = _mm512_maskz_loadu_ps(valid, w + i);
    const __m512 yv = normalized16<Tround, kBf16Ins>(xv, wv, rv, kMode);
    pfp::put16_if<kBf16Ins>(y + i, valid, yv, stream);
  };
  int64_t i = 0;
  if constexpr (kPaired<Tsrc, Tdst>) {
    for (; i + 32 <= n; i += 32) {
      if (x_ahead != nullptr) _mm_prefetch(reinterpret_cast<const char*>(x_ahead + i), _MM_HINT_T1);
      const __m512 xn0 = pfp::load16(x_next + i), xn1 = pfp::load16(x_next + i + 16);
      next_acc = _mm512_fmadd_ps(xn1, xn1, _mm512_fmadd_ps(xn0, xn0, next_acc));
      __m512 lo, hi;
      pfp::load32(x + i, lo, hi);
      const __m512 y_lo = normalized16<Tround, kBf16Ins>(lo, _mm512_loadu_ps(w + i), rv, kMode);
      const __m512 y_hi = normalized16<Tround, kBf16Ins>(hi, _mm512_loadu_ps(w + i + 16), rv, kMode);
      pfp::put32_if<kBf16Ins>(y + i, y_lo, y_hi, stream);
    }
  }
  for (; i + 16 <= n; i += 16) step(i, __mmask16(0xFFFF));
  if (i < n) step(i, pfp::lanes16(n - i));
  return next_acc;
}

// Rows [0, rows) of the forward, each row's arithmetic exactly normalize_row16's: the sum of squares of each row
// after the first runs inside the previous row's normalize pass (the last pass re-sums its own row, unused).
// bf16 x only: one pass after the other was bound by that sum's chain there (64 bf16 rows of 4096 in L2 on one
// Zen 4 host thread: 78 us, 60 us overlapped), while fp32 rows, twice the bytes, gained nothing (48 us, 49 us).
template <int kMode, typename Tround, bool kBf16Ins, typename Tsrc, typename Tdst>
inline void normalize_rows16(const Tsrc* x, Tdst* y, const float* w, float* rstd, int64_t rows, int64_t n, double eps,
                             bool stream) {
  if (rows <= 0) return;
  float sum_sq = row_sum16(n, [&](__m512 acc, int64_t i, __mmask16 valid) {
    const __m512 v = pfp::load16(x + i, valid);
    return _mm512_fmadd_ps(v, v, acc);
  });
  for (int64_t row = 0; row < rows; ++row) {
    const float r = 1.0f / std::sqrt(sum_sq / float(n) + float(eps));
    const Tsrc* x_next = x + (row + 1 < rows ? row + 1 : row) * n;
    const Tsrc* x_ahead = row + 2 < rows ? x + (row + 2) * n : nullptr;
    sum_sq =
        fold16(normalize_pass16<kMode, Tround, kBf16Ins>(x + row * n, y + row * n, w, r, n, x_next, x_ahead, stream));
    rstd[row] = r;
  }
}

// R consecutive rows (1 or 2) of the backward, each row's arithmetic exactly backward_row's: R rows share each load
// of w and of the dw partial (added to row by row, in row order), and R dot chains run side by side. One row at a
// time was bound by the dot's chain of dependent multiply-adds and by w and dw streaming from L2 (x, dy, w and dw
// rows of 4096 overflow L1): a bf16 [4096, 4096] backward read 18 GB/s on the Zen 4 host. The second pass, which
// reads its rows from cache, prefetches the next ahead_rows rows of dy and x into L2: without it each pair of rows
// waited for memory in its first pass, then computed with the memory idle (bf16 4096 x 4096 on Zen 4, two threads:
// 5.3-5.4 ms without, 4.4-4.7 ms with; fp32 8.1 ms and 7.4-7.7 ms; into L1 fp32 lost, its rows overflowing it).
template <typename Tround, bool kBf16Ins, int R, typename Tsrc, typename Tgrad, typename Tdst>
inline void backward_rows16(const Tgrad* __restrict dy, const Tsrc* __restrict x, Tdst* __restrict dx,
                            float* __restrict dw, const float* __restrict w, const float* r, int64_t n, int mode,
                            int64_t ahead_rows, bool stream = false) {
  // Both passes: full vectors with a constant all-lanes mask (the compiler drops it: plain loads and stores, no
  // blend), then the masked tail.
  __m512 acc[R];
  for (int k = 0; k < R; ++k) acc[k] = _mm512_setzero_ps();
  auto dot_step = [&](int64_t i, __mmask16 valid) __attribute__((always_inline)) {  // row_sum16's order, per row
    const __m512 wv = _mm512_maskz_loadu_ps(valid, w + i);
    for (int k = 0; k < R; ++k) {
      const __m512 g = pfp::load16(dy + k * n + i, valid), xv = pfp::load16(x + k * n + i, valid);
      acc[k] = _mm512_mask_mov_ps(acc[k], valid, _mm512_fmadd_ps(_mm512_mul_ps(g, wv), xv, acc[k]));
    }
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) dot_step(i, __mmask16(0xFFFF));
  if (i < n) dot_step(i, pfp::lanes16(n - i));
  __m512 rv[R], coef[R];
  for (int k = 0; k < R; ++k) {
    rv[k] = _mm512_set1_ps(r[k]);
    coef[k] = _mm512_set1_ps(r[k] * r[k] * r[k] * fold16(acc[k]) / float(n));
  }
  // dx of rows [0, R) at [i, i + 16) into out (the next rows' lines prefetched, dw's columns there accumulated)
  auto dx_values = [&](int64_t i, __mmask16 valid, __m512* out) __attribute__((always_inline)) {
    for (int64_t k = 0; k < ahead_rows; ++k) {  // each 64-byte line once
      if ((i * int64_t(sizeof(Tgrad))) % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(dy + (R + k) * n + i), _MM_HINT_T1);
      if ((i * int64_t(sizeof(Tsrc))) % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(x + (R + k) * n + i), _MM_HINT_T1);
    }
    const __m512 wv = _mm512_maskz_loadu_ps(valid, w + i);
    __m512 dw_v = dw ? _mm512_maskz_loadu_ps(valid, dw + i) : _mm512_setzero_ps();
    for (int k = 0; k < R; ++k) {
      const __m512 g = pfp::load16(dy + k * n + i, valid), xv = pfp::load16(x + k * n + i, valid);
      if (dw) {
        const __m512 xr = _mm512_mul_ps(xv, rv[k]);
        const __m512 xn = mode == kGemma ? xr : pfp::round16_if<kBf16Ins, Tround>(xr);
        dw_v = _mm512_fmadd_ps(g, xn, dw_v);
      }
      out[k] = _mm512_fnmadd_ps(coef[k], xv, _mm512_mul_ps(_mm512_mul_ps(rv[k], g), wv));
    }
    if (dw) _mm512_mask_storeu_ps(dw + i, valid, dw_v);
  };
  auto dx_step = [&](int64_t i, __mmask16 valid) __attribute__((always_inline)) {
    __m512 out[R];
    dx_values(i, valid, out);
    for (int k = 0; k < R; ++k) {
      pfp::put16_if<kBf16Ins>(dx + k * n + i, valid, out[k], stream);
    }
  };
  i = 0;
  if constexpr (std::is_same_v<Tdst, bf16>) {  // 64-byte stores of bf16 dx, whole lines to stream
    for (; i + 32 <= n; i += 32) {
      __m512 first[R], second[R];
      dx_values(i, __mmask16(0xFFFF), first);
      dx_values(i + 16, __mmask16(0xFFFF), second);
      for (int k = 0; k < R; ++k) pfp::put16x2_if<kBf16Ins>(dx + k * n + i, first[k], second[k], stream);
    }
  }
  for (; i + 16 <= n; i += 16) dx_step(i, __mmask16(0xFFFF));
  if (i < n) dx_step(i, pfp::lanes16(n - i));
}
#endif

// One row: rstd and y from x; Tround is x's storage type (the casting modes round to it). The
// pointers are either the tensors themselves or, for fp16, fp32 row buffers (below).
template <typename Tround, bool kBf16Ins = false, typename C, typename Tsrc, typename Tdst>
inline C normalize_row(const Tsrc* __restrict x, Tdst* __restrict y, const C* __restrict w, int64_t n, double eps,
                       int mode, const Tsrc* x_ahead = nullptr, bool stream = false) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<C, float> && kVector16<Tsrc> && kVector16<Tdst>)
    return normalize_row16<Tround, kBf16Ins>(x, y, w, n, eps, mode, x_ahead, stream);
#endif
  auto xv = [&](int64_t i) { return pfp::to_compute<C>(x[i]); };
  const C sum_sq = pfp::lane_sum<C>(n, [&](int64_t i) { return xv(i) * xv(i); });
  const C r = C(1) / std::sqrt(sum_sq / C(n) + C(eps));
  if (mode == kLlama) {
    for (int64_t i = 0; i < n; ++i) y[i] = pfp::from_compute<Tdst>(w[i] * pfp::round_to<Tround>(xv(i) * r));
  } else if (mode == kGemma) {
    for (int64_t i = 0; i < n; ++i) y[i] = pfp::from_compute<Tdst>(xv(i) * r * w[i]);
  } else {
    const C r_x = pfp::round_to<Tround>(r);
    for (int64_t i = 0; i < n; ++i)
      y[i] = pfp::from_compute<Tdst>(
          pfp::round_to<Tround>(pfp::round_to<Tround>(xv(i) * r_x) * pfp::round_to<Tround>(w[i])));
  }
  return r;
}

// One row of the backward: dx from dy and x; dw (null: none) accumulates dy * xn.
template <typename Tround, bool kBf16Ins = false, typename C, typename Tsrc, typename Tgrad, typename Tdst>
inline void backward_row(const Tgrad* __restrict dy, const Tsrc* __restrict x, Tdst* __restrict dx, C* __restrict dw,
                         const C* __restrict w, C r, int64_t n, int mode) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<C, float> && kVector16<Tsrc> && kVector16<Tgrad> && kVector16<Tdst>) {
    backward_rows16<Tround, kBf16Ins, 1>(dy, x, dx, dw, w, &r, n, mode, 0);
    return;
  }
#endif
  auto xv = [&](int64_t i) { return pfp::to_compute<C>(x[i]); };
  auto gv = [&](int64_t i) { return pfp::to_compute<C>(dy[i]); };
  const C dot = pfp::lane_sum<C>(n, [&](int64_t i) { return gv(i) * w[i] * xv(i); });
  const C coef = r * r * r * dot / C(n);
  if (dw) {
    if (mode == kGemma) {
      for (int64_t i = 0; i < n; ++i) dw[i] += gv(i) * (xv(i) * r);
    } else {
      for (int64_t i = 0; i < n; ++i) dw[i] += gv(i) * pfp::round_to<Tround>(xv(i) * r);
    }
  }
  for (int64_t i = 0; i < n; ++i) dx[i] = pfp::from_compute<Tdst>(r * gv(i) * w[i] - coef * xv(i));
}

// fp16 rows go through fp32 buffers: F16C conversions vectorize in load_row/store_row, not inline.
template <typename T>
constexpr bool kBuffered = std::is_same<T, half>::value;

// Rows [begin, end) of the forward, unbuffered types.
template <bool kBf16Ins, typename Tx, typename Ty, typename C>
inline void forward_rows(const Tx* x, Ty* y, const C* w, C* rstd, int64_t begin, int64_t end, int64_t n, double eps,
                         int mode, bool stream) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<C, float> && std::is_same_v<Tx, bf16> && kVector16<Ty>) {
    x += begin * n, y += begin * n, rstd += begin;
    if (mode == kLlama) return normalize_rows16<kLlama, Tx, kBf16Ins>(x, y, w, rstd, end - begin, n, eps, stream);
    if (mode == kGemma) return normalize_rows16<kGemma, Tx, kBf16Ins>(x, y, w, rstd, end - begin, n, eps, stream);
    return normalize_rows16<kNone, Tx, kBf16Ins>(x, y, w, rstd, end - begin, n, eps, stream);
  }
#endif
  for (int64_t row = begin; row < end; ++row)
    rstd[row] = normalize_row<Tx, kBf16Ins>(x + row * n, y + row * n, w, n, eps, mode,
                                            row + 1 < end ? x + (row + 1) * n : nullptr, stream);
}

#if defined(__AVX512F__)
// forward_rows and backward_rows of bf16 x with AVX512-BF16 roundings: flatten inlines the rows, and the roundings
// into them, under this target. Only where pfp::avx512_bf16_in_use().
template <typename Ty>
__attribute__((target("avx512bf16"), flatten)) void forward_rows_bf16ins(const bf16* x, Ty* y, const float* w,
                                                                         float* rstd, int64_t begin, int64_t end,
                                                                         int64_t n, double eps, int mode, bool stream) {
  forward_rows<true>(x, y, w, rstd, begin, end, n, eps, mode, stream);
}
#endif

// x: [rows, n] of Tx, y: [rows, n] of Ty, rstd: [rows] of the compute type; all contiguous.
template <typename Tx, typename Ty>
void forward_impl(const Tx* x, const void* weight, int weight_dtype, Ty* y, void* rstd_out, int64_t rows, int64_t n,
                  double eps, double offset, int mode, int nthreads) {
  using C = typename pfp::Compute<Tx>::type;
  std::vector<C> w(n);
  load_weight(weight, weight_dtype, offset, n, w.data());
  const C* wp = w.data();
  C* rstd = static_cast<C*>(rstd_out);
#if defined(__AVX512F__)
  if constexpr (kPaired<Tx, Ty>) {
    pair_order(w.data(), n);
  }
  const bool stream = pfp::streams(rows * n * int64_t(sizeof(Ty)));
  if constexpr (std::is_same_v<Tx, bf16>) {
    if (pfp::avx512_bf16_in_use()) {
      pfp::parallel_for(rows, 3 * n, nthreads, [&](int64_t begin, int64_t end, int) {
        forward_rows_bf16ins(x, y, wp, rstd, begin, end, n, eps, mode, stream);
        if (stream) pfp::stream_fence();
      });
      return;
    }
  }
#else
  const bool stream = false;
#endif
  pfp::parallel_for(rows, 3 * n, nthreads, [&](int64_t begin, int64_t end, int) {
    if constexpr (kBuffered<Tx>) {
      std::vector<C> xs(n), ys(n);
      for (int64_t row = begin; row < end; ++row) {
        pfp::load_row(x + row * n, xs.data(), n);
        rstd[row] = normalize_row<Tx>(xs.data(), ys.data(), wp, n, eps, mode);
        pfp::store_row(ys.data(), y + row * n, n);
      }
    } else {
      forward_rows<false>(x, y, wp, rstd, begin, end, n, eps, mode, stream);
#if defined(__AVX512F__)
      if (stream) pfp::stream_fence();
#endif
    }
  });
}

constexpr int64_t kRowsPerPartial = 16;  // at least, so that small batches do not pay a partial per row
constexpr int64_t kMaxPartials = 256;    // at most: the threads that can share one backward

// Rows [begin, end) of the backward: dx, and dw (when not null) accumulates; fp16 rows through fp32 buffers.
template <typename Tx, bool kBf16Ins = false, typename Tdy, typename C>
inline void backward_rows(const Tdy* dy, const Tx* x, Tx* dx, C* dw, const C* w, const C* rstd, int64_t begin,
                          int64_t end, int64_t n, int mode, bool stream = false) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<C, float> && kVector16<Tx> && kVector16<Tdy>) {
    int64_t row = begin;
    for (; row + 2 <= end; row += 2)
      backward_rows16<Tx, kBf16Ins, 2>(dy + row * n, x + row * n, dx + row * n, dw, w, rstd + row, n, mode,
                                       std::min<int64_t>(2, end - row - 2), stream);
    if (row < end)
      backward_rows16<Tx, kBf16Ins, 1>(dy + row * n, x + row * n, dx + row * n, dw, w, rstd + row, n, mode, 0, stream);
    return;
  }
#endif
  const int64_t buffered = kBuffered<Tx> ? n : 0;
  std::vector<C> xs(buffered), gs(buffered), dxs(buffered);
  for (int64_t row = begin; row < end; ++row) {
    if constexpr (kBuffered<Tx>) {
      pfp::load_row(x + row * n, xs.data(), n);
      pfp::load_row(dy + row * n, gs.data(), n);
      backward_row<Tx>(gs.data(), xs.data(), dxs.data(), dw, w, rstd[row], n, mode);
      pfp::store_row(dxs.data(), dx + row * n, n);
    } else {
      backward_row<Tx, kBf16Ins>(dy + row * n, x + row * n, dx + row * n, dw, w, rstd[row], n, mode);
    }
  }
}

#if defined(__AVX512F__)
template <typename Tdy>
__attribute__((target("avx512bf16"), flatten)) void backward_rows_bf16ins(const Tdy* dy, const bf16* x, bf16* dx,
                                                                          float* dw, const float* w, const float* rstd,
                                                                          int64_t begin, int64_t end, int64_t n,
                                                                          int mode, bool stream) {
  backward_rows<bf16, true>(dy, x, dx, dw, w, rstd, begin, end, n, mode, stream);
}
#endif

// backward_rows, by backward_rows_bf16ins where that applies.
template <typename Tx, typename Tdy, typename C>
inline void backward_rows_any(const Tdy* dy, const Tx* x, Tx* dx, C* dw, const C* w, const C* rstd, int64_t begin,
                              int64_t end, int64_t n, int mode, bool bf16ins, bool stream) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Tx, bf16>) {
    if (bf16ins) return backward_rows_bf16ins(dy, x, dx, dw, w, rstd, begin, end, n, mode, stream);
  }
#endif
  backward_rows<Tx>(dy, x, dx, dw, w, rstd, begin, end, n, mode, stream);
}

// dy: [rows, n] of Tdy, x: [rows, n] of Tx, dx: [rows, n] of Tx; dw_out: [n] of the compute type (fp32;
// fp64 for fp64 x), or null when the weight needs no gradient.
template <typename Tx, typename Tdy>
void backward_impl(const Tdy* dy, const Tx* x, const void* weight, int weight_dtype, const void* rstd_in, Tx* dx,
                   void* dw_out, int64_t rows, int64_t n, double offset, int mode, int nthreads) {
  using C = typename pfp::Compute<Tx>::type;
  std::vector<C> w(n);
  load_weight(weight, weight_dtype, offset, n, w.data());
  const C* wp = w.data();
  const C* rstd = static_cast<const C*>(rstd_in);
  C* dw = static_cast<C*>(dw_out);
  const bool bf16ins = pfp::avx512_bf16_in_use();
#if defined(__AVX512F__)
  const bool stream = pfp::streams(rows * n * int64_t(sizeof(Tx)));  // dx streams past the caches (common.h)
#else
  const bool stream = false;
#endif
  if (!dw) {
    pfp::parallel_for(rows, 5 * n, nthreads, [&](int64_t begin, int64_t end, int) {
      backward_rows_any<Tx>(dy, x, dx, static_cast<C*>(nullptr), wp, rstd, begin, end, n, mode, bf16ins, stream);
#if defined(__AVX512F__)
      if (stream) pfp::stream_fence();
#endif
    });
    return;
  }
  const int64_t wanted = (rows + kRowsPerPartial - 1) / kRowsPerPartial;
  const int64_t partials = wanted < kMaxPartials ? (wanted > 0 ? wanted : 1) : kMaxPartials;
  // each partial row is zeroed by the thread that sums into it (no value-initialized vector: one pass fewer)
  std::unique_ptr<C[]> scratch(partials > 1 ? new C[size_t(partials) * size_t(n)] : nullptr);
  C* partial_rows = partials > 1 ? scratch.get() : dw;
  const int64_t work_per_partial = 5 * n * ((rows + partials - 1) / partials);
  pfp::parallel_for(partials, work_per_partial, nthreads, [&](int64_t first, int64_t last, int) {
    for (int64_t p = first; p < last; ++p) {
      C* partial = partial_rows + p * n;
      std::fill(partial, partial + n, C(0));
      int64_t begin, end;
      pfp::split_range(rows, int(p), int(partials), begin, end);
      backward_rows_any<Tx>(dy, x, dx, partial, wp, rstd, begin, end, n, mode, bf16ins, stream);
    }
#if defined(__AVX512F__)
    if (stream) pfp::stream_fence();
#endif
  });
  if (partials == 1) return;
  pfp::parallel_for(n, partials, nthreads, [&](int64_t begin, int64_t end, int) {
    std::copy(partial_rows + begin, partial_rows + end, dw + begin);
    for (int64_t p = 1; p < partials; ++p) {
      const C* partial = partial_rows + p * n;
      for (int64_t i = begin; i < end; ++i) dw[i] += partial[i];
    }
  });
}

[[noreturn]] void unsupported(const char* what) {
  throw std::invalid_argument(std::string("rmsnorm: unsupported dtype combination: ") + what);
}

}  // namespace

// rmsnorm_forward: y[rows, n] = rmsnorm(x[rows, n]) scaled by (offset + weight[n]); rstd[rows] in the
// compute type (fp32; fp64 for fp64 x).
// x, y: contiguous rows. dtypes (pfp::DType): y_dtype == x_dtype, or y fp32 with x fp16/bf16
// (the llama mode's promotion with an fp32 weight); weight any of the four. casting_mode 0 llama,
// 1 gemma, 2 none.
void rmsnorm_forward(const void* x, const void* weight, void* y, void* rstd, int64_t rows, int64_t n, int x_dtype,
                     int weight_dtype, int y_dtype, double eps, double offset, int casting_mode, int nthreads) {
#define PFP_RMS_FWD(TX, TY)                                                                                      \
  forward_impl(static_cast<const TX*>(x), weight, weight_dtype, static_cast<TY*>(y), rstd, rows, n, eps, offset, \
               casting_mode, nthreads)
  if (x_dtype == y_dtype) {
    switch (x_dtype) {
      case pfp::kFloat32: PFP_RMS_FWD(float, float); return;
      case pfp::kFloat16: PFP_RMS_FWD(half, half); return;
      case pfp::kBFloat16: PFP_RMS_FWD(bf16, bf16); return;
      case pfp::kFloat64: PFP_RMS_FWD(double, double); return;
    }
  } else if (y_dtype == pfp::kFloat32) {
    switch (x_dtype) {
      case pfp::kFloat16: PFP_RMS_FWD(half, float); return;
      case pfp::kBFloat16: PFP_RMS_FWD(bf16, float); return;
    }
  }
#undef PFP_RMS_FWD
  unsupported("forward");
}

// rmsnorm_backward: dx[rows, n] (x's dtype) from dy[rows, n] (dy_dtype: the forward's y dtype), x,
// weight[n], rstd[rows] (compute type) saved by the forward. dw: null, or [num_partials, n] of fp32 (fp64 for fp64
// x) that the kernel overwrites with dW, the same bits for any nthreads (the order of its sum above): it reduces
// over its threads itself, so num_partials is 1 (the CUDA kernel's partial rows are what the caller sums).
void rmsnorm_backward(const void* dy, const void* x, const void* weight, const void* rstd, void* dx, void* dw,
                      int64_t rows, int64_t n, int x_dtype, int weight_dtype, int dy_dtype, double offset,
                      int casting_mode, int64_t num_partials, int nthreads) {
  if (dw != nullptr && num_partials != 1) throw std::invalid_argument("rmsnorm_backward: num_partials must be 1");
#define PFP_RMS_BWD(TX, TDY)                                                                        \
  backward_impl(static_cast<const TDY*>(dy), static_cast<const TX*>(x), weight, weight_dtype, rstd, \
                static_cast<TX*>(dx), dw, rows, n, offset, casting_mode, nthreads)
  if (x_dtype == dy_dtype) {
    switch (x_dtype) {
      case pfp::kFloat32: PFP_RMS_BWD(float, float); return;
      case pfp::kFloat16: PFP_RMS_BWD(half, half); return;
      case pfp::kBFloat16: PFP_RMS_BWD(bf16, bf16); return;
      case pfp::kFloat64: PFP_RMS_BWD(double, double); return;
    }
  } else if (dy_dtype == pfp::kFloat32) {
    switch (x_dtype) {
      case pfp::kFloat16: PFP_RMS_BWD(half, float); return;
      case pfp::kBFloat16: PFP_RMS_BWD(bf16, float); return;
    }
  }
#undef PFP_RMS_BWD
  unsupported("backward");
}

}  // namespace PFP_ISA
