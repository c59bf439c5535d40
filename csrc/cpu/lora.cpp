// LoRA dropout on the CPU: the counter-based mask (Philox-4x32-10, Triton's tl.randint4x bit for bit) applied
// elementwise; the LoRA GEMMs themselves run in torch (pyfastpeft/ops/lora.py).
//
// Uniforms (pyfastpeft/reference/lora.py is the oracle): element i of a row-major [M, in] tensor sits at stream
// position s = offset + i; four positions share a Philox block and take one output word each:
//   key = (seed mod 2^32, seed >> 32 mod 2^32), counter = (n mod 2^32, n >> 32, 0, 0) with n = s >> 2,
//   w = output word s mod 4 as int32,  u = float(w < 0 ? ~w : w) * 4.6566127342e-10f   in [0, 1)
//   keep = u > threshold   (threshold = fp32(p), strictly greater: p = 0 keeps every element)
// A step draws 64 blocks (256 positions) in uint32 lanes (the high product word through a uint64 multiply). On
// AVX-512: four 16-lane vectors side by side (one alone waits on its multiplies' latency), each word tested against
// an integer bound into mask bits, applied to float and bf16 data by masked multiplies (to fp16 and fp64 data as
// factors). Elsewhere: plain loops the AVX2 and scalar builds compile, through the float uniforms.
#include "cpu/amx.h"
#include "cpu/common.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#include <algorithm>
#include <cstring>
#include <iterator>
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
#if defined(__AVX512F__)
using pfp::load16;
using pfp::store16;
#endif

constexpr int kLanes = 16;                 // Philox blocks per vector
constexpr int kGroups = 4;                 // vectors of blocks run side by side: hides the multiplies' latency
constexpr int kBlocks = kLanes * kGroups;  // Philox blocks per step
constexpr int kWords = 4;                  // uniforms per block
constexpr int kStep = kBlocks * kWords;    // stream positions per step
constexpr int64_t kChunk = 1024;           // elements per piece of work (stack buffers); a multiple of kStep

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;

#if defined(__AVX512F__)
// The high and low words of a * b for 16 uint32 lanes, b the same in every lane: vpmuludq multiplies the even
// lanes (and, shifted down, the odd ones) into 64-bit products, whose halves two masked dword swaps put back in
// lane order (no vpmulld, which costs two operations or more on most AVX-512 cores).
inline void mul_hi_lo(__m512i a, __m512i b, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, b);                        // qword i: a[2i] * b
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);  // qword i: a[2i + 1] * b
  hi = _mm512_mask_shuffle_epi32(odd, __mmask16(0x5555), even, _MM_PERM_CDAB);
  lo = _mm512_mask_shuffle_epi32(even, __mmask16(0xAAAA), odd, _MM_PERM_CDAB);
}

// The four output words of blocks first_block + 16 g + lane, g in [0, kGroups): words[g][w] is word w's vector.
inline void philox_words(uint32_t key0, uint32_t key1, uint64_t first_block, __m512i (*__restrict words)[kWords]) {
  __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int g = 0; g < kGroups; ++g) {
    const uint64_t block = first_block + uint64_t(g * kLanes);
    const __m512i low = _mm512_set1_epi32(int(uint32_t(block)));
    c0[g] = _mm512_add_epi32(low, lane);
    // counter word 1 is n >> 32, plus one in the lanes whose low word wrapped past 2^32
    const __m512i high = _mm512_set1_epi32(int(uint32_t(block >> 32)));
    c1[g] = _mm512_mask_add_epi32(high, _mm512_cmplt_epu32_mask(c0[g], low), high, _mm512_set1_epi32(1));
    c2[g] = c3[g] = _mm512_setzero_si512();
  }
  const __m512i round_a = _mm512_set1_epi32(int(kPhiloxRoundA)), round_b = _mm512_set1_epi32(int(kPhiloxRoundB));
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m512i key_a = _mm512_set1_epi32(int(k0)), key_b = _mm512_set1_epi32(int(k1));
    for (int g = 0; g < kGroups; ++g) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo(c2[g], round_b, hi_b, lo_b);
      mul_hi_lo(c0[g], round_a, hi_a, lo_a);
      c0[g] = _mm512_ternarylogic_epi32(hi_b, c1[g], key_a, 0x96);  // three-way xor
      c2[g] = _mm512_ternarylogic_epi32(hi_a, c3[g], key_b, 0x96);
      c1[g] = lo_b;
      c3[g] = lo_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int g = 0; g < kGroups; ++g) {
    words[g][0] = c0[g];
    words[g][1] = c1[g];
    words[g][2] = c2[g];
    words[g][3] = c3[g];
  }
}

