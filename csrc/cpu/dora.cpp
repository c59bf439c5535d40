// DoRA on the CPU around torch's GEMMs (pyfastpeft/ops/dora.py; pyfastpeft/reference/dora.py is the oracle): the
// norm ||W + s B A|| of every row in one read of W, never storing W + s B A; the magnitude scaling of the forward;
// and, in one read of dY and z, the scaled gradient and the magnitude's gradient.
//
// Compute in fp32 (fp64 for fp64 data), one rounding at each store. Rows are split over threads for dora_scale;
// dora_grad splits the columns, so each column's sum over rows runs in row order on one thread: the same bits
// whatever the thread count or instruction set. The AVX-512 build runs both passes 16 lanes at a time (fp32, bf16 and
// fp16 data): each thread walks whole rows (dora_scale) or its columns of every row in turn (dora_grad), and outputs of
// kStreamBytes and more go out by streaming stores (common.h). The loops before them converted bf16 an element at a
// time, and dora_grad's walked its rows 512 columns at a time: into preallocated outputs at 2048 x 4096 on Zen 4 (two
// threads, a script), dora_grad took 3.1 ms in bf16 and 6.8-7.0 ms in fp32, now 1.4-1.5 and 2.6-2.7; dora_scale
// 1.1 and 2.1-2.3 ms, now 0.6-0.7 and 1.3-1.4.
#include "cpu/common.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#include <cmath>
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

constexpr int64_t kChunk = 512;       // columns per step: a few stack buffers that stay in L1
constexpr int64_t kColumnBlock = 64;  // dora_grad's unit of work: whole rows of this many columns

constexpr int64_t kNormRows = 4;  // dora_norm: rows sharing each load of A
constexpr int64_t kLanes = 16;    // dora_norm: columns summed side by side (one AVX-512 fp32 vector)
constexpr int64_t kMaxNormRank = 256;

enum AddendKind : int { kNoAddend = 0, kRowAddend = 1, kFullAddend = 2 };

template <typename T>
void scale_loops(const T* z, const typename pfp::Compute<T>::type* scale, const T* addend, int addend_kind, T* y,
                 int64_t rows, int64_t cols, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  pfp::parallel_for(rows, cols * 4, nthreads, [&](int64_t begin, int64_t end, int) {
    alignas(64) C values[kChunk], extra[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t first = 0; first < cols; first += kChunk) {
        const int64_t len = cols - first < kChunk ? cols - first : kChunk;
        pfp::load_row(z + row * cols + first, values, len);
        if (addend_kind == kNoAddend) {
          for (int64_t j = 0; j < len; ++j) values[j] = scale[first + j] * values[j];
        } else {
          pfp::load_row(addend + (addend_kind == kRowAddend ? 0 : row * cols) + first, extra, len);
          for (int64_t j = 0; j < len; ++j) values[j] = scale[first + j] * values[j] + extra[j];
        }
        pfp::store_row(values, y + row * cols + first, len);
      }
    }
  });
}

#if defined(__AVX512F__)
// Rows [begin, end) of dora_scale, 32 columns a step in element order (scale's), each product and sum as the scalar
// loop rounds it; y by put16x2_if (a whole line of bf16), the short tail by masked stores.
template <bool kBf16Ins, typename T>
void scale_rows(const T* z, const float* scale, const T* addend, int addend_kind, T* y, int64_t begin, int64_t end,
                int64_t cols, bool stream) {
  for (int64_t row = begin; row < end; ++row) {
    const T* z_row = z + row * cols;
    const T* add_row = addend_kind == kFullAddend ? addend + row * cols : addend;  // a row addend: [cols], every row
    T* y_row = y + row * cols;
    int64_t j = 0;
    for (; j + 32 <= cols; j += 32) {
      __m512 first = _mm512_mul_ps(pfp::load16(scale + j), pfp::load16(z_row + j));
      __m512 second = _mm512_mul_ps(pfp::load16(scale + j + 16), pfp::load16(z_row + j + 16));
      if (addend_kind != kNoAddend) {
        first = _mm512_add_ps(first, pfp::load16(add_row + j));
        second = _mm512_add_ps(second, pfp::load16(add_row + j + 16));
      }
      pfp::put16x2_if<kBf16Ins>(y_row + j, first, second, stream);
    }
    for (; j < cols; j += 16) {
      const __mmask16 valid = pfp::lanes16(cols - j);
      __m512 v = _mm512_mul_ps(pfp::load16(scale + j, valid), pfp::load16(z_row + j, valid));
      if (addend_kind != kNoAddend) v = _mm512_add_ps(v, pfp::load16(add_row + j, valid));
      pfp::store16_if<kBf16Ins>(y_row + j, valid, v);
    }
  }
}

