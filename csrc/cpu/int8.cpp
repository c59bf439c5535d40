// LLM.int8 on the CPU: vector-wise int8 quantization with outlier columns, the int32 -> float matmul
// epilogue, a fused int8 GEMV for decode, and weight dequantization.
//
// Math (pyfastpeft/reference/int8.py is the oracle; every step in fp32, in this order):
//   row-wise:    row_stats[r] = max |x[r, c]| over !(|x[r, c]| >= t)        (t = +inf when threshold <= 0)
//                q[r, c] = round_half_even(x[r, c] * ((1 / row_stats[r]) * 127)), 0 in outlier columns
//                (torch evaluates bitsandbytes' `127.0 / row_stats` as reciprocal, then multiply)
//   column-wise: col_stats[c] = the same max down column c;  q[r, c] = round_half_even((x[r, c] * 127) / col_stats[c]),
//                0 at outlier elements
//   a non-finite scaled value (x / 0, inf * 0, NaN) codes as 0; the stat keeps its inf / NaN.
//   outlier column c <=> some |x[r, c]| >= t.
//   epilogue:    out[r, j] = float(C[r, j]) * (row_stats[r] * col_stats[j]) * fp32(1 / 127^2) (+ addend[r, j]) (+
//   bias[j])
// Rounding to nearest even uses (s + 1.5 * 2^23) - 1.5 * 2^23, exact for |s| < 2^22 under the default rounding
// mode; |s| <= 127 here once non-finite values are zeroed.
#include "cpu/amx.h"
#include "cpu/common.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace PFP_ISA {
namespace {

using pfp::bf16;
using pfp::half;
using pfp::parallel_for;

constexpr float kMmDequantScale = 1.0f / 16129.0f;      // 1/127^2 (bitsandbytes' 6.200124e-05 is 1.8e-5 too large)
constexpr float kDequantScale = 7.874015718698502e-3f;  // bitsandbytes' 1/127
constexpr float kRoundMagic = 12582912.0f;              // 1.5 * 2^23

// round_half_even(s) as an int8 code; non-finite s -> 0; |s| > 127 clamps (only reachable through rounding).
inline int8_t to_code(float s) {
  s = (s - s == 0.0f) ? s : 0.0f;
  float r = (s + kRoundMagic) - kRoundMagic;
  r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
  return int8_t(int32_t(r));
}

// max over i of value(i), propagating NaN, in 16 interleaved lanes so it vectorizes.
template <typename F>
inline float lane_max(int64_t n, F&& value) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) {
      float v = value(i + j);
      acc[j] = (v > acc[j] || v != v) ? v : acc[j];
    }
  for (int j = 0; i < n; ++i, ++j) {
    float v = value(i);
    acc[j] = (v > acc[j] || v != v) ? v : acc[j];
  }
  float best = 0.0f;
  for (int j = 0; j < 16; ++j) best = (acc[j] > best || acc[j] != acc[j]) ? acc[j] : best;
  return best;
}

// A row of x as fp32: the row itself for fp32, else converted into `buffer`.
template <typename T>
inline const float* row_as_float(const T* row, int64_t k, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    pfp::load_row<T, float>(row, buffer, k);
    return buffer;
  }
}

// The row the row-wise passes read: x's own row where they load its storage type (AVX-512), else row_as_float
// (`buffer` holds k floats where kPassNeedsBuffer).
template <typename T>
inline auto pass_row(const T* row, int64_t k, float* buffer) {
#if defined(__AVX512F__)
  (void)k, (void)buffer;
  return row;
#else
  return row_as_float(row, k, buffer);
#endif
}

template <typename T>
constexpr bool kPassNeedsBuffer =
#if defined(__AVX512F__)
    false;
#else
    !std::is_same_v<T, float>;
#endif