// The uniform test as an integer one: u = fp32(w') * scale with w' = (w < 0 ? ~w : w) in [0, 2^31) is
// non-decreasing in w', so u > threshold exactly when w' > the largest w' whose u is <= threshold (-1: none).
inline int32_t keep_limit(float threshold) {
  int64_t low = -1, high = (int64_t(1) << 31) - 1;
  while (low < high) {
    const int64_t mid = low + (high - low + 1) / 2;
    if (float(int32_t(mid)) * kUniformScale <= threshold) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  return int32_t(low);
}

// spread_nibbles[b]: bit i of byte b moved to bit 4 i, so four word masks interleave into position order.
struct SpreadTable {
  uint32_t value[256];
  constexpr SpreadTable() : value() {
    for (int b = 0; b < 256; ++b) {
      uint32_t spread = 0;
      for (int i = 0; i < 8; ++i) spread |= uint32_t((b >> i) & 1) << (4 * i);
      value[b] = spread;
    }
  }
};
constexpr SpreadTable kSpread{};

// Keep bits of stream positions [position, position + count), count <= kChunk: bit e of bits (word e / 64) is
// u(position + e) > threshold (w' > limit, keep_limit's), for e < count; bits has kChunk / 64 + 1 words, the
// bits past count are padding. Each 16-block vector gives one 64-bit word: word w of block j is bit 4 j + w.
inline void keep_bits(uint32_t key0, uint32_t key1, uint64_t position, int64_t count, int32_t limit,
                      uint64_t* __restrict bits) {
  // step bits from position's block start: stream bit b of the steps is element bit b - skip
  uint64_t steps[kChunk / 64 + kGroups + 1] = {};
  const int skip = int(position & 3);
  const int64_t words = (skip + count + 63) / 64;
  const __m512i limit_v = _mm512_set1_epi32(limit);
  for (int64_t word = 0; word < words; word += kGroups) {
    __m512i raw[kGroups][kWords];
    philox_words(key0, key1, (position >> 2) + uint64_t(word * kLanes), raw);
    for (int g = 0; g < kGroups; ++g) {
      uint64_t packed = 0;
      for (int w = 0; w < kWords; ++w) {
        const __m512i nonnegative = _mm512_xor_si512(raw[g][w], _mm512_srai_epi32(raw[g][w], 31));
        const uint32_t mask = _mm512_cmpgt_epi32_mask(nonnegative, limit_v);
        packed |= (uint64_t(kSpread.value[mask & 0xFF]) | uint64_t(kSpread.value[mask >> 8]) << 32) << w;
      }
      steps[word + g] = packed;
    }
  }
  for (int64_t w = 0; w <= (count + 63) / 64; ++w) {
    bits[w] = skip == 0 ? steps[w] : (steps[w] >> skip) | (steps[w + 1] << (64 - skip));
  }
}

// The 16 bits of bits from bit `first` on.
inline __mmask16 bits16(const uint64_t* bits, int64_t first) {
  const int64_t word = first >> 6;
  const int shift = int(first & 63);
  uint64_t value = bits[word] >> shift;
  if (shift > 48) value |= bits[word + 1] << (64 - shift);
  return __mmask16(value & 0xFFFFu);
}

#else
// u[4 j + w] = the uniform of word w of block first_block + j, j in [0, kBlocks): the kStep stream positions from
// 4 * first_block, in order.
inline void philox_uniform_blocks(uint32_t key0, uint32_t key1, uint64_t first_block, float* __restrict u) {
  uint32_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
  for (int j = 0; j < kBlocks; ++j) {
    const uint64_t block = first_block + uint64_t(j);
    c0[j] = uint32_t(block);
    c1[j] = uint32_t(block >> 32);
    c2[j] = c3[j] = 0;
  }
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int j = 0; j < kBlocks; ++j) {
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
  const uint32_t* words[kWords] = {c0, c1, c2, c3};
  for (int j = 0; j < kBlocks; ++j) {
    for (int w = 0; w < kWords; ++w) {
      const int32_t word = int32_t(words[w][j]);
      u[j * kWords + w] = float(word < 0 ? ~word : word) * kUniformScale;
    }
  }
}
#endif

// The (seed, offset) pair as Philox key words and stream offset, and the fp32/fp64 scale factors.
template <typename C>
struct DropoutParams {
  uint32_t key0, key1;
  uint64_t offset;
  float threshold;
  int32_t limit;  // keep_limit(threshold), for the AVX-512 bits
  C keep_scale, alpha;
  bool accumulate;
};

template <typename C>
DropoutParams<C> dropout_params(uint64_t seed, uint64_t offset, float threshold, float keep_scale, double alpha,
                                bool accumulate) {
#if defined(__AVX512F__)
  const int32_t limit = keep_limit(threshold);
#else
  const int32_t limit = 0;
#endif
  return {uint32_t(seed), uint32_t(seed >> 32), offset, threshold, limit, C(keep_scale), C(alpha), accumulate};
}

// Keep factors of stream positions [position, position + count), count <= kChunk: keep_scale where kept, 0 where
// dropped. AVX-512: from keep_bits (the one mask derivation of that build). Elsewhere: the first step starts at
// position's block and skips the words before it; every later step starts on a block boundary.
template <typename C>
inline void keep_factors(const DropoutParams<C>& params, uint64_t position, int64_t count, C* __restrict factors) {
#if defined(__AVX512F__)
  uint64_t bits[kChunk / 64 + 1];
  keep_bits(params.key0, params.key1, position, count, params.limit, bits);
  for (int64_t j = 0; j < count; ++j) factors[j] = (bits[j >> 6] >> (j & 63)) & 1u ? params.keep_scale : C(0);
#else
  alignas(64) float u[kStep];
  for (int64_t done = 0; done < count;) {
    const int skip = int(position & 3);
    philox_uniform_blocks(params.key0, params.key1, position >> 2, u);
    const int64_t take = count - done < kStep - skip ? count - done : kStep - skip;
    for (int64_t j = 0; j < take; ++j) factors[done + j] = u[skip + j] > params.threshold ? params.keep_scale : C(0);
    done += take;
    position += uint64_t(take);
  }
#endif
}

// body(first, count) over the elements [0, total) whose stream positions start at `position`, in pieces of at most
// kChunk that end on kChunk boundaries of the stream: every piece but the first starts on a Philox step.
template <typename F>
inline void for_stream_pieces(uint64_t position, int64_t total, F&& body) {
  int64_t piece = kChunk - int64_t(position % uint64_t(kChunk));
  for (int64_t first = 0; first < total; first += piece, piece = kChunk) {
    body(first, total - first < piece ? total - first : piece);
  }
}

// ---- the mask kept as bits from forward to backward -----------------------------------------------------------
// keep [m, keep_words(k)]: bit c % 64 of word c / 64 of row i is 1 where mask element i * k + c is kept; the bits
// past k are 0. lora_down writes it as it makes x_d; lora_branch_grads reads it instead of drawing the mask again.
inline int64_t keep_words(int64_t k) { return (k + 63) / 64; }

// ORs bits [0, count) of `bits` into a zeroed keep row (of `words` words) from column `first` on.
inline void deposit_bits(const uint64_t* bits, int64_t count, uint64_t* row, int64_t words, int64_t first) {
  const int shift = int(first & 63);
  for (int64_t w = 0; w < (count + 63) / 64; ++w) {
    uint64_t value = bits[w];
    if (64 * (w + 1) > count) value &= (uint64_t(1) << (count - 64 * w)) - 1;  // the bits past count are padding
    const int64_t at = (first >> 6) + w;
    row[at] |= value << shift;
    if (shift != 0 && at + 1 < words) row[at + 1] |= value >> (64 - shift);
  }
}

// Bits [c0, c0 + width) of a keep row into bits[0 .. (width + 63) / 64], as keep_bits lays them out.
inline void row_bits(const uint64_t* row, int64_t words, int64_t c0, int64_t width, uint64_t* bits) {
  const int shift = int(c0 & 63);
  for (int64_t w = 0; w <= (width + 63) / 64; ++w) {
    const int64_t at = (c0 >> 6) + w;
    const uint64_t low = at < words ? row[at] : 0, high = at + 1 < words ? row[at + 1] : 0;
    bits[w] = shift == 0 ? low : (low >> shift) | (high << (64 - shift));
  }
}

// keep for every row from the mask drawn afresh: the paths that do not make x_d and the bits in one pass.
template <typename C>
void write_keep_rows(const DropoutParams<C>& params, int64_t m, int64_t k, uint64_t* keep) {
  const int64_t words = keep_words(k);
  std::fill(keep, keep + m * words, uint64_t(0));
  C factors[kChunk];
  for (int64_t i = 0; i < m; ++i) {
    uint64_t* row = keep + i * words;
    for_stream_pieces(params.offset + uint64_t(i * k), k, [&](int64_t first, int64_t count) {
      keep_factors(params, params.offset + uint64_t(i * k + first), count, factors);
      for (int64_t j = 0; j < count; ++j)
        if (factors[j] != C(0)) row[(first + j) >> 6] |= uint64_t(1) << ((first + j) & 63);
    });
  }
}

// dst[0, count) (+)= alpha * (keep ? src * keep_scale : 0) over mask elements [mask_first, mask_first + count);
// count <= kChunk. A select, not a product with the 0 factor: an inf or NaN at a dropped element gives 0, as
// the reference's torch.where does (keep_scale = 1 / (1 - p) >= 1 is never 0).
template <typename T, typename C>
inline void dropout_chunk(const T* __restrict src, T* __restrict dst, int64_t mask_first, int64_t count,
                          const DropoutParams<C>& params) {
  C factors[kChunk], values[kChunk], current[kChunk];
  keep_factors(params, params.offset + uint64_t(mask_first), count, factors);
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

#if defined(__AVX512F__)
// The same for float and bf16 data in registers: the mask as bits, dropped lanes zeroed by a masked multiply (a
// select: inf or NaN there gives 0), the products and sums as the generic loop's (alpha * (x * keep_scale), and
// current + alpha * that fused as the compiler fuses it there).
template <typename T>
inline void dropout_chunk_avx512(const T* __restrict src, T* __restrict dst, int64_t mask_first, int64_t count,
                                 const DropoutParams<float>& params) {
  uint64_t bits[kChunk / 64 + 1];
  keep_bits(params.key0, params.key1, params.offset + uint64_t(mask_first), count, params.limit, bits);
  const __m512 keep_scale = _mm512_set1_ps(params.keep_scale), alpha = _mm512_set1_ps(params.alpha);
  for (int64_t e = 0; e < count; e += 16) {
    const __mmask16 valid = pfp::lanes16(count - e);
    const __m512 dropped = _mm512_maskz_mul_ps(bits16(bits, e) & valid, load16(src + e, valid), keep_scale);
    const __m512 out =
        params.accumulate ? _mm512_fmadd_ps(alpha, dropped, load16(dst + e, valid)) : _mm512_mul_ps(alpha, dropped);
    store16(dst + e, valid, out);
  }
}

inline void dropout_chunk(const float* __restrict src, float* __restrict dst, int64_t mask_first, int64_t count,
                          const DropoutParams<float>& params) {
  dropout_chunk_avx512(src, dst, mask_first, count, params);
}
inline void dropout_chunk(const bf16* __restrict src, bf16* __restrict dst, int64_t mask_first, int64_t count,
                          const DropoutParams<float>& params) {
  dropout_chunk_avx512(src, dst, mask_first, count, params);
}
#endif

template <typename T>
void dropout_impl(const T* src, T* dst, int64_t numel, uint64_t seed, uint64_t offset, float threshold,
                  float keep_scale, double alpha, bool accumulate, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  const auto params = dropout_params<C>(seed, offset, threshold, keep_scale, alpha, accumulate);
  // chunk c: the elements whose stream positions fall in the c-th kChunk-aligned window from offset's
  const int64_t lead = int64_t(offset % uint64_t(kChunk));
  const int64_t chunks = (lead + numel + kChunk - 1) / kChunk;
  pfp::parallel_for(chunks, kChunk * 64, nthreads, [&](int64_t begin, int64_t end, int) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk == 0 ? 0 : chunk * kChunk - lead;
      const int64_t last = (chunk + 1) * kChunk - lead < numel ? (chunk + 1) * kChunk - lead : numel;
      dropout_chunk(src + first, dst + first, first, last - first, params);
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
      for_stream_pieces(offset + uint64_t(row * cols), cols, [&](int64_t first, int64_t piece) {
        dropout_chunk(src_row + first, dst_row + first, row * cols + first, piece, params);
      });
    }
  });
}