// Columns [c0, c1) of dora_grad (c0 a multiple of 32): every row in turn, its columns 32 at a time, the sums in sums[c1
// - c0] (row order per column, as the scalar loop), dy_scaled by put16x2_if, the short tail by masked loads and stores.
template <bool kBf16Ins, typename T>
void grad_columns(const T* dy, const T* z, const float* scale, T* dy_scaled, float* sums, int64_t rows, int64_t cols,
                  int64_t c0, int64_t c1, bool stream) {
  for (int64_t row = 0; row < rows; ++row) {
    const T* dy_row = dy + row * cols;
    const T* z_row = z + row * cols;
    T* out_row = dy_scaled + row * cols;
    int64_t j = c0;
    for (; j + 32 <= c1; j += 32) {
      const __m512 d0 = pfp::load16(dy_row + j), d1 = pfp::load16(dy_row + j + 16);
      float* sum = sums + (j - c0);
      _mm512_storeu_ps(sum, _mm512_add_ps(_mm512_loadu_ps(sum), _mm512_mul_ps(d0, pfp::load16(z_row + j))));
      _mm512_storeu_ps(sum + 16,
                       _mm512_add_ps(_mm512_loadu_ps(sum + 16), _mm512_mul_ps(d1, pfp::load16(z_row + j + 16))));
      pfp::put16x2_if<kBf16Ins>(out_row + j, _mm512_mul_ps(pfp::load16(scale + j), d0),
                                _mm512_mul_ps(pfp::load16(scale + j + 16), d1), stream);
    }
    for (; j < c1; j += 16) {
      const __mmask16 valid = pfp::lanes16(c1 - j);
      const __m512 d = pfp::load16(dy_row + j, valid);
      float* sum = sums + (j - c0);
      const __m512 product = _mm512_mul_ps(d, pfp::load16(z_row + j, valid));
      _mm512_mask_storeu_ps(sum, valid, _mm512_add_ps(_mm512_maskz_loadu_ps(valid, sum), product));
      pfp::store16_if<kBf16Ins>(out_row + j, valid, _mm512_mul_ps(pfp::load16(scale + j, valid), d));
    }
  }
}

// The bf16 passes with AVX512-BF16 stores (flatten inlines them under this target).
__attribute__((target("avx512bf16"), flatten)) void scale_rows_bf16ins(const bf16* z, const float* scale,
                                                                       const bf16* addend, int addend_kind, bf16* y,
                                                                       int64_t begin, int64_t end, int64_t cols,
                                                                       bool stream) {
  scale_rows<true>(z, scale, addend, addend_kind, y, begin, end, cols, stream);
}
__attribute__((target("avx512bf16"), flatten)) void grad_columns_bf16ins(const bf16* dy, const bf16* z,
                                                                         const float* scale, bf16* dy_scaled,
                                                                         float* sums, int64_t rows, int64_t cols,
                                                                         int64_t c0, int64_t c1, bool stream) {
  grad_columns<true>(dy, z, scale, dy_scaled, sums, rows, cols, c0, c1, stream);
}
#endif