// max |row[c]| over !(|row[c]| >= t) (every c when !find), NaN-propagating; with find, flags[c] |= 1 where
// |row[c]| >= t. R: float, or (AVX-512) bf16 / fp16, widened exactly. ahead (null: none): a row of R as long as
// this one, prefetched into L2 (AVX-512 only).
template <typename R>
float row_absmax(const R* row, int64_t k, float t, bool find, uint8_t* flags, const void* ahead = nullptr) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<R, pfp::bf16>) {  // 32 lanes of 16-bit magnitudes, no widening
    const __m512i limit = _mm512_set1_epi16(int16_t(find ? pfp::bf16_magnitude_at_least(t) : 0));
    const __m512i infinity = _mm512_set1_epi16(0x7F80);
    __m512i best = _mm512_setzero_si512();
    for (int64_t c = 0; c < k; c += 32) {
      if (ahead != nullptr) _mm_prefetch(static_cast<const char*>(ahead) + c * int64_t(sizeof(R)), _MM_HINT_T1);
      const __mmask32 m = pfp::lanes32(k - c);
      const __m512i a = pfp::magnitude_bits32(row + c, m);
      __mmask32 counted = 0xFFFFFFFFu;  // lanes past k read as 0
      if (find) {                       // a >= limit and not NaN
        const __mmask32 outlier = _mm512_mask_cmple_epu16_mask(_mm512_mask_cmpge_epu16_mask(m, a, limit), a, infinity);
        if (outlier) _mm256_mask_storeu_epi8(flags + c, outlier, _mm256_set1_epi8(1));
        counted = __mmask32(~outlier);
      }
      best = _mm512_mask_max_epu16(best, counted, best, a);
    }
    return pfp::magnitude_max(pfp::widen_magnitudes(_mm512_setzero_si512(), best));
  }
  const __m512 limit = _mm512_set1_ps(t);
  __m512i best = _mm512_setzero_si512();  // magnitude bits of the counted lanes (pfp::magnitude_bits)
  for (int64_t c = 0; c < k; c += 16) {
    if (ahead != nullptr && (c * int64_t(sizeof(R))) % 64 == 0)
      _mm_prefetch(static_cast<const char*>(ahead) + c * int64_t(sizeof(R)), _MM_HINT_T1);
    const __mmask16 m = pfp::lanes16(k - c);
    const __m512i a = pfp::magnitude_bits(pfp::load16(row + c, m));
    __mmask16 counted = 0xFFFF;  // lanes past k read as 0
    if (find) {
      const __mmask16 outlier = _mm512_mask_cmp_ps_mask(m, _mm512_castsi512_ps(a), limit, _CMP_GE_OQ);
      if (outlier) {
        const __m128i old = _mm_maskz_loadu_epi8(m, flags + c);
        _mm_mask_storeu_epi8(flags + c, m, _mm_mask_mov_epi8(old, outlier, _mm_set1_epi8(1)));
      }
      counted = __mmask16(~outlier);
    }
    best = _mm512_mask_max_epu32(best, counted, best, a);
  }
  return pfp::magnitude_max(best);
#else
  static_assert(std::is_same_v<R, float>, "rows reach the portable passes as fp32");
  if (find)
    for (int64_t c = 0; c < k; ++c) flags[c] |= uint8_t(std::fabs(row[c]) >= t);
  return lane_max(k, [&](int64_t c) {
    float a = std::fabs(row[c]);
    return (find && a >= t) ? 0.0f : a;
  });
#endif
}

// out[c] = round_half_even(row[c] * scale) as int8 (non-finite -> 0, clamped to [-127, 127]), for a row whose
// stat (max |row| over its counted elements) gave scale. R as for row_absmax. In columns of outliers (|row[c]| >= t,
// not counted in stat) the code is left unspecified: quant_rows zeroes those columns after.
template <typename R>
void row_codes(const R* row, int64_t k, float stat, float scale, int8_t* out) {
#if defined(__AVX512F__)
  const __m512 vscale = _mm512_set1_ps(scale);
  // With stat and scale finite, every counted |row[c] * scale| <= 127 (1 + 2^-22): finite, and it rounds into
  // [-127, 127], so the conversion alone (nearest even under the default rounding mode) is to_code.
  if (std::isfinite(stat) && std::isfinite(scale)) {
    pfp::store_codes(row, k, out, [&](__m512 v) { return _mm512_cvtps_epi32(_mm512_mul_ps(v, vscale)); });
    return;
  }
  pfp::store_codes(row, k, out, [&](__m512 v) {  // to_code in lanes
    const __m512 s = _mm512_mul_ps(v, vscale);
    const __mmask16 finite =
        _mm512_cmp_ps_mask(_mm512_abs_ps(s), _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_LT_OQ);
    const __m512 r =
        _mm512_roundscale_ps(_mm512_maskz_mov_ps(finite, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f)));
  });