// xa[i, q] = sum_c x_d[i, c] * a[q, c], fp32 (fp64) sums rounded once; x_d = dropout(x) rounded to T as
// lora_dropout writes it when dropout, else x. One task per (i, q).
template <typename T>
void down_impl(const T* x, const T* a, T* xa, uint64_t* keep, int64_t m, int64_t k, int64_t rank, bool dropout,
               uint64_t seed, uint64_t offset, float threshold, float keep_scale, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  if (dropout && keep != nullptr)
    write_keep_rows(dropout_params<C>(seed, offset, threshold, keep_scale, 1.0, false), m, k, keep);
  // a decode step's mask (4096 draws) is a few microseconds of work, less than a parallel region costs (measured:
  // 16 us for the mask of one 4096-wide row on two threads, against about 3); its product is too where a is in
  // cache, but a decode step finds a's 128-256 KiB (16 x 4096) back in DRAM after the other layers' weights: the
  // threads split a's rows once it has 64 KiB (qlora M=1 in python -m pyfastpeft.bench --family lora, 2-core AMX
  // host: 17.6-18.1 -> 17.7-18.6 GB/s in fp32, 17.0-19.4 -> 18.3-19.4 GB/s in bf16, three runs each)
  std::vector<T> dropped;
  if (dropout) {
    dropped.resize(m * k);
    const int mask_threads = m * k >= (int64_t(1) << 15) ? nthreads : 1;
    dropout_impl(x, dropped.data(), m * k, seed, offset, threshold, keep_scale, 1.0, false, mask_threads);
    x = dropped.data();
  }
  std::vector<C> xs(m * k);
  pfp::load_row(x, xs.data(), m * k);
  const bool split = m * rank * k >= (int64_t(1) << 20) || rank * k * int64_t(sizeof(T)) >= (int64_t(1) << 16);
  const int threads = split ? nthreads : 1;
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

// ---- the LoRA branch's backward with dropout, fused ----------------------------------------------------
// One pass over x and dX for dA and dX's branch term, each mask element drawn once: columns are split over the
// threads (each owns its columns of dA and dX), and a thread walks a block of columns down every row, its dA and
// A columns in fp32 in L1/L2. kBlockCols = 15 vectors: with offset's block alignment (position mod 4 <= 3), a
// row's piece of a block spans at most 4 Philox vectors, one philox_words call.
constexpr int64_t kBlockCols = 240;
constexpr int64_t kSplitCols = 32;  // a thread's columns start on a multiple of this: no cache line of dX is shared
constexpr int kRowGroup = 8;        // rows a step: each A and dA load serves this many FMAs

#if defined(__AVX512F__)
// A step of rows [i, i + count) in the column block [c0, c0 + width): bits[r] = row i + r's keep bits there (read
// from keep where given, else drawn; all ones without dropout), and the next `count` rows of x and dX prefetched, whose
// block pieces are too short (a row apart) for the hardware prefetcher to follow.
template <typename T>
inline void step_rows(const T* x, const T* dx, int64_t m, int64_t k, int64_t c0, int64_t width, int64_t i,
                      int64_t count, bool dropout, const DropoutParams<float>& params, const uint64_t* keep,
                      uint64_t (*bits)[kChunk / 64 + 1]) {
  for (int64_t r = 0; r < count; ++r) {
    if (dropout && keep != nullptr) {
      row_bits(keep + (i + r) * keep_words(k), keep_words(k), c0, width, bits[r]);
    } else if (dropout) {
      keep_bits(params.key0, params.key1, params.offset + uint64_t((i + r) * k + c0), width, params.limit, bits[r]);
    } else {
      std::fill(bits[r], bits[r] + kChunk / 64 + 1, ~uint64_t(0));
    }
  }
  for (int64_t row = i + count; row < i + 2 * count && row < m; ++row) {
    for (int64_t byte = 0; byte < width * int64_t(sizeof(T)); byte += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(x + row * k + c0) + byte, _MM_HINT_T0);
      if (dx != nullptr) _mm_prefetch(reinterpret_cast<const char*>(dx + row * k + c0) + byte, _MM_HINT_T0);
    }
  }
}

// R rows of one column block: x, dx at (row i0, column c0) with row stride k (dx null: no dX); g = grad_xa rows
// i0.. in fp32 [R, rank]; a_block, grad_block [rank, kBlockCols] fp32; bits[r] the keep bits of row r's piece.
template <typename T, int R>
inline void branch_rows(const T* x, T* dx, const float* g, const float* a_block, float* grad_block, int64_t k,
                        int64_t rank, int64_t width, const uint64_t (*bits)[kChunk / 64 + 1], __m512 keep_scale,
                        __m512 scaling) {
  for (int64_t e = 0; e < width; e += 16) {
    const __mmask16 valid = pfp::lanes16(width - e);
    __m512 dropped[R], product[R];
    __mmask16 keep[R];
    for (int r = 0; r < R; ++r) {
      keep[r] = bits16(bits[r], e) & valid;
      dropped[r] = pfp::round16<T>(_mm512_maskz_mul_ps(keep[r], load16(x + r * k + e, valid), keep_scale));
      product[r] = _mm512_setzero_ps();
    }
    for (int64_t q = 0; q < rank; ++q) {
      const __m512 a = _mm512_loadu_ps(a_block + q * kBlockCols + e);
      __m512 grad = _mm512_loadu_ps(grad_block + q * kBlockCols + e);
      for (int r = 0; r < R; ++r) {
        const __m512 gq = _mm512_set1_ps(g[r * rank + q]);
        grad = _mm512_fmadd_ps(dropped[r], gq, grad);
        product[r] = _mm512_fmadd_ps(a, gq, product[r]);
      }
      _mm512_storeu_ps(grad_block + q * kBlockCols + e, grad);
    }
    if (dx != nullptr) {
      for (int r = 0; r < R; ++r) {
        const __m512 term = _mm512_maskz_mul_ps(keep[r], product[r], keep_scale);
        store16(dx + r * k + e, valid, _mm512_fmadd_ps(scaling, term, load16(dx + r * k + e, valid)));
      }
    }
  }
}

template <typename T>
void branch_grads_avx512(const T* x, const T* grad_xa, const T* a, T* dx, T* grad_a, const uint64_t* keep, int64_t m,
                         int64_t k, int64_t rank, bool dropout, const DropoutParams<float>& params, float scaling,
                         int nthreads) {
  std::vector<float> g(size_t(m * rank));
  pfp::load_row(grad_xa, g.data(), m * rank);
  const __m512 keep_scale = _mm512_set1_ps(dropout ? params.keep_scale : 1.0f), scale = _mm512_set1_ps(scaling);
  const int64_t splits = (k + kSplitCols - 1) / kSplitCols;
  pfp::parallel_for(splits, m * rank * kSplitCols, nthreads, [&](int64_t begin, int64_t end, int) {
    std::vector<float> a_block(size_t(rank * kBlockCols)), grad_block(size_t(rank * kBlockCols));
    uint64_t bits[kRowGroup][kChunk / 64 + 1];
    const int64_t last = end * kSplitCols < k ? end * kSplitCols : k;
    for (int64_t c0 = begin * kSplitCols; c0 < last; c0 += kBlockCols) {
      const int64_t width = last - c0 < kBlockCols ? last - c0 : kBlockCols;
      std::fill(a_block.begin(), a_block.end(), 0.0f);
      std::fill(grad_block.begin(), grad_block.end(), 0.0f);
      for (int64_t q = 0; q < rank; ++q) pfp::load_row(a + q * k + c0, a_block.data() + q * kBlockCols, width);
      auto rows = [&](int64_t i, auto count) {
        constexpr int R = decltype(count)::value;
        step_rows(x, dx, m, k, c0, width, i, R, dropout, params, keep, bits);
        branch_rows<T, R>(x + i * k + c0, dx == nullptr ? nullptr : dx + i * k + c0, g.data() + i * rank,
                          a_block.data(), grad_block.data(), k, rank, width, bits, keep_scale, scale);
      };
      int64_t i = 0;
      for (; i + kRowGroup <= m; i += kRowGroup) rows(i, std::integral_constant<int, kRowGroup>{});
      for (; i < m; ++i) rows(i, std::integral_constant<int, 1>{});
      for (int64_t q = 0; q < rank; ++q) {
        for (int64_t e = 0; e < width; e += 16) {
          const __m512 sum = _mm512_loadu_ps(grad_block.data() + q * kBlockCols + e);
          store16(grad_a + q * k + c0 + e, pfp::lanes16(width - e), _mm512_mul_ps(scale, sum));
        }
      }
    }
  });
}
#endif