template <typename T>
void scale_impl(const T* z, const typename pfp::Compute<T>::type* scale, const T* addend, int addend_kind, T* y,
                int64_t rows, int64_t cols, int nthreads) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    const bool bf16ins = pfp::avx512_bf16_in_use();
    const bool stream = pfp::streams(rows * cols * int64_t(sizeof(T)));  // y past the caches
    pfp::parallel_for(rows, cols * 4, nthreads, [&](int64_t begin, int64_t end, int) {
      if constexpr (std::is_same_v<T, bf16>) {
        if (bf16ins) scale_rows_bf16ins(z, scale, addend, addend_kind, y, begin, end, cols, stream);
      }
      if (!(std::is_same_v<T, bf16> && bf16ins))
        scale_rows<false>(z, scale, addend, addend_kind, y, begin, end, cols, stream);
      if (stream) pfp::stream_fence();
    });
    return;
  }
#endif
  scale_loops(z, scale, addend, addend_kind, y, rows, cols, nthreads);
}

template <typename T>
void grad_impl(const T* dy, const T* z, const typename pfp::Compute<T>::type* scale, T* dy_scaled,
               typename pfp::Compute<T>::type* column_sum, int64_t rows, int64_t cols, int nthreads) {
  using C = typename pfp::Compute<T>::type;
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    const bool bf16ins = pfp::avx512_bf16_in_use();
    const bool stream = pfp::streams(rows * cols * int64_t(sizeof(T)));  // dy_scaled past the caches
    pfp::parallel_for((cols + 31) / 32, rows * 32 * 3, nthreads, [&](int64_t begin, int64_t end, int) {
      const int64_t c0 = begin * 32, c1 = end * 32 < cols ? end * 32 : cols;
      std::vector<float> sums(size_t(c1 - c0), 0.0f);
      if constexpr (std::is_same_v<T, bf16>) {
        if (bf16ins) grad_columns_bf16ins(dy, z, scale, dy_scaled, sums.data(), rows, cols, c0, c1, stream);
      }
      if (!(std::is_same_v<T, bf16> && bf16ins))
        grad_columns<false>(dy, z, scale, dy_scaled, sums.data(), rows, cols, c0, c1, stream);
      if (stream) pfp::stream_fence();
      for (int64_t j = c0; j < c1; ++j) column_sum[j] = sums[size_t(j - c0)];
    });
    return;
  }
#endif
  const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  pfp::parallel_for(blocks, rows * kColumnBlock * 3, nthreads, [&](int64_t begin, int64_t end, int) {
    const int64_t col_begin = begin * kColumnBlock, col_end = end * kColumnBlock < cols ? end * kColumnBlock : cols;
    for (int64_t first = col_begin; first < col_end; first += kChunk) {
      const int64_t len = col_end - first < kChunk ? col_end - first : kChunk;
      alignas(64) C d[kChunk], zz[kChunk], sum[kChunk];
      for (int64_t j = 0; j < len; ++j) sum[j] = C(0);
      for (int64_t row = 0; row < rows; ++row) {
        pfp::load_row(dy + row * cols + first, d, len);
        pfp::load_row(z + row * cols + first, zz, len);
        for (int64_t j = 0; j < len; ++j) {
          sum[j] += d[j] * zz[j];
          d[j] = scale[first + j] * d[j];
        }
        pfp::store_row(d, dy_scaled + row * cols + first, len);
      }
      for (int64_t j = 0; j < len; ++j) column_sum[first + j] = sum[j];
    }
  });
}

// One chunk of kNormRows rows (v, already W's values in the compute type, kChunk columns at most): v_i += s B[i, :] A
// over the chunk's columns, then squares[i][lane] += v_i^2 lane by lane (column j goes to lane j % kLanes).
template <typename C>
inline void norm_chunk_generic(C (*v)[kChunk], const C (*sb)[kNormRows], const C* a_chunk, int64_t a_stride,
                               int64_t rank, int64_t len, C (*squares)[kLanes]) {
  for (int64_t t = 0; t < rank; ++t) {
    const C* a = a_chunk + t * a_stride;
    for (int64_t i = 0; i < kNormRows; ++i) {
      const C b = sb[t][i];
      C* vi = v[i];
      for (int64_t j = 0; j < len; ++j) vi[j] += b * a[j];
    }
  }
  for (int64_t i = 0; i < kNormRows; ++i)
    for (int64_t j = 0; j < len; ++j) squares[i][j % kLanes] += v[i][j] * v[i][j];
}