#else
  static_assert(std::is_same_v<R, float>, "rows reach the portable passes as fp32");
  (void)stat;
  for (int64_t c = 0; c < k; ++c) out[c] = to_code(row[c] * scale);
#endif
}

// The row after r (of rows [.., end)) for row_absmax to prefetch into L2 line by line, where the row-wise passes
// read x itself: each row is read twice (its max, then its codes from cache), and without it the memory sat idle
// during the codes (4096 x 4096, outliers at 6.0, two threads on Zen 4, a script's medians: fp32 3.9-4.5 to
// 3.3-3.8 ms, bf16 2.4-2.9 to 2.0-2.5 ms).
template <typename T>
inline const T* ahead_row(const T* x, int64_t r, int64_t end, int64_t k) {
  if (kPassNeedsBuffer<T> || r + 1 >= end) return nullptr;
  return x + (r + 1) * k;
}

template <typename T>
void quant_rows(const T* x, int8_t* q, float* row_stats, uint8_t* outlier_flags, int64_t m, int64_t k, float threshold,
                int nthreads) {
  const bool find_outliers = threshold > 0.0f;
  std::memset(outlier_flags, 0, size_t(k));

  auto code_row = [&](const auto* row, int64_t r) {
    const float stat = row_stats[r];
    const float scale = stat == 0.0f ? 0.0f : (1.0f / stat) * 127.0f;  // torch's 127.0 / tensor
    row_codes(row, k, stat, scale, q + r * k);
  };

  if (!find_outliers) {  // one pass: the row stays in L1/L2 between its max and its codes
    parallel_for(m, k, nthreads, [&](int64_t begin, int64_t end, int) {
      std::vector<float> buffer(kPassNeedsBuffer<T> ? size_t(k) : 0);
      for (int64_t r = begin; r < end; ++r) {
        const auto* row = pass_row(x + r * k, k, buffer.data());
        row_stats[r] = row_absmax(row, k, 0.0f, false, nullptr, ahead_row(x, r, end, k));
        code_row(row, r);
      }
    });
    return;
  }

  // Outlier columns are known only after every row was seen. A row's stat and the codes of its other columns
  // do not depend on them, so each row is coded while it is in cache (its outliers' codes are unspecified), and
  // the flagged columns are zeroed in a last sparse pass.
  int team = nthreads < 1 ? 1 : nthreads;
  std::vector<uint8_t> flags(size_t(team) * size_t(k), 0);
  parallel_for(m, k, nthreads, [&](int64_t begin, int64_t end, int tid) {
    std::vector<float> buffer(kPassNeedsBuffer<T> ? size_t(k) : 0);
    uint8_t* mine = flags.data() + size_t(tid) * size_t(k);
    for (int64_t r = begin; r < end; ++r) {
      const auto* row = pass_row(x + r * k, k, buffer.data());
      row_stats[r] = row_absmax(row, k, threshold, true, mine, ahead_row(x, r, end, k));
      code_row(row, r);
    }
  });
  std::vector<int64_t> outlier_columns;
  for (int64_t c = 0; c < k; ++c) {
    for (int i = 0; i < team; ++i) outlier_flags[c] |= flags[size_t(i) * size_t(k) + size_t(c)];
    if (outlier_flags[c]) outlier_columns.push_back(c);
  }
  if (outlier_columns.empty()) return;
  parallel_for(m, int64_t(outlier_columns.size()), nthreads, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t c : outlier_columns) q[r * k + c] = 0;
  });
}