#if PFP_HAS_AMX
// ---- the same for bf16 on AMX tiles (cpu/amx.h), rank <= 32 ----------------------------------------------------
// The AVX-512 path above spends most of its time on the 2 * rank multiply-adds an element; here the tiles do them.
// A thread walks its 240-column blocks as above, 32 rows a step:
//   x_d's 32 rows, made as above (a subnormal as zero, as the tiles take it), go pairwise into one B tile per 16
//   columns (VNNI: dword j of tile row p holds x_d[2p][j] low, x_d[2p + 1][j] high), and dA[16 ranks, 16 columns] +=
//   gT[16 ranks, 32 rows] . that tile; P[16 rows, 16 columns] = g[16 rows, 32 ranks] . A's B tile (rank pairs), then dX
//   += s * keep * keep_scale * P in AVX-512 as above.
// Ranks past `rank` and rows past m are zeros in g, gT, A's tiles and x_d's; the products they make land in dA rows
// and P rows that are never stored (0 * inf there is NaN, and harmless). The sums are fp32 of exact bf16 products in
// the tiles' order (the tiles treat subnormal inputs as zero).
constexpr int64_t kTileRows = 32;                // rows of x a step: one tile's K of bf16 pairs
constexpr int kColTiles = int(kBlockCols / 16);  // 16-column tiles in a block
constexpr int64_t kMaxAmxRank = 32;              // one tile's K of ranks

struct alignas(64) BranchTiles {           // one thread's tiles, ~90 KiB
  int8_t x_d[kColTiles][amx::kTileBytes];  // B tiles: this step's x_d rows, pairwise
  int8_t a[kColTiles][amx::kTileBytes];    // B tiles: the block's A, rank pairs
  float grad[2][kColTiles][256];           // dA sums, ranks [0, 16) and [16, 32): 16 x 16 fp32 a tile
  float product[kColTiles][2][256];        // P, rows [0, 16) and [16, 32) of the step
};

// dword j of a B tile row: a's lane j (bf16) low, b's lane j high.
__attribute__((target("avx512bf16"))) inline __m512i pair_rows(__m512 a, __m512 b) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, amx::tile_bf16(a, b));
}

// The step's tile products: g_t = gT [32 ranks, rows_padded] at the step's first row (row stride gt_stride bytes),
// g = the step's 32 rows of g [rows, 32 ranks] (64 bytes a row). dA's tiles take one or two rank tiles; the
// block's first `tiles` column tiles are used (a thread's last block may be narrower than kBlockCols).
__attribute__((target("amx-tile,amx-bf16"))) inline void branch_step_tiles(const bf16* g_t, int64_t gt_stride,
                                                                           const bf16* g, bool two_rank_tiles,
                                                                           bool with_dx, int tiles, BranchTiles& t) {
  _tile_loadd(4, g_t, gt_stride);
  if (two_rank_tiles) _tile_loadd(5, g_t + 16 * gt_stride / 2, gt_stride);
  if (with_dx) {
    _tile_loadd(6, g, 64);
    _tile_loadd(7, g + 16 * 32, 64);
  }
  for (int c = 0; c < tiles; ++c) {
    _tile_loadd(1, t.x_d[c], 64);
    _tile_loadd(0, t.grad[0][c], 64);
    _tile_dpbf16ps(0, 4, 1);
    _tile_stored(0, t.grad[0][c], 64);
    if (two_rank_tiles) {
      _tile_loadd(0, t.grad[1][c], 64);
      _tile_dpbf16ps(0, 5, 1);
      _tile_stored(0, t.grad[1][c], 64);
    }
    if (with_dx) {
      _tile_loadd(1, t.a[c], 64);
      _tile_zero(2);
      _tile_zero(3);
      _tile_dpbf16ps(2, 6, 1);
      _tile_dpbf16ps(3, 7, 1);
      _tile_stored(2, t.product[c][0], 64);
      _tile_stored(3, t.product[c][1], 64);
    }
  }
}

// The block's A [rank, width] at column c0 into t.a's B tiles, ranks pairwise (zero past rank and width).
__attribute__((target("avx512bf16"))) void pack_a_tiles(const bf16* a, int64_t k, int64_t rank, int64_t c0,
                                                        int64_t width, BranchTiles& t) {
  for (int c = 0; 16 * c < width; ++c) {
    const __mmask16 valid = pfp::lanes16(width - 16 * c);
    for (int64_t p = 0; p < kMaxAmxRank / 2; ++p) {
      const __m512 even = 2 * p < rank ? load16(a + 2 * p * k + c0 + 16 * c, valid) : _mm512_setzero_ps();
      const __m512 odd = 2 * p + 1 < rank ? load16(a + (2 * p + 1) * k + c0 + 16 * c, valid) : _mm512_setzero_ps();
      _mm512_store_si512(t.a[c] + 64 * p, pair_rows(even, odd));
    }
  }
}

// The step's x_d rows into t.x_d's B tiles, rows pairwise: x at the step's first row and the block's first column,
// row stride k; `rows` rows (zero past them and past width); bits[r] row r's keep bits from the block's first column.
__attribute__((target("avx512bf16"))) void pack_x_d_tiles(const bf16* x, int64_t k, int64_t rows, int64_t width,
                                                          const uint64_t (*bits)[kChunk / 64 + 1], __m512 keep_scale,
                                                          BranchTiles& t) {
  for (int c = 0; 16 * c < width; ++c) {
    const __mmask16 valid = pfp::lanes16(width - 16 * c);
    auto dropped = [&](int64_t r) {
      if (r >= rows) return _mm512_setzero_ps();
      return _mm512_maskz_mul_ps(bits16(bits[r], 16 * c) & valid, load16(x + r * k + 16 * c, valid), keep_scale);
    };
    for (int64_t p = 0; p < kTileRows / 2; ++p)
      _mm512_store_si512(t.x_d[c] + 64 * p, pair_rows(dropped(2 * p), dropped(2 * p + 1)));
  }
}

// dX += s * keep * keep_scale * P over the step's rows, 32 columns at a time: dx at the step's first row and the
// block's first column, row stride k; P in t.product; bits as pack_x_d_tiles.
__attribute__((target("avx512bf16"))) void add_dx_terms(bf16* dx, int64_t k, int64_t rows, int64_t width,
                                                        const uint64_t (*bits)[kChunk / 64 + 1], __m512 keep_scale,
                                                        __m512 scale, const BranchTiles& t) {
  for (int64_t r = 0; r < rows; ++r) {
    bf16* out = dx + r * k;
    auto sum = [&](int c) {
      const __mmask16 valid = pfp::lanes16(width - 16 * c);
      const __mmask16 keep = bits16(bits[r], 16 * c) & valid;
      const __m512 term = _mm512_maskz_mul_ps(keep, _mm512_load_ps(t.product[c][r / 16] + 16 * (r % 16)), keep_scale);
      return _mm512_fmadd_ps(scale, term, load16(out + 16 * c, valid));
    };
    for (int c = 0; 16 * c < width; c += 2) {
      const __m512 high = 16 * (c + 1) < width ? sum(c + 1) : _mm512_setzero_ps();
      _mm512_mask_storeu_epi16(out + 16 * c, __mmask32(pfp::lanes64(width - 16 * c)), amx::round32_bf16(sum(c), high));
    }
  }
}

void branch_grads_amx(const bf16* x, const bf16* grad_xa, const bf16* a, bf16* dx, bf16* grad_a, const uint64_t* keep,
                      int64_t m, int64_t k, int64_t rank, bool dropout, const DropoutParams<float>& params,
                      float scaling, int nthreads) {
  const int64_t rows_padded = (m + kTileRows - 1) / kTileRows * kTileRows;
  // g [rows_padded, 32] and gT [32, rows_padded], zero-padded: both read straight into A tiles
  std::vector<bf16> g(size_t(rows_padded * kMaxAmxRank), bf16{0}), g_t(size_t(kMaxAmxRank * rows_padded), bf16{0});
  for (int64_t i = 0; i < m; ++i)
    for (int64_t q = 0; q < rank; ++q) {
      g[size_t(i * kMaxAmxRank + q)] = grad_xa[i * rank + q];
      g_t[size_t(q * rows_padded + i)] = grad_xa[i * rank + q];
    }
  const bool two_rank_tiles = rank > 16;
  const __m512 keep_scale = _mm512_set1_ps(dropout ? params.keep_scale : 1.0f), scale = _mm512_set1_ps(scaling);
  const int64_t splits = (k + kSplitCols - 1) / kSplitCols;
  pfp::parallel_for(splits, m * rank * kSplitCols, nthreads, [&](int64_t begin, int64_t end, int) {
    amx::Aligned scratch(int64_t(sizeof(BranchTiles)));
    BranchTiles& t = *reinterpret_cast<BranchTiles*>(scratch.data);
    uint64_t bits[kTileRows][kChunk / 64 + 1];
    amx::configure();
    const int64_t last = end * kSplitCols < k ? end * kSplitCols : k;
    for (int64_t c0 = begin * kSplitCols; c0 < last; c0 += kBlockCols) {
      const int64_t width = last - c0 < kBlockCols ? last - c0 : kBlockCols;
      const int tiles = int((width + 15) / 16);
      std::fill_n(&t.grad[0][0][0], 2 * kColTiles * 256, 0.0f);
      pack_a_tiles(a, k, rank, c0, width, t);
      for (int64_t i0 = 0; i0 < m; i0 += kTileRows) {
        const int64_t rows = m - i0 < kTileRows ? m - i0 : kTileRows;
        step_rows(x, dx, m, k, c0, width, i0, rows, dropout, params, keep, bits);
        pack_x_d_tiles(x + i0 * k + c0, k, rows, width, bits, keep_scale, t);
        branch_step_tiles(g_t.data() + i0, rows_padded * 2, g.data() + i0 * kMaxAmxRank, two_rank_tiles, dx != nullptr,
                          tiles, t);
        if (dx != nullptr) add_dx_terms(dx + i0 * k + c0, k, rows, width, bits, keep_scale, scale, t);
      }
      for (int64_t q = 0; q < rank; ++q)
        for (int c = 0; c < tiles; ++c)
          store16(grad_a + q * k + c0 + 16 * c, pfp::lanes16(width - 16 * c),
                  _mm512_mul_ps(scale, _mm512_load_ps(t.grad[q / 16][c] + 16 * (q % 16))));
    }
    amx::release();
  });
}