template <typename C>
inline void norm_chunk(C (*v)[kChunk], const C (*sb)[kNormRows], const C* a_chunk, int64_t a_stride, int64_t rank,
                       int64_t len, C (*squares)[kLanes]) {
  norm_chunk_generic<C>(v, sb, a_chunk, a_stride, rank, len, squares);
}

#if defined(__AVX512F__)
// fp32 on AVX-512: 2 x 16 columns of the 4 rows in eight registers over the whole rank loop, each load of A and
// each broadcast of s B[i, t] serving several multiply-adds; the same sums lane by lane as the generic loop.
template <>
inline void norm_chunk<float>(float (*v)[kChunk], const float (*sb)[kNormRows], const float* a_chunk, int64_t a_stride,
                              int64_t rank, int64_t len, float (*squares)[kLanes]) {
  static_assert(kNormRows == 4 && kLanes == 16, "the register tiles below are 4 rows x 16 lanes");
  __m512 sq[4];
  for (int i = 0; i < 4; ++i) sq[i] = _mm512_loadu_ps(squares[i]);
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    __m512 lo[4], hi[4];
    for (int i = 0; i < 4; ++i) {
      lo[i] = _mm512_loadu_ps(v[i] + j);
      hi[i] = _mm512_loadu_ps(v[i] + j + 16);
    }
    for (int64_t t = 0; t < rank; ++t) {
      const __m512 a_lo = _mm512_loadu_ps(a_chunk + t * a_stride + j);
      const __m512 a_hi = _mm512_loadu_ps(a_chunk + t * a_stride + j + 16);
      for (int i = 0; i < 4; ++i) {
        const __m512 b = _mm512_set1_ps(sb[t][i]);
        lo[i] = _mm512_fmadd_ps(b, a_lo, lo[i]);
        hi[i] = _mm512_fmadd_ps(b, a_hi, hi[i]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      sq[i] = _mm512_fmadd_ps(lo[i], lo[i], sq[i]);
      sq[i] = _mm512_fmadd_ps(hi[i], hi[i], sq[i]);
    }
  }
  for (int i = 0; i < 4; ++i) _mm512_storeu_ps(squares[i], sq[i]);
  if (j < len) {  // the last columns (len - j < 32, a multiple of 16 apart from a row's end): the generic loop
    float tail[kNormRows][kChunk];
    for (int i = 0; i < 4; ++i)
      for (int64_t k = j; k < len; ++k) tail[i][k - j] = v[i][k];
    norm_chunk_generic<float>(tail, sb, a_chunk + j, a_stride, rank, len - j, squares);
  }
}
#endif

template <typename T, typename C>
void norm_impl(const T* w, const C* lora_A, const C* lora_B, C scaling, C* norm, int64_t rows, int64_t in_features,
               int64_t rank, int nthreads) {
  const int64_t groups = (rows + kNormRows - 1) / kNormRows;
  pfp::parallel_for(groups, in_features * (rank + 2) * kNormRows, nthreads, [&](int64_t begin, int64_t end, int) {
    alignas(64) C v[kNormRows][kChunk];
    C sb[kMaxNormRank][kNormRows];
    for (int64_t group = begin; group < end; ++group) {
      const int64_t row0 = group * kNormRows;
      const int64_t count = rows - row0 < kNormRows ? rows - row0 : kNormRows;
      // the absent rows of a last partial group compute on zeros and are not stored
      for (int64_t t = 0; t < rank; ++t)
        for (int64_t i = 0; i < kNormRows; ++i) sb[t][i] = i < count ? scaling * lora_B[(row0 + i) * rank + t] : C(0);
      alignas(64) C squares[kNormRows][kLanes] = {};
      for (int64_t first = 0; first < in_features; first += kChunk) {
        const int64_t len = in_features - first < kChunk ? in_features - first : kChunk;
        for (int64_t i = 0; i < kNormRows; ++i) {
          if (i < count) {
            pfp::load_row(w + (row0 + i) * in_features + first, v[i], len);
          } else {
            for (int64_t j = 0; j < len; ++j) v[i][j] = C(0);
          }
        }
        norm_chunk<C>(v, sb, lora_A + first, in_features, rank, len, squares);
      }
      for (int64_t i = 0; i < count; ++i) {
        for (int width = kLanes / 2; width > 0; width /= 2)
          for (int j = 0; j < width; ++j) squares[i][j] += squares[i][j + width];
        norm[row0 + i] = std::sqrt(squares[i][0]);
      }
    }
  });
}

}  // namespace