template <typename T>
void quant_cols(const T* x, int8_t* q, float* col_stats, uint8_t* outlier_flags, int64_t m, int64_t k, float threshold,
                int nthreads) {
  const bool find_outliers = threshold > 0.0f;
  const float t = threshold;
  // Pass 1: each thread owns a slice of columns and walks every row over it.
  parallel_for(k, m, nthreads, [&](int64_t begin, int64_t end, int) {
    const int64_t width = end - begin;
    std::vector<float> best(static_cast<size_t>(width), 0.0f), buffer(static_cast<size_t>(width));
    std::vector<uint8_t> outlier(static_cast<size_t>(width), 0);
    for (int64_t r = 0; r < m; ++r) {
      const float* row = row_as_float(x + r * k + begin, width, buffer.data());
      for (int64_t c = 0; c < width; ++c) {
        float a = std::fabs(row[c]);
        bool is_outlier = find_outliers && a >= t;
        outlier[c] |= uint8_t(is_outlier);
        a = is_outlier ? 0.0f : a;
        best[c] = (a > best[c] || a != a) ? a : best[c];
      }
    }
    for (int64_t c = 0; c < width; ++c) {
      col_stats[begin + c] = best[c];
      outlier_flags[begin + c] = outlier[c];
    }
  });
  // Pass 2: codes row by row.
  parallel_for(m, k, nthreads, [&](int64_t begin, int64_t end, int) {
    std::vector<float> buffer(std::is_same_v<T, float> ? 0 : size_t(k));
    for (int64_t r = begin; r < end; ++r) {
      const float* row = row_as_float(x + r * k, k, buffer.data());
      int8_t* out = q + r * k;
      for (int64_t c = 0; c < k; ++c) {
        int8_t code = to_code((row[c] * 127.0f) / col_stats[c]);
        out[c] = (find_outliers && std::fabs(row[c]) >= t) ? int8_t(0) : code;
      }
    }
  });
}

template <typename F>
void with_float_type(int dtype, F&& body) {
  switch (dtype) {
    case pfp::kFloat32: body(static_cast<float*>(nullptr)); break;
    case pfp::kFloat16: body(static_cast<half*>(nullptr)); break;
    default: body(static_cast<bf16*>(nullptr)); break;
  }
}

inline float load_as_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case pfp::kFloat32: return static_cast<const float*>(p)[i];
    case pfp::kFloat16: return pfp::to_float(static_cast<const half*>(p)[i]);
    default: return pfp::to_float(static_cast<const bf16*>(p)[i]);
  }
}

// One row of the epilogue: out[j] = float(acc[j]) * (row_stat * col_stats[j]) * 1/127^2 (+ addend[j]) (+ bias[j]).
template <typename T>
void epilogue_row(const int32_t* acc, float row_stat, const float* col_stats, const float* bias, const float* addend,
                  T* out, int64_t n, float* buffer) {
  for (int64_t j = 0; j < n; ++j) {
    float v = float(acc[j]) * (row_stat * col_stats[j]) * kMmDequantScale;
    if (addend) v += addend[j];
    if (bias) v += bias[j];
    buffer[j] = v;
  }
  pfp::store_row<T, float>(buffer, out, n);
}

std::vector<float> bias_as_float(const void* bias, int bias_dtype, int64_t n) {
  std::vector<float> values;
  if (bias) {
    values.resize(size_t(n));
    for (int64_t j = 0; j < n; ++j) values[size_t(j)] = load_as_float(bias, bias_dtype, j);
  }
  return values;
}

// ---- GEMV: sum_c q[r, c] * w[j, c] for up to 8 rows, each weight byte read once --------------------------

// Portable: widening int32 multiply-adds, which the compiler turns into vpmaddwd-style code.
int32_t dot_i8(const int8_t* a, const int8_t* b, int64_t k) {
  int32_t acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= k; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += int32_t(a[i + j]) * int32_t(b[i + j]);
  for (int j = 0; i < k; ++i, ++j) acc[j] += int32_t(a[i]) * int32_t(b[i]);
  int32_t total = 0;
  for (int j = 0; j < 16; ++j) total += acc[j];
  return total;
}