// ---- pieces the AMX down-projection and up-projection grads share ----------------------------------------------
// Tiles 0..3 hold a step's fp32 sums for 32 rows and 32 columns: tile 2 h + t is rows [16 h, + 16), columns
// [16 t, + 16).
__attribute__((target("amx-tile"))) inline void zero_sum_tiles() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// The sum tiles rounded to bf16 into out's first `rows` rows and `cols` columns (row stride cols).
__attribute__((target("amx-tile"))) inline void store_sum_tiles(int64_t rows, int64_t cols, bf16* out) {
  alignas(64) float sums[4][256];
  _tile_stored(0, sums[0], 64);
  _tile_stored(1, sums[1], 64);
  _tile_stored(2, sums[2], 64);
  _tile_stored(3, sums[3], 64);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      out[i * cols + j] = pfp::to_bf16(sums[2 * (i / 16) + j / 16][(i % 16) * 16 + j % 16]);
}

// ---- the down-projection of many rows on AMX tiles or by AVX512-BF16 (bf16, rank <= 32) -----------------------
// xa = x_d A^T a block of 32 rows at a time: the block's x_d rows, made as lora_dropout makes them (but for a
// subnormal value, which make_x_d leaves zero and the tiles would take as zero), go into the thread's scratch (zero
// past k and m), read as A tiles 32 columns a step; A^T is packed once as B tiles (dword
// q of row p holds a[q][2p] low, a[q][2p + 1] high; zero past k and rank). Without dropout a whole block is read
// from x in place. Sums are fp32 of exact bf16 products in the tiles' order; the tiles take subnormal inputs as zero.
// A CPU with AVX512-BF16 but no AMX (AMD Zen 4) makes the same blocks and multiplies them with vdpbf16ps
// (down_block_vectors), where the dropout pass and torch's skinny GEMM this replaces read x at 5-7 GB/s.
constexpr int64_t kDownAmxMinRows = 32;  // fewer rows (a decode step) take down_impl

// The block's sums into tiles 0..3 (zero_sum_tiles' layout).
__attribute__((target("amx-tile,amx-bf16"))) inline void down_block_tiles(const bf16* rows, int64_t ld,
                                                                          const int8_t* a_tiles, int64_t steps,
                                                                          bool two_rank_tiles) {
  zero_sum_tiles();
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, rows + 32 * s, ld * 2);
    _tile_loadd(5, rows + 16 * ld + 32 * s, ld * 2);
    _tile_loadd(6, a_tiles + 2 * s * amx::kTileBytes, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (two_rank_tiles) {
      _tile_loadd(7, a_tiles + (2 * s + 1) * amx::kTileBytes, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// The same sums without tiles, on a CPU with AVX512-BF16 but no AMX (AMD Zen 4): xa rows [0, rows) of the block
// (row stride ld, zero past k) times the packed A^T, eight rows a pass, one vdpbf16ps a row per pair of columns
// with the pair broadcast against A's 16 ranks of it; fp32 sums of exact products in column-pair order (the
// instruction, like the tiles, takes a subnormal input as zero), rounded once into xa [rows, rank].
__attribute__((target("avx512bf16"))) void down_block_vectors(const bf16* block, int64_t ld, const int8_t* a_tiles,
                                                              int64_t steps, int64_t rows, int64_t rank, bf16* xa) {
  constexpr int kRows = 8;
  for (int64_t t = 0; 16 * t < rank; ++t) {
    const int64_t ranks = rank - 16 * t < 16 ? rank - 16 * t : 16;
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      __m512 acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t s = 0; s < steps; ++s) {
        const int8_t* tile = a_tiles + (2 * s + t) * amx::kTileBytes;
        for (int64_t p = 0; p < 16; ++p) {
          const __m512bh a_pairs = reinterpret_cast<__m512bh>(_mm512_load_si512(tile + 64 * p));
          const int64_t column_pair = 16 * s + p;
          for (int r = 0; r < kRows; ++r) {
            int32_t pair;  // x rows may start on any bf16 (a view's offset): no int32 access
            std::memcpy(&pair, block + (r0 + r) * ld + 2 * column_pair, sizeof(pair));
            const __m512i x_pair = _mm512_set1_epi32(pair);
            acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(x_pair), a_pairs);
          }
        }
      }
      for (int r = 0; r < kRows && r0 + r < rows; ++r) {
        alignas(64) float sums[16];
        _mm512_store_ps(sums, acc[r]);
        for (int64_t q = 0; q < ranks; ++q) xa[(r0 + r) * rank + 16 * t + q] = pfp::to_bf16(sums[q]);
      }
    }
  }
}

// x_d[0, count) = keep ? x * keep_scale : 0, rounded to bf16 for the tiles: bit e of bits keeps element e.
__attribute__((target("avx512bf16"))) void make_x_d(const bf16* x, bf16* x_d, int64_t count, const uint64_t* bits,
                                                    __m512 keep_scale) {
  for (int64_t e = 0; e < count; e += 32) {
    const __mmask16 low = pfp::lanes16(count - e), high = pfp::lanes16(count - e - 16);
    const __m512 a = _mm512_maskz_mul_ps(bits16(bits, e) & low, load16(x + e, low), keep_scale);
    const __m512 b = _mm512_maskz_mul_ps(bits16(bits, e + 16) & high, load16(x + e + 16, high), keep_scale);
    _mm512_mask_storeu_epi16(x_d + e, __mmask32(pfp::lanes64(count - e)), amx::tile_bf16(a, b));
  }
}

// tiles: AMX; else down_block_vectors (AVX512-BF16 only).
void down_bf16_blocks(const bf16* x, const bf16* a, bf16* xa, uint64_t* keep, int64_t m, int64_t k, int64_t rank,
                      bool dropout, const DropoutParams<float>& params, bool tiles, int nthreads) {
  const int64_t words = keep_words(k);
  const __m512 keep_scale = _mm512_set1_ps(params.keep_scale);
  const int64_t steps = (k + 31) / 32, k_padded = 32 * steps, row_blocks = (m + 31) / 32;
  const bool two_rank_tiles = rank > 16;
  amx::Aligned a_tiles(steps * 2 * amx::kTileBytes);  // A^T [k, rank]'s B tiles
  amx::pack_pair_tiles(a, k, rank, 1, k, a_tiles.data);
  pfp::parallel_for(row_blocks, 32 * k * (dropout ? 64 : 1), nthreads, [&](int64_t begin, int64_t end, int) {
    amx::Aligned scratch(32 * k_padded * int64_t(sizeof(bf16)));
    bf16* block = reinterpret_cast<bf16*>(scratch.data);
    if (tiles) amx::configure();
    for (int64_t rb = begin; rb < end; ++rb) {
      const int64_t i0 = 32 * rb, rows = m - i0 < 32 ? m - i0 : 32;
      const bf16* src = x + i0 * k;
      int64_t ld = k;
      if (dropout || rows < 32 || k != k_padded) {
        for (int64_t r = 0; r < 32; ++r) {
          bf16* out = block + r * k_padded;
          int64_t made = 0;
          if (r < rows && dropout) {  // x_d as dropout_chunk makes it (alpha 1), its bits kept where asked
            const int64_t row_first = (i0 + r) * k;
            uint64_t* keep_row = keep == nullptr ? nullptr : keep + (i0 + r) * words;
            if (keep_row != nullptr) std::fill(keep_row, keep_row + words, uint64_t(0));
            for_stream_pieces(params.offset + uint64_t(row_first), k, [&](int64_t first, int64_t count) {
              uint64_t bits[kChunk / 64 + 1];
              keep_bits(params.key0, params.key1, params.offset + uint64_t(row_first + first), count, params.limit,
                        bits);
              make_x_d(x + row_first + first, out + first, count, bits, keep_scale);
              if (keep_row != nullptr) deposit_bits(bits, count, keep_row, words, first);
            });
            made = k;
          } else if (r < rows) {
            std::copy_n(x + (i0 + r) * k, k, out);
            made = k;
          }
          std::fill(out + made, out + k_padded, bf16{0});
        }
        src = block;
        ld = k_padded;
      }
      if (tiles) {
        down_block_tiles(src, ld, a_tiles.data, steps, two_rank_tiles);
        store_sum_tiles(rows, rank, xa + i0 * rank);
      } else {
        down_block_vectors(src, ld, a_tiles.data, steps, rows, rank, xa + i0 * rank);
      }
    }
    if (tiles) amx::release();
  });
}

