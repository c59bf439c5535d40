// LoRA dropout on the CPU: the counter-based mask (Philox-4x32-10, Triton's tl.rand bit for bit) applied
// elementwise; the LoRA GEMMs themselves run in torch (pyfastpeft/ops/lora.py).
//
// Uniforms (pyfastpeft/reference/lora.py is the oracle): element i of a row-major [M, in] tensor gets
//   key = (seed mod 2^32, seed >> 32 mod 2^32), counter = (uint32(offset + i), 0, 0, 0), ten Philox rounds,
//   w = first output word as int32,  u = float(w < 0 ? ~w : w) * 4.6566127342e-10f   in [0, 1)
//   keep = u > threshold   (threshold = fp32(p), strictly greater: p = 0 keeps every element)
// Counters are computed 16 at a time in uint32 lanes (the high product word through a uint64 multiply),
// plain loops the AVX-512 / AVX2 builds vectorize; the scalar build runs the same loops.
#include "cpu/common.h"
#include "cpu/kernels.h"

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

constexpr int kLanes = 16;
constexpr int64_t kChunk = 1024;  // elements per step of a thread (three stack buffers); a multiple of kLanes

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;

// u[j] for counters first_counter + j (uint32 wrap), j in [0, kLanes).
#if defined(__AVX512F__)
// The high and low words of a * b for 16 uint32 lanes: vpmuludq multiplies the even lanes (and, shifted, the
// odd ones) into 64-bit products; the high words are blended back into lane order.
inline void mul_hi_lo(__m512i a, __m512i b, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, b);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);
  hi = _mm512_mask_blend_epi32(__mmask16(0xAAAA), _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mullo_epi32(a, b);
}

inline void philox_uniform_lanes(uint32_t key0, uint32_t key1, uint32_t first_counter, float* __restrict u) {
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(int(first_counter)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_setzero_si512(), c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  const __m512i round_a = _mm512_set1_epi32(int(kPhiloxRoundA)), round_b = _mm512_set1_epi32(int(kPhiloxRoundB));
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    __m512i hi_b, lo_b, hi_a, lo_a;
    mul_hi_lo(c2, round_b, hi_b, lo_b);
    mul_hi_lo(c0, round_a, hi_a, lo_a);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), _mm512_set1_epi32(int(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), _mm512_set1_epi32(int(k1)));
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  // int32 w -> (w < 0 ? ~w : w): xor with the sign spread over the word
  const __m512i word = _mm512_xor_si512(c0, _mm512_srai_epi32(c0, 31));
  _mm512_storeu_ps(u, _mm512_mul_ps(_mm512_cvtepi32_ps(word), _mm512_set1_ps(kUniformScale)));
}
#else
inline void philox_uniform_lanes(uint32_t key0, uint32_t key1, uint32_t first_counter, float* __restrict u) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    c0[j] = first_counter + uint32_t(j);
    c1[j] = c2[j] = c3[j] = 0;
  }
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int j = 0; j < kLanes; ++j) {
      const uint64_t product_b = uint64_t(kPhiloxRoundB) * c2[j];
      const uint64_t product_a = uint64_t(kPhiloxRoundA) * c0[j];
      const uint32_t next_c0 = uint32_t(product_b >> 32) ^ c1[j] ^ k0;
      const uint32_t next_c2 = uint32_t(product_a >> 32) ^ c3[j] ^ k1;
      c1[j] = uint32_t(product_b);
      c3[j] = uint32_t(product_a);
      c0[j] = next_c0;
      c2[j] = next_c2;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int j = 0; j < kLanes; ++j) {
    const int32_t word = int32_t(c0[j]);
    u[j] = float(word < 0 ? ~word : word) * kUniformScale;
  }
}
#endif

// Keep factors of elements [first, first + count): keep_scale where kept, 0 where dropped.
template <typename C>
inline void keep_factors(uint32_t key0, uint32_t key1, uint32_t counter_base, int64_t first, int64_t count,
                         float threshold, C keep_scale, C* __restrict factors) {
  float u[kLanes];
  for (int64_t start = 0; start < count; start += kLanes) {
    philox_uniform_lanes(key0, key1, counter_base + uint32_t(first + start), u);
    const int64_t lanes = count - start < kLanes ? count - start : kLanes;
    for (int64_t j = 0; j < lanes; ++j) factors[start + j] = u[j] > threshold ? keep_scale : C(0);
  }
}

// The (seed, offset) pair as Philox key words and counter base, and the fp32/fp64 scale factors.
template <typename C>
struct DropoutParams {
  uint32_t key0, key1, counter_base;
  float threshold;
  C keep_scale, alpha;
  bool accumulate;
};