void gemv_portable(const int8_t* q, const int8_t* w, int32_t* acc, int64_t m, int64_t j0, int64_t j1, int64_t n,
                   int64_t k) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t r = 0; r < m; ++r) acc[r * n + j] = dot_i8(q + r * k, w + j * k, k);
}

#if defined(__AVX512F__)
// vpdpbusd multiplies unsigned by signed bytes: with u = w + 128 (w ^ 0x80 as a byte),
//   sum_c q[c] w[c] = sum_c u[c] q[c] - 128 * sum_c q[c],
// where sum_c q[c] is one number per row of x (q_sums, the caller's), not per row of W. No int32 overflow for
// k <= 65536: |sum u q| <= 255 * 128 * 65536 < 2^31. Two weight rows per step share each load of x. Whole 64-byte
// steps load without a mask (a masked zmm load took 2.3 times a plain one's issue slot on Zen 4, in a standalone
// loop); only the tail is masked.
constexpr int64_t kGemvPrefetchRows = 8, kGemvFarPrefetchRows = 64;  // rows ahead into L1, into L2

// One step of 64 columns from c: a, b the two W rows' bytes as u, x the same columns of q's rows (a full mask
// loads them plainly; the tail's masked lanes are 0 in x and add nothing).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void gemv_vnni_step(
    const int8_t* q, int64_t k, int64_t c, __mmask64 mask, __m512i a, __m512i b, __m512i (&sum0)[M],
    __m512i (&sum1)[M]) {
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    const __m512i xv =
        mask == ~__mmask64(0) ? _mm512_loadu_si512(q + r * k + c) : _mm512_maskz_loadu_epi8(mask, q + r * k + c);
    sum0[r] = _mm512_dpbusd_epi32(sum0[r], a, xv);
    sum1[r] = _mm512_dpbusd_epi32(sum1[r], b, xv);
  }
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void gemv_vnni_rows(const int8_t* q, const int32_t* q_sums,
                                                                           const int8_t* w, int32_t* acc, int64_t j0,
                                                                           int64_t j1, int64_t n, int64_t k) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int64_t j = j0; j < j1; j += 2) {
    const bool pair = j + 1 < j1;
    const int8_t* w0 = w + j * k;
    const int8_t* w1 = pair ? w0 + k : w0;
    __m512i sum0[M], sum1[M];
    for (int r = 0; r < M; ++r) sum0[r] = sum1[r] = _mm512_setzero_si512();
    int64_t c = 0;
    for (; c + 64 <= k; c += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + kGemvPrefetchRows * k + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + kGemvPrefetchRows * k + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w0 + kGemvFarPrefetchRows * k + c), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + kGemvFarPrefetchRows * k + c), _MM_HINT_T1);
      gemv_vnni_step<M>(q, k, c, ~__mmask64(0), _mm512_xor_si512(_mm512_loadu_si512(w0 + c), flip),
                        _mm512_xor_si512(_mm512_loadu_si512(w1 + c), flip), sum0, sum1);
    }
    if (c < k) {
      const __mmask64 mask = pfp::lanes64(k - c);
      gemv_vnni_step<M>(q, k, c, mask, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w0 + c), flip),
                        _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w1 + c), flip), sum0, sum1);
    }
    for (int r = 0; r < M; ++r) {
      acc[r * n + j] = _mm512_reduce_add_epi32(sum0[r]) - 128 * q_sums[r];
      if (pair) acc[r * n + j + 1] = _mm512_reduce_add_epi32(sum1[r]) - 128 * q_sums[r];
    }
  }
}

// sums[r] = sum_c q[r, c], the correction term of gemv_vnni_rows (vpdpbusd of a vector of ones with q's bytes).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void row_sums_vnni(const int8_t* q, int64_t m, int64_t k,
                                                                          int32_t* sums) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t r = 0; r < m; ++r) {
    __m512i total = _mm512_setzero_si512();
    for (int64_t c = 0; c < k; c += 64)
      total = _mm512_dpbusd_epi32(total, ones, _mm512_maskz_loadu_epi8(pfp::lanes64(k - c), q + r * k + c));
    sums[r] = _mm512_reduce_add_epi32(total);
  }
}