// ---- the up-projection's grads on AMX tiles or by AVX512-BF16 (bf16, rank <= 32) ------------------------------
// grad_xa = dY B and grad_b = s dY^T xa both read all of dY; here one pass does both. A thread walks its blocks of
// 32 rows of dY, 32 columns a step:
//   g[32 rows, 32 ranks] += dY block (two A tiles: rows [0, 16) and [16, 32), 32 columns) . B's tile of those
//   columns (B tile: dword q of row p holds b[2p][q] low, b[2p + 1][q] high), the sums kept in tiles 0..3 across the
//   row's steps;
//   dB^T[16 ranks, 16 columns] += xa^T's tile [16 ranks, the block's 32 rows] . the block's rows pairwise (B tile:
//   dword j of row p holds dY[2p][j] low, dY[2p + 1][j] high), into the thread's fp32 sums of every column.
// The threads' dB sums are added at the end. A block that crosses m or n is first copied, zero-padded, into the
// thread's scratch; b and xa are zero past n, m and rank, so padding adds nothing (0 * inf there is NaN in a sum no
// output reads). Sums are fp32 of exact bf16 products in the tiles' order; the tiles take subnormal inputs as zero.
// A CPU with AVX512-BF16 but no AMX takes the same steps with vdpbf16ps (up_step_vectors).
struct alignas(64) UpTiles {         // one thread's scratch, 6 KiB
  int8_t block[2][amx::kTileBytes];  // a dY block crossing m or n, zero-padded: 32 rows x 32 columns
  int8_t pairs[2][amx::kTileBytes];  // B tiles: the block's rows pairwise, columns [0, 16) and [16, 32)
  int8_t xa_t[2][amx::kTileBytes];   // A tiles: xa^T of the block's rows, ranks [0, 16) and [16, 32)
};

// The block's 32 rows pairwise, columns [16 c, 16 c + 16): dword j of row p holds dY[2p][16 c + j] low and
// dY[2p + 1][16 c + j] high (a B tile, and the vectors' operand).
inline void pair_rows_of_block(const bf16* dy, int64_t ld, int c, int8_t* pairs) {
  for (int p = 0; p < 16; ++p) {
    const __m512i even =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dy + 2 * p * ld + 16 * c)));
    const __m512i odd =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dy + (2 * p + 1) * ld + 16 * c)));
    _mm512_store_si512(pairs + 64 * p, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
  }
}

// The step's tile products (tile registers: 0..3 the g sums, 4..7 operands). dy: the block's first element, rows
// `ld` elements apart; b_tiles: the step's B tiles (one per rank tile); dbt: the thread's dB^T sums of the step's
// first 16-column tile, rank tile t at dbt + t * tile_stride floats.
__attribute__((target("amx-tile,amx-bf16"))) inline void up_step_tiles(const bf16* dy, int64_t ld,
                                                                       const int8_t* b_tiles, bool two_rank_tiles,
                                                                       int columns, float* dbt, int64_t tile_stride,
                                                                       UpTiles& t) {
  _tile_loadd(4, dy, ld * 2);
  _tile_loadd(5, dy + 16 * ld, ld * 2);
  _tile_loadd(6, b_tiles, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(2, 5, 6);
  if (two_rank_tiles) {
    _tile_loadd(7, b_tiles + amx::kTileBytes, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
  for (int c = 0; c < 2; ++c) pair_rows_of_block(dy, ld, c, t.pairs[c]);
  for (int c = 0; c < columns; ++c) {
    _tile_loadd(4, t.pairs[c], 64);
    for (int r = 0; r < (two_rank_tiles ? 2 : 1); ++r) {
      float* sums = dbt + r * tile_stride + c * 256;
      _tile_loadd(5, t.xa_t[r], 64);
      _tile_loadd(6, sums, 64);
      _tile_dpbf16ps(6, 5, 4);
      _tile_stored(6, sums, 64);
    }
  }
}

// up_step_tiles without tiles, on a CPU with AVX512-BF16 but no AMX (AMD Zen 4): the same sums by vdpbf16ps, each
// a broadcast pair against 16 lanes. g: the block's 32 rows x 32 ranks of fp32 sums (row i at g + 32 i), across the
// row's steps; dbt as up_step_tiles'. dY's rows pairwise go into t.pairs first, as there.
__attribute__((target("avx512bf16"))) void up_step_vectors(const bf16* dy, int64_t ld, const int8_t* b_tiles,
                                                           int rank_tiles, int columns, float* g, float* dbt,
                                                           int64_t tile_stride, UpTiles& t) {
  // g[i][16 u + q] += sum over the step's column pairs P of dY[i][2P..2P+1] . B[2P..2P+1][16 u + q]
  for (int64_t i0 = 0; i0 < 32; i0 += 8) {
    for (int u = 0; u < rank_tiles; ++u) {
      __m512 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm512_load_ps(g + (i0 + r) * 32 + 16 * u);
      for (int p = 0; p < 16; ++p) {
        const __m512bh b_pairs = reinterpret_cast<__m512bh>(_mm512_load_si512(b_tiles + u * amx::kTileBytes + 64 * p));
        for (int r = 0; r < 8; ++r) {
          int32_t pair;  // dY rows may start on any bf16: no int32 access
          std::memcpy(&pair, dy + (i0 + r) * ld + 2 * p, sizeof(pair));
          acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)), b_pairs);
        }
      }
      for (int r = 0; r < 8; ++r) _mm512_store_ps(g + (i0 + r) * 32 + 16 * u, acc[r]);
    }
  }
  for (int c = 0; c < columns; ++c) {
    pair_rows_of_block(dy, ld, c, t.pairs[c]);
    // dB^T[q][j] += sum over the block's row pairs p of xa[2p..2p+1][q] . dY[2p..2p+1][j]: the 16 ranks' sums side
    // by side (one chain of dependent vdpbf16ps a rank waited on their latency)
    for (int u = 0; u < rank_tiles; ++u) {
      float* sums = dbt + u * tile_stride + c * 256;
      const uint32_t* xa_pairs = reinterpret_cast<const uint32_t*>(t.xa_t[u]);  // row q: 16 dwords of row pairs
      __m512 acc[16];
      for (int q = 0; q < 16; ++q) acc[q] = _mm512_loadu_ps(sums + 16 * q);  // a vector's storage: 16-byte aligned
      for (int p = 0; p < 16; ++p) {
        const __m512bh dy_pairs = reinterpret_cast<__m512bh>(_mm512_load_si512(t.pairs[c] + 64 * p));
        for (int q = 0; q < 16; ++q) {
          const __m512i pair = _mm512_set1_epi32(int32_t(xa_pairs[16 * q + p]));
          acc[q] = _mm512_dpbf16_ps(acc[q], reinterpret_cast<__m512bh>(pair), dy_pairs);
        }
      }
      for (int q = 0; q < 16; ++q) _mm512_storeu_ps(sums + 16 * q, acc[q]);
    }
  }
}