// dora_norm: norm[i] = || w[i, :] + scaling * sum_t lora_B[i, t] lora_A[t, :] || for i in [0, rows), in the compute
// type, W + s B A never stored. w: contiguous row-major [rows, in_features] of w_dtype; lora_A [rank, in_features],
// lora_B [rows, rank] and norm [rows]: contiguous, of fp32 (compute_dtype 0) or fp64 (3); rank <= 256 (larger ranks
// are the caller's to split). A quantized base is dequantized into an fp32 w a tile of rows at a time by the caller.
void dora_norm(const void* w, int w_dtype, const void* lora_A, const void* lora_B, int compute_dtype, double scaling,
               void* norm, int64_t rows, int64_t in_features, int64_t rank, int nthreads) {
  if (rank > kMaxNormRank) throw std::invalid_argument("dora_norm: rank above 256");
  pfp::dispatch_float(w_dtype, "dora_norm", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (compute_dtype == pfp::kFloat64) {
      norm_impl(static_cast<const T*>(w), static_cast<const double*>(lora_A), static_cast<const double*>(lora_B),
                scaling, static_cast<double*>(norm), rows, in_features, rank, nthreads);
    } else if (compute_dtype == pfp::kFloat32) {
      norm_impl(static_cast<const T*>(w), static_cast<const float*>(lora_A), static_cast<const float*>(lora_B),
                float(scaling), static_cast<float*>(norm), rows, in_features, rank, nthreads);
    } else {
      throw std::invalid_argument("dora_norm: compute_dtype must be fp32 or fp64");
    }
  });
}

// dora_scale: y[i, j] = scale[j] * z[i, j] (+ addend[j] for addend_kind 1, + addend[i, j] for addend_kind 2; 0: no
// addend, addend may be null). z, addend, y: contiguous row-major [rows, cols] (addend [cols] for kind 1) of `dtype`;
// scale: [cols] of fp32 (fp64 when dtype is fp64). y may alias z.
void dora_scale(const void* z, const void* scale, const void* addend, int addend_kind, void* y, int64_t rows,
                int64_t cols, int dtype, int nthreads) {
  if (addend_kind < kNoAddend || addend_kind > kFullAddend) throw std::invalid_argument("dora_scale: addend_kind");
  pfp::dispatch_float(dtype, "dora_scale", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using C = typename pfp::Compute<T>::type;
    scale_impl(static_cast<const T*>(z), static_cast<const C*>(scale), static_cast<const T*>(addend), addend_kind,
               static_cast<T*>(y), rows, cols, nthreads);
  });
}

// dora_grad: dy_scaled[i, j] = scale[j] * dy[i, j] (rounded to dtype) and column_sum[j] = sum over i of
// dy[i, j] * z[i, j] (the magnitude's gradient times the norm), summed in row order in the compute type.
// dy, z, dy_scaled: contiguous row-major [rows, cols] of `dtype`; scale, column_sum: [cols] of fp32 (fp64 when
// dtype is fp64). dy_scaled may alias dy.
void dora_grad(const void* dy, const void* z, const void* scale, void* dy_scaled, void* column_sum, int64_t rows,
               int64_t cols, int dtype, int nthreads) {
  pfp::dispatch_float(dtype, "dora_grad", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using C = typename pfp::Compute<T>::type;
    grad_impl(static_cast<const T*>(dy), static_cast<const T*>(z), static_cast<const C*>(scale),
              static_cast<T*>(dy_scaled), static_cast<C*>(column_sum), rows, cols, nthreads);
  });
}

}  // namespace PFP_ISA