void gemv_vnni(const int8_t* q, const int32_t* q_sums, const int8_t* w, int32_t* acc, int64_t m, int64_t j0, int64_t j1,
               int64_t n, int64_t k) {
  switch (m) {
    case 1: gemv_vnni_rows<1>(q, q_sums, w, acc, j0, j1, n, k); break;
    case 2: gemv_vnni_rows<2>(q, q_sums, w, acc, j0, j1, n, k); break;
    case 3: gemv_vnni_rows<3>(q, q_sums, w, acc, j0, j1, n, k); break;
    case 4: gemv_vnni_rows<4>(q, q_sums, w, acc, j0, j1, n, k); break;
    case 5: gemv_vnni_rows<5>(q, q_sums, w, acc, j0, j1, n, k); break;
    case 6: gemv_vnni_rows<6>(q, q_sums, w, acc, j0, j1, n, k); break;
    case 7: gemv_vnni_rows<7>(q, q_sums, w, acc, j0, j1, n, k); break;
    default: gemv_vnni_rows<8>(q, q_sums, w, acc, j0, j1, n, k); break;
  }
}

#endif

// ---- GEMM on AMX tiles (cpu/amx.h): C[m, n] = sum_c a[m, c] * b[n, c], int8 x int8 -> int32 ------------------
//
// One TDPBSSD multiplies a 16 x 64 int8 tile of a by the "VNNI" tile of b^T whose row r holds, for each of 16
// columns j, the 4 bytes b[j, 4r .. 4r + 3]: the transpose of a 16 x 16 matrix of b's dwords. Zero padding adds
// nothing to a sum, so edges are exact. Accumulation is int32: exact for k <= 65536 (128 * 128 * 65536 = 2^30).
#if PFP_HAS_AMX
void amx_matmul(const int8_t* a, const int8_t* b, int32_t* c, int64_t m, int64_t n, int64_t k, int nthreads) {
  const int64_t steps = (k + 63) / 64;
  const amx::PackedA a_tiles(a, m, k, steps, nthreads);
  auto pack_b = [&](int64_t n0, int64_t groups, int8_t* panel) {
    __m512i rows[16];
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t s = 0; s < steps; ++s) {
        for (int j = 0; j < 16; ++j) rows[j] = amx::load_step(b, n, k, n0 + 16 * g + j, 64 * s);
        amx::transpose_dwords(rows, panel + (g * steps + s) * amx::kTileBytes);
      }
  };
  auto edge = [&](int64_t row, int64_t col, const int32_t* block) {
    const int64_t cols = std::min<int64_t>(32, n - col);
    for (int64_t i = 0; i < 32 && row + i < m; ++i)
      std::memcpy(c + (row + i) * n + col, block + 32 * i, size_t(cols) * sizeof(int32_t));
  };
  amx::gemm<false>(a_tiles, m, n, nthreads, pack_b, c, n, edge);
}
#endif

}  // namespace

// int8_quantize: row-wise (axis 0) or column-wise (axis 1) vector-wise quantization of x [m, k] (row-major,
// dtype x_dtype: fp32/fp16/bf16) -> q int8 [m, k], stats fp32 [m] (axis 0) or [k] (axis 1), outlier_flags
// uint8 [k] (1 = outlier column). threshold <= 0: no outliers, flags all 0. Math at the top of the file.
void int8_quantize(const void* x, int x_dtype, int8_t* q, float* stats, uint8_t* outlier_flags, int64_t m, int64_t k,
                   int axis, double threshold, int nthreads) {
  with_float_type(x_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (axis == 0)
      quant_rows(static_cast<const T*>(x), q, stats, outlier_flags, m, k, float(threshold), nthreads);
    else
      quant_cols(static_cast<const T*>(x), q, stats, outlier_flags, m, k, float(threshold), nthreads);
  });
}