// tiles: AMX; else up_step_vectors (AVX512-BF16 only).
void up_grads_bf16_blocks(const bf16* dy, const bf16* b, const bf16* xa, bf16* grad_xa, bf16* grad_b, int64_t m,
                          int64_t n, int64_t rank, float scaling, bool tiles, int nthreads) {
  const int64_t steps = (n + 31) / 32, col_tiles = 2 * steps, row_blocks = (m + 31) / 32;
  const bool two_rank_tiles = rank > 16;
  const int rank_tiles = two_rank_tiles ? 2 : 1;
  amx::Aligned b_tiles(steps * 2 * amx::kTileBytes);  // B [n, rank]'s B tiles
  amx::pack_pair_tiles(b, n, rank, rank, 1, b_tiles.data);
  // each thread's dB^T sums: rank tile r, column tile c at (r * col_tiles + c) * 256, a 16 x 16 fp32 tile
  const int64_t sums_size = rank_tiles * col_tiles * 256;
  std::vector<std::vector<float>> dbt(size_t(nthreads > 0 ? nthreads : 1));
  pfp::parallel_for(row_blocks, 32 * n * rank, nthreads, [&](int64_t begin, int64_t end, int tid) {
    std::vector<float>& sums = dbt[size_t(tid)];
    sums.assign(size_t(sums_size), 0.0f);
    amx::Aligned scratch(int64_t(sizeof(UpTiles)) + 32 * 32 * int64_t(sizeof(float)));
    UpTiles& t = *reinterpret_cast<UpTiles*>(scratch.data);
    float* g = reinterpret_cast<float*>(scratch.data + sizeof(UpTiles));  // the vectors' grad_xa sums of a block
    if (tiles) amx::configure();
    for (int64_t rb = begin; rb < end; ++rb) {
      const int64_t i0 = 32 * rb, rows = m - i0 < 32 ? m - i0 : 32;
      for (int r = 0; r < 2; ++r) {
        bf16* tile = reinterpret_cast<bf16*>(t.xa_t[r]);
        for (int64_t q = 0; q < 16; ++q)
          for (int64_t i = 0; i < 32; ++i)
            tile[q * 32 + i] = i < rows && 16 * r + q < rank ? xa[(i0 + i) * rank + 16 * r + q] : bf16{0};
      }
      if (tiles)
        zero_sum_tiles();
      else
        std::fill(g, g + 32 * 32, 0.0f);
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t j0 = 32 * s, cols = n - j0 < 32 ? n - j0 : 32;
        const bf16* src = dy + i0 * n + j0;
        int64_t ld = n;
        if (rows < 32 || cols < 32) {
          bf16* block = reinterpret_cast<bf16*>(t.block[0]);
          for (int64_t i = 0; i < 32; ++i)
            for (int64_t j = 0; j < 32; ++j) block[i * 32 + j] = i < rows && j < cols ? src[i * n + j] : bf16{0};
          src = block;
          ld = 32;
        }
        if (tiles)
          up_step_tiles(src, ld, b_tiles.data + s * 2 * amx::kTileBytes, two_rank_tiles, cols > 16 ? 2 : 1,
                        sums.data() + 2 * s * 256, col_tiles * 256, t);
        else
          up_step_vectors(src, ld, b_tiles.data + s * 2 * amx::kTileBytes, rank_tiles, cols > 16 ? 2 : 1, g,
                          sums.data() + 2 * s * 256, col_tiles * 256, t);
      }
      if (tiles) {
        store_sum_tiles(rows, rank, grad_xa + i0 * rank);
      } else {
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t q = 0; q < rank; ++q) grad_xa[(i0 + i) * rank + q] = pfp::to_bf16(g[i * 32 + q]);
      }
    }
    if (tiles) amx::release();
  });
  // grad_b[j, q] = s * (the threads' dB^T sums at rank q, column j), rounded once: a 16 x 16 tile at a time, its
  // threads' sums added in thread order (0 + first + second ...) as vectors over j, then read back by columns
  // (transposed) and stored as 16 ranks of a row of grad_b. Its cost does not depend on m: vectors keep it small
  // beside the products for a few dozen rows.
  std::vector<const float*> partials;
  for (const std::vector<float>& sums : dbt)
    if (!sums.empty()) partials.push_back(sums.data());
  const __m512i columns_of = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(16));  // lane q: tile element (q, 0)
  for (int64_t u = 0; u < rank_tiles; ++u) {
    const int64_t ranks = rank - 16 * u < 16 ? rank - 16 * u : 16;
    const __mmask16 valid = __mmask16((1u << ranks) - 1u);
    for (int64_t c = 0; c < col_tiles; ++c) {
      alignas(64) float tile[256];  // tile[q * 16 + jj]: dB^T[16 u + q][16 c + jj]
      const int64_t at = (u * col_tiles + c) * 256;
      for (int64_t q = 0; q < 16; ++q) {
        __m512 sum = _mm512_setzero_ps();
        for (const float* sums : partials) sum = _mm512_add_ps(sum, _mm512_loadu_ps(sums + at + 16 * q));
        _mm512_store_ps(tile + 16 * q, sum);
      }
      for (int64_t jj = 0; jj < 16 && 16 * c + jj < n; ++jj) {
        const __m512 column = _mm512_i32gather_ps(_mm512_add_epi32(columns_of, _mm512_set1_epi32(int(jj))), tile, 4);
        pfp::store16(grad_b + (16 * c + jj) * rank + 16 * u, valid, _mm512_mul_ps(_mm512_set1_ps(scaling), column));
      }
    }
  }
}
#endif

// The same in plain loops (the AVX2 and scalar builds, fp16 and fp64 data), the mask as keep factors.
template <typename T>
void branch_grads_loops(const T* x, const T* grad_xa, const T* a, T* dx, T* grad_a, const uint64_t* keep, int64_t m,
                        int64_t k, int64_t rank, bool dropout,
                        const DropoutParams<typename pfp::Compute<T>::type>& params, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  std::vector<C> g(size_t(m * rank));
  pfp::load_row(grad_xa, g.data(), m * rank);
  const C one = C(1);
  const int64_t splits = (k + kSplitCols - 1) / kSplitCols;
  pfp::parallel_for(splits, m * rank * kSplitCols, nthreads, [&](int64_t begin, int64_t end, int) {
    std::vector<C> a_block(size_t(rank * kBlockCols)), grad_block(size_t(rank * kBlockCols));
    C factors[kBlockCols], dropped[kBlockCols], product[kBlockCols], current[kBlockCols];
    const int64_t last = end * kSplitCols < k ? end * kSplitCols : k;
    for (int64_t c0 = begin * kSplitCols; c0 < last; c0 += kBlockCols) {
      const int64_t width = last - c0 < kBlockCols ? last - c0 : kBlockCols;
      std::fill(grad_block.begin(), grad_block.end(), C(0));
      for (int64_t q = 0; q < rank; ++q) pfp::load_row(a + q * k + c0, a_block.data() + q * kBlockCols, width);
      for (int64_t i = 0; i < m; ++i) {
        if (dropout && keep != nullptr) {
          const uint64_t* row = keep + i * keep_words(k);
          for (int64_t c = 0; c < width; ++c)
            factors[c] = (row[(c0 + c) >> 6] >> ((c0 + c) & 63)) & 1u ? params.keep_scale : C(0);
        } else if (dropout) {
          keep_factors(params, params.offset + uint64_t(i * k + c0), width, factors);
        } else {
          std::fill(factors, factors + width, one);
        }
        pfp::load_row(x + i * k + c0, dropped, width);
        for (int64_t c = 0; c < width; ++c) {
          dropped[c] = factors[c] != C(0) ? pfp::round_to<T>(dropped[c] * factors[c]) : C(0);
          product[c] = C(0);
        }
        for (int64_t q = 0; q < rank; ++q) {
          const C gq = g[i * rank + q];
          C* grad = grad_block.data() + q * kBlockCols;
          const C* a_row = a_block.data() + q * kBlockCols;
          for (int64_t c = 0; c < width; ++c) {
            grad[c] += dropped[c] * gq;
            product[c] += a_row[c] * gq;
          }
        }
        if (dx != nullptr) {
          pfp::load_row(dx + i * k + c0, current, width);
          for (int64_t c = 0; c < width; ++c) {
            current[c] += params.alpha * (factors[c] != C(0) ? product[c] * factors[c] : C(0));
          }
          pfp::store_row(current, dx + i * k + c0, width);
        }
      }
      for (int64_t q = 0; q < rank; ++q) {
        C* grad = grad_block.data() + q * kBlockCols;
        for (int64_t c = 0; c < width; ++c) grad[c] *= params.alpha;
        pfp::store_row(grad, grad_a + q * k + c0, width);
      }
    }
  });
}

// The up-projection's grads in plain loops (every build and dtype but bf16 on AMX): sums in the compute type.
template <typename T>
void up_grads_loops(const T* dy, const T* b, const T* xa, T* grad_xa, T* grad_b, int64_t m, int64_t n, int64_t rank,
                    double scaling, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  std::vector<C> b_c(size_t(n * rank)), xa_c(size_t(m * rank));
  pfp::load_row(b, b_c.data(), n * rank);
  pfp::load_row(xa, xa_c.data(), m * rank);
  pfp::parallel_for(m, n * rank, nthreads, [&](int64_t begin, int64_t end, int) {  // grad_xa, a row at a time
    std::vector<C> row(static_cast<size_t>(n)), sums(static_cast<size_t>(rank));
    for (int64_t i = begin; i < end; ++i) {
      pfp::load_row(dy + i * n, row.data(), n);
      std::fill(sums.begin(), sums.end(), C(0));
      for (int64_t j = 0; j < n; ++j)
        for (int64_t q = 0; q < rank; ++q) sums[size_t(q)] += row[size_t(j)] * b_c[size_t(j * rank + q)];
      pfp::store_row(sums.data(), grad_xa + i * rank, rank);
    }
  });
  pfp::parallel_for(n, m * rank, nthreads, [&](int64_t begin, int64_t end, int) {  // grad_b, a range of columns
    std::vector<C> row(size_t(end - begin)), sums(size_t((end - begin) * rank), C(0));
    for (int64_t i = 0; i < m; ++i) {
      pfp::load_row(dy + i * n + begin, row.data(), end - begin);
      for (int64_t j = 0; j < end - begin; ++j)
        for (int64_t q = 0; q < rank; ++q) sums[size_t(j * rank + q)] += row[size_t(j)] * xa_c[size_t(i * rank + q)];
    }
    for (C& v : sums) v *= C(scaling);
    pfp::store_row(sums.data(), grad_b + begin * rank, (end - begin) * rank);
  });
}

}  // namespace