// dst[0, count) (+)= alpha * (keep ? src * keep_scale : 0) over mask elements [mask_first, mask_first + count);
// count <= kChunk. A select, not a product with the 0 factor: an inf or NaN at a dropped element gives 0, as
// the reference's torch.where does (keep_scale = 1 / (1 - p) >= 1 is never 0).
template <typename T, typename C>
inline void dropout_chunk(const T* __restrict src, T* __restrict dst, int64_t mask_first, int64_t count,
                          const DropoutParams<C>& params) {
  C factors[kChunk], values[kChunk], current[kChunk];
  keep_factors(params.key0, params.key1, params.counter_base, mask_first, count, params.threshold, params.keep_scale,
               factors);
  pfp::load_row(src, values, count);
  if (params.accumulate) {
    pfp::load_row(dst, current, count);
    for (int64_t i = 0; i < count; ++i) {
      values[i] = current[i] + params.alpha * (factors[i] != C(0) ? values[i] * factors[i] : C(0));
    }
  } else {
    for (int64_t i = 0; i < count; ++i) {
      values[i] = params.alpha * (factors[i] != C(0) ? values[i] * factors[i] : C(0));
    }
  }
  pfp::store_row(values, dst, count);
}

template <typename C>
DropoutParams<C> dropout_params(uint64_t seed, uint64_t offset, float threshold, float keep_scale, double alpha,
                                bool accumulate) {
  return {uint32_t(seed), uint32_t(seed >> 32), uint32_t(offset), threshold, C(keep_scale), C(alpha), accumulate};
}

template <typename T>
void dropout_impl(const T* src, T* dst, int64_t numel, uint64_t seed, uint64_t offset, float threshold,
                  float keep_scale, double alpha, bool accumulate, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  const auto params = dropout_params<C>(seed, offset, threshold, keep_scale, alpha, accumulate);
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  pfp::parallel_for(chunks, kChunk * 64, nthreads, [&](int64_t begin, int64_t end, int) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * kChunk;
      dropout_chunk(src + first, dst + first, first, numel - first < kChunk ? numel - first : kChunk, params);
    }
  });
}

// Rows of the indexed side are row_index[j]; the packed side's row is j. The mask element of (row r, col k)
// is r * cols + k: the position in the indexed (original) tensor.
template <typename T>
void dropout_rows_impl(const T* src, T* dst, const int64_t* row_index, int64_t count, int64_t cols, bool scatter,
                       uint64_t seed, uint64_t offset, float threshold, float keep_scale, double alpha, bool accumulate,
                       int nthreads) {
  using C = typename pfp::Compute<T>::type;
  const auto params = dropout_params<C>(seed, offset, threshold, keep_scale, alpha, accumulate);
  pfp::parallel_for(count, cols * 64, nthreads, [&](int64_t begin, int64_t end, int) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t row = row_index[j];
      const T* src_row = src + (scatter ? j : row) * cols;
      T* dst_row = dst + (scatter ? row : j) * cols;
      for (int64_t first = 0; first < cols; first += kChunk) {
        dropout_chunk(src_row + first, dst_row + first, row * cols + first,
                      cols - first < kChunk ? cols - first : kChunk, params);
      }
    }
  });
}

// xa[i, q] = sum_c x_d[i, c] * a[q, c], fp32 (fp64) sums rounded once; x_d = dropout(x) rounded to T as
// lora_dropout writes it when dropout, else x. One task per (i, q).
template <typename T>
void down_impl(const T* x, const T* a, T* xa, int64_t m, int64_t k, int64_t rank, bool dropout, uint64_t seed,
               uint64_t offset, float threshold, float keep_scale, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  std::vector<T> dropped;
  if (dropout) {
    dropped.resize(m * k);
    dropout_impl(x, dropped.data(), m * k, seed, offset, threshold, keep_scale, 1.0, false, nthreads);
    x = dropped.data();
  }
  std::vector<C> xs(m * k);
  pfp::load_row(x, xs.data(), m * k);
  // a decode step's product (16 x 4096) is a few microseconds of work, less than waking a second thread
  const int threads = m * rank * k >= (int64_t(1) << 20) ? nthreads : 1;
  pfp::parallel_for(m * rank, k, threads, [&](int64_t begin, int64_t end, int) {
    std::vector<C> a_row(k);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / rank, q = task % rank;
      pfp::load_row(a + q * k, a_row.data(), k);
      const C* xi = xs.data() + i * k;
      xa[task] = pfp::from_compute<T>(pfp::lane_sum<C>(k, [&](int64_t c) { return xi[c] * a_row[c]; }));
    }
  });
}

}  // namespace