// int8_matmul: c [m, n] int32 = a [m, k] int8 @ b [n, k]^T int8, exact (k <= 65536). Row-major, contiguous. On AMX
// hosts (pfp::amx_in_use()) by tiles; elsewhere a portable loop, for tests: the op runs torch._int_mm there.
void int8_matmul(const int8_t* a, const int8_t* b, int32_t* c, int64_t m, int64_t n, int64_t k, int nthreads) {
  if (m == 0 || n == 0) return;
#if PFP_HAS_AMX
  if (pfp::amx_in_use()) {
    amx_matmul(a, b, c, m, n, k, nthreads);
    return;
  }
#endif
  parallel_for(m, n * k, nthreads, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < n; ++j) c[r * n + j] = dot_i8(a + r * k, b + j * k, k);
  });
}

// int8_mm_dequant: out [m, n] (out_dtype) = float(c[m, n] int32) * (row_stats[m] * col_stats[n]) / 127^2
// (+ addend fp32 [m, n], may be null) (+ bias [n] of bias_dtype, may be null). All row-major, contiguous.
void int8_mm_dequant(const int32_t* c, const float* row_stats, const float* col_stats, const void* bias, int bias_dtype,
                     const float* addend, void* out, int out_dtype, int64_t m, int64_t n, int nthreads) {
  const std::vector<float> bias_f = bias_as_float(bias, bias_dtype, n);
  const float* bias_p = bias ? bias_f.data() : nullptr;
  with_float_type(out_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    parallel_for(m, n, nthreads, [&](int64_t begin, int64_t end, int) {
      std::vector<float> buffer(static_cast<size_t>(n));
      for (int64_t r = begin; r < end; ++r)
        epilogue_row(c + r * n, row_stats[r], col_stats, bias_p, addend ? addend + r * n : nullptr,
                     static_cast<T*>(out) + r * n, n, buffer.data());
    });
  });
}

// int8_gemv: out [m, n] = epilogue(q [m, k] int8 @ w [n, k]^T int8) as in int8_mm_dequant, for 1 <= m <= 8 and
// k <= 65536 (int32 accumulation bound); each weight byte is read once. Row-major, contiguous. The epilogue's fp32
// addend [m, n] is `addend`, or, given outlier_count columns (outlier_cols int64 [outlier_count], each in [0, k);
// outlier_x fp32 [m, outlier_count]: x's values in those columns as the compute dtype holds them), the outlier
// product ref.outlier_product gives, up to the order of its sums:
//   addend[r, j] = c(sum_i outlier_x[r, i] * c(float(w[j, cols[i]]) * col_stats[j] * (1/127))),   fp32 sums,
// c() rounding to bf16 where outlier_bf16, else to fp32 (no change). Those bytes are read as each band of W's rows
// has just streamed through the cache for the GEMV: gathered in a pass of their own, they cost one line from DRAM
// per row and column (a 4096 x 4096 W with four outlier columns: a quarter of the GEMV's time). Throws if a column
// lies outside [0, k) or both an addend and outlier columns are given.
void int8_gemv(const int8_t* q, const float* row_stats, const int8_t* w, const float* col_stats, const void* bias,
               int bias_dtype, const float* addend, void* out, int out_dtype, int64_t m, int64_t n, int64_t k,
               const int64_t* outlier_cols, int64_t outlier_count, const float* outlier_x, bool outlier_bf16,
               int nthreads) {
  constexpr int64_t kBand = 64;  // W rows whose outlier bytes are read after their GEMV: 64 rows of 4096, 256 KB
  for (int64_t i = 0; i < outlier_count; ++i)
    if (outlier_cols[i] < 0 || outlier_cols[i] >= k)
      throw std::invalid_argument("int8_gemv: an outlier column lies outside the weight");
  if (addend && outlier_count > 0) throw std::invalid_argument("int8_gemv: an addend or outlier columns, not both");
  std::vector<int32_t> acc(size_t(m * n));
  std::vector<float> outliers(size_t(outlier_count > 0 ? m * n : 0));
  auto c = [&](float v) { return outlier_bf16 ? pfp::to_float(pfp::to_bf16(v)) : v; };
  auto outlier_rows = [&](int64_t j0, int64_t j1, std::vector<float>& column) {  // column: [outlier_count]
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t i = 0; i < outlier_count; ++i)
        column[size_t(i)] = c(float(w[j * k + outlier_cols[i]]) * col_stats[j] * kDequantScale);
      for (int64_t r = 0; r < m; ++r) {
        float sum = 0.0f;
        for (int64_t i = 0; i < outlier_count; ++i) sum += outlier_x[r * outlier_count + i] * column[size_t(i)];
        outliers[size_t(r * n + j)] = c(sum);
      }
    }
  };