// lora_down: LoRA's down-projection, xa[m, rank] = dropout(x)[m, k] @ a[rank, k]^T, the dropped x exactly as
// lora_dropout makes it (alpha 1; rounded to the dtype) when dropout, the sums in fp32 (fp64 for fp64) rounded
// once. x, a, xa: contiguous, of `dtype`; m, k >= 0, rank >= 1. seed, offset, threshold, keep_scale: as lora_dropout.
// keep: null, or (with dropout) int64 [m, ceil(k / 64)] that receives the mask's bits for lora_branch_grads (bit c % 64
// of word c / 64 of row i: element i * k + c kept; bits past k zero), drawn with x_d in down_bf16_blocks.
// bf16 at rank <= 32 and m >= 32 runs on AMX tiles where pfp::amx_in_use() (the training forward's, from Python), or
// with AVX512-BF16 dot products where pfp::avx512_bf16_in_use() and no AMX: the sums in the tiles' order or in
// column-pair order, a subnormal x_d or a element counting as zero. Otherwise down_impl, which is built
// for the few rows of a decode step (lora_nf4_gemv in nf4.cpp runs it before its GEMV, so the step is one call).
void lora_down(const void* x, const void* a, void* xa, void* keep, int64_t m, int64_t k, int64_t rank, int dtype,
               bool dropout, int64_t seed, int64_t offset, float threshold, float keep_scale, int nthreads) {
  pfp::dispatch_float(dtype, "lora_down", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
#if PFP_HAS_AMX
    if constexpr (std::is_same_v<T, bf16>) {
      const bool tiles = pfp::amx_in_use();
      if ((tiles || pfp::avx512_bf16_in_use()) && rank <= kMaxAmxRank && m >= kDownAmxMinRows) {
        const auto params = dropout_params<float>(uint64_t(seed), uint64_t(offset), threshold, keep_scale, 1.0, false);
        down_bf16_blocks(static_cast<const bf16*>(x), static_cast<const bf16*>(a), static_cast<bf16*>(xa),
                         static_cast<uint64_t*>(keep), m, k, rank, dropout, params, tiles, nthreads);
        return;
      }
    }
#endif
    down_impl(static_cast<const T*>(x), static_cast<const T*>(a), static_cast<T*>(xa), static_cast<uint64_t*>(keep), m,
              k, rank, dropout, uint64_t(seed), uint64_t(offset), threshold, keep_scale, nthreads);
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
  pfp::dispatch_float(dtype, "lora_dropout", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dropout_impl(static_cast<const T*>(src), static_cast<T*>(dst), numel, uint64_t(seed), uint64_t(offset), threshold,
                 keep_scale, alpha, accumulate, nthreads);
  });
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
  pfp::dispatch_float(dtype, "lora_dropout_rows", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dropout_rows_impl(static_cast<const T*>(src), static_cast<T*>(dst), row_index, count, cols, scatter, uint64_t(seed),
                      uint64_t(offset), threshold, keep_scale, alpha, accumulate, nthreads);
  });
}

// lora_branch_grads: the LoRA branch's part of backward in one pass, with s = scaling, x_d = dropout(x) exactly as
// lora_dropout writes it (alpha 1, rounded to the dtype; x itself without dropout) and keep / keep_scale its mask:
//   grad_a[q, c] = s * sum_i grad_xa[i, q] * x_d[i, c]                                (dA, [rank, k])
//   dx[i, c]    += s * (keep[i, c] ? keep_scale * sum_q grad_xa[i, q] * a[q, c] : 0)   (dX's branch term)
// in fp32 (fp64 for fp64 data), each output rounded once to the dtype; dx null: dA alone. x, dx [m, k], grad_xa
// [m, rank] (= dY B), a [rank, k], grad_a [rank, k]: contiguous, of `dtype`. seed, offset, threshold, keep_scale:
// as lora_dropout (ignored without dropout). The mask element of (i, c) is i * k + c, as lora_dropout's. keep: null
// (the mask is drawn), or the int64 [m, ceil(k / 64)] bits lora_down wrote for this x and rng, read instead.
// bf16 at rank <= 32 runs on AMX tiles where pfp::amx_in_use(): the sums in the tiles' order, and a subnormal
// x_d, grad_xa or a element counts as zero in them (as in nf4_matmul).
void lora_branch_grads(const void* x, const void* grad_xa, const void* a, void* dx, void* grad_a, const void* keep,
                       int64_t m, int64_t k, int64_t rank, int dtype, bool dropout, int64_t seed, int64_t offset,
                       float threshold, float keep_scale, double scaling, int nthreads) {
  pfp::dispatch_float(dtype, "lora_branch_grads", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using C = typename pfp::Compute<T>::type;
    const auto params =
        dropout_params<C>(uint64_t(seed), uint64_t(offset), threshold, dropout ? keep_scale : 1.0f, scaling, false);
    const T* x_t = static_cast<const T*>(x);
    const T* g_t = static_cast<const T*>(grad_xa);
    const T* a_t = static_cast<const T*>(a);
    T* dx_t = static_cast<T*>(dx);
    T* grad_t = static_cast<T*>(grad_a);
    const uint64_t* keep_t = static_cast<const uint64_t*>(keep);
#if PFP_HAS_AMX
    if constexpr (std::is_same_v<T, bf16>) {
      if (pfp::amx_in_use() && rank <= kMaxAmxRank) {
        branch_grads_amx(x_t, g_t, a_t, dx_t, grad_t, keep_t, m, k, rank, dropout, params, float(scaling), nthreads);
        return;
      }
    }
#endif
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16>) {
      branch_grads_avx512(x_t, g_t, a_t, dx_t, grad_t, keep_t, m, k, rank, dropout, params, float(scaling), nthreads);
      return;
    }
#endif
    branch_grads_loops(x_t, g_t, a_t, dx_t, grad_t, keep_t, m, k, rank, dropout, params, nthreads);
  });
}

// lora_up_grads: the up-projection's grads of y = s xa b^T in one read of dY:
//   grad_xa[i, q] = sum_j dy[i, j] * b[j, q]            ([m, rank], dY B)
//   grad_b[j, q]  = s * sum_i dy[i, j] * xa[i, q]       ([n, rank], s dY^T xa)
// in fp32 (fp64 for fp64 data), each output rounded once to the dtype. dy [m, n], b [n, rank], xa [m, rank],
// grad_xa [m, rank], grad_b [n, rank]: contiguous, of `dtype`, none aliasing another; m, n >= 0, rank >= 1.
// bf16 at rank <= 32 runs on AMX tiles where pfp::amx_in_use(), or with AVX512-BF16's dot products where
// pfp::avx512_bf16_in_use() and no AMX: the sums in the tiles' order (or the pairs' order), and a subnormal dy, b or
// xa element counts as zero in them.
void lora_up_grads(const void* dy, const void* b, const void* xa, void* grad_xa, void* grad_b, int64_t m, int64_t n,
                   int64_t rank, int dtype, double scaling, int nthreads) {
  pfp::dispatch_float(dtype, "lora_up_grads", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* dy_t = static_cast<const T*>(dy);
    const T* b_t = static_cast<const T*>(b);
    const T* xa_t = static_cast<const T*>(xa);
    T* grad_xa_t = static_cast<T*>(grad_xa);
    T* grad_b_t = static_cast<T*>(grad_b);
#if PFP_HAS_AMX
    if constexpr (std::is_same_v<T, bf16>) {
      const bool tiles = pfp::amx_in_use();
      if ((tiles || pfp::avx512_bf16_in_use()) && rank <= kMaxAmxRank) {
        up_grads_bf16_blocks(dy_t, b_t, xa_t, grad_xa_t, grad_b_t, m, n, rank, float(scaling), tiles, nthreads);
        return;
      }
    }
#endif
    up_grads_loops(dy_t, b_t, xa_t, grad_xa_t, grad_b_t, m, n, rank, scaling, nthreads);
  });
}

}  // namespace PFP_ISA