// lora_down: LoRA's down-projection of a few rows (decode), xa[m, rank] = dropout(x)[m, k] @ a[rank, k]^T, the
// dropped x exactly as lora_dropout makes it (alpha 1; rounded to the dtype) when dropout, the sums in fp32 (fp64
// for fp64) rounded once. x, a, xa: contiguous, of `dtype`. seed, offset, threshold, keep_scale: as lora_dropout.
void lora_down(const void* x, const void* a, void* xa, int64_t m, int64_t k, int64_t rank, int dtype, bool dropout,
               int64_t seed, int64_t offset, float threshold, float keep_scale, int nthreads) {
  pfp::dispatch_float(dtype, "lora_down", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    down_impl(static_cast<const T*>(x), static_cast<const T*>(a), static_cast<T*>(xa), m, k, rank, dropout,
              uint64_t(seed), uint64_t(offset), threshold, keep_scale, nthreads);
  });
}

// lora_dropout: for i in [0, numel), with keep[i] from (seed, offset, i) as above,
//   d[i] = keep[i] ? src[i] * keep_scale : 0
//   dst[i] = accumulate ? dst[i] + alpha * d[i] : alpha * d[i]
// in fp32 (fp64 for fp64 data), rounded once to the dtype. LoRA uses it twice: x_d = dropout(x)
// (alpha 1, no accumulate: exactly x * keep_scale where kept) and, in backward, dX += s * g * keep * keep_scale.
// src, dst: contiguous [numel] of `dtype` (any of the four codes); dst may alias src when !accumulate.
// seed, offset: the (int64 >= 0) pair of the op's rng tensor; threshold = fp32(p); keep_scale = fp32(1/(1-p)).
void lora_dropout(const void* src, void* dst, int64_t numel, int dtype, int64_t seed, int64_t offset, float threshold,
                  float keep_scale, double alpha, bool accumulate, int nthreads) {
#define PFP_LORA_DROPOUT(T)                                                                                          \
  dropout_impl(static_cast<const T*>(src), static_cast<T*>(dst), numel, uint64_t(seed), uint64_t(offset), threshold, \
               keep_scale, alpha, accumulate, nthreads)
  switch (dtype) {
    case pfp::kFloat32: PFP_LORA_DROPOUT(float); return;
    case pfp::kFloat16: PFP_LORA_DROPOUT(half); return;
    case pfp::kBFloat16: PFP_LORA_DROPOUT(bf16); return;
    case pfp::kFloat64: PFP_LORA_DROPOUT(double); return;
  }
#undef PFP_LORA_DROPOUT
  throw std::invalid_argument("lora_dropout: unsupported dtype code");
}

// ---- multi-adapter batches: dropout of gathered / scattered rows ----------------------------------------

// lora_dropout_rows: the lora_dropout above on whole rows picked by row_index, with each element keeping the
// mask of its position in the indexed [rows, cols] tensor (counter offset + row_index[j] * cols + k), so a row
// gathered out of x draws the same mask as in x. For j in [0, count), k in [0, cols):
//   gather  (!scatter): dst[j, k]            (+)= alpha * d(row_index[j], k, src[row_index[j], k])
//   scatter ( scatter): dst[row_index[j], k] (+)= alpha * d(row_index[j], k, src[j, k])
//   d(r, k, v) = keep[r * cols + k] ? v * keep_scale : 0, in fp32 (fp64 for fp64 data), rounded once.
// src, dst: contiguous row-major of `dtype` (any of the four codes), the packed side [count, cols], the
// indexed side with more rows than any row_index value. row_index: int64 [count], values >= 0, distinct
// when scatter (each thread owns its rows). seed, offset, threshold, keep_scale: as lora_dropout.
void lora_dropout_rows(const void* src, void* dst, const int64_t* row_index, int64_t count, int64_t cols, bool scatter,
                       int dtype, int64_t seed, int64_t offset, float threshold, float keep_scale, double alpha,
                       bool accumulate, int nthreads) {
#define PFP_LORA_DROPOUT_ROWS(T)                                                                                       \
  dropout_rows_impl(static_cast<const T*>(src), static_cast<T*>(dst), row_index, count, cols, scatter, uint64_t(seed), \
                    uint64_t(offset), threshold, keep_scale, alpha, accumulate, nthreads)
  switch (dtype) {
    case pfp::kFloat32: PFP_LORA_DROPOUT_ROWS(float); return;
    case pfp::kFloat16: PFP_LORA_DROPOUT_ROWS(half); return;
    case pfp::kBFloat16: PFP_LORA_DROPOUT_ROWS(bf16); return;
    case pfp::kFloat64: PFP_LORA_DROPOUT_ROWS(double); return;
  }
#undef PFP_LORA_DROPOUT_ROWS
  throw std::invalid_argument("lora_dropout_rows: unsupported dtype code");
}

}  // namespace PFP_ISA