#if defined(__AVX512F__)
  std::vector<int32_t> q_sums(size_t(m), 0);
  if (pfp::avx512_vnni_in_use()) row_sums_vnni(q, m, k, q_sums.data());
#endif
  parallel_for(n, m * k, nthreads, [&](int64_t begin, int64_t end, int) {
    std::vector<float> column(static_cast<size_t>(outlier_count));
    for (int64_t j0 = begin; j0 < end; j0 += kBand) {
      const int64_t j1 = j0 + kBand < end ? j0 + kBand : end;
#if defined(__AVX512F__)
      if (pfp::avx512_vnni_in_use())
        gemv_vnni(q, q_sums.data(), w, acc.data(), m, j0, j1, n, k);
      else
#endif
        gemv_portable(q, w, acc.data(), m, j0, j1, n, k);
      if (outlier_count > 0) outlier_rows(j0, j1, column);
    }
  });
  int8_mm_dequant(acc.data(), row_stats, col_stats, bias, bias_dtype, outlier_count > 0 ? outliers.data() : addend, out,
                  out_dtype, m, n, 1);
}

// int8_dequantize_cols: out [n, count] (out_dtype) = float(w[j, cols[i]]) * stats[j] * (1/127), rounded once: the
// outlier columns of the weight w [n, k], as vectorwise_dequant(w[:, cols], stats) gives them. Each row holds
// `count` scattered bytes, a cache line apiece that the hardware prefetcher does not predict, so the lines of
// row j + kColsAhead are prefetched while row j is read. Throws if a column lies outside [0, k).
void int8_dequantize_cols(const int8_t* w, const float* stats, const int64_t* cols, void* out, int out_dtype, int64_t n,
                          int64_t k, int64_t count, int nthreads) {
  constexpr int64_t kColsAhead = 16;
  for (int64_t i = 0; i < count; ++i)
    if (cols[i] < 0 || cols[i] >= k)
      throw std::invalid_argument("int8_dequantize_cols: a column lies outside the weight");
  with_float_type(out_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    parallel_for(n, count * 64, nthreads, [&](int64_t begin, int64_t end, int) {
      std::vector<float> buffer(static_cast<size_t>(count));
      for (int64_t j = begin; j < end; ++j) {
        if (j + kColsAhead < end)
          for (int64_t i = 0; i < count; ++i) __builtin_prefetch(w + (j + kColsAhead) * k + cols[i]);
        for (int64_t i = 0; i < count; ++i) buffer[size_t(i)] = float(w[j * k + cols[i]]) * stats[j] * kDequantScale;
        pfp::store_row<T, float>(buffer.data(), static_cast<T*>(out) + j * count, count);
      }
    });
  });
}

// int8_dequantize_rows: out [rows, k] (out_dtype) = float(q [rows, k]) * stats[r] * (1/127), bitsandbytes'
// int8_vectorwise_dequant for one stat per row. Row-major, contiguous.
void int8_dequantize_rows(const int8_t* q, const float* stats, void* out, int out_dtype, int64_t rows, int64_t k,
                          int nthreads) {
  with_float_type(out_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    parallel_for(rows, k, nthreads, [&](int64_t begin, int64_t end, int) {
      std::vector<float> buffer(static_cast<size_t>(k));
      for (int64_t r = begin; r < end; ++r) {
        const int8_t* src = q + r * k;
        for (int64_t c = 0; c < k; ++c) buffer[size_t(c)] = float(src[c]) * stats[r] * kDequantScale;
        pfp::store_row<T, float>(buffer.data(), static_cast<T*>(out) + r * k, k);
      }
    });
  });
}

}  // namespace PFP_ISA
