// NF4 / FP4 (QLoRA 4-bit) on the CPU: blockwise quantization, dequantization, fused dequant-GEMV.
//
// Format (bitsandbytes'; pyfastpeft/reference/nf4.py is the oracle): W flattened row-major, n elements,
// blocks of `blocksize` consecutive elements (a block may span rows; the last one may be partial):
//   absmax[b] = max |w| over block b                                  fp32 [ceil(n / blocksize)]
//   q[i]      = index of the code nearest w[i] / absmax[b]            4 bits, code = fp32 table [16]
//   packed[j] = q[2j] << 4 | q[2j+1]                                  uint8 [(n + 1) / 2]
//   w_hat[i]  = code[q[i]] * absmax[i / blocksize]                    fp32, rounded once to the output
// Quantization rounds exactly as bitsandbytes' pure-PyTorch backend:
//   full block:    s = w * (1 / max(absmax, 1e-38));  partial last block: s = w / max(absmax, 1e-38),
//                  and the partial block stores the clamped absmax;  then s = clamp(s, -1, 1)
//   nearest code:  position p = #{sorted midpoints m_k : !(m_k >= s)} (torch.bucketize, right=False: a
//                  tie takes the lower code, NaN counts above every midpoint), q = sorted order[p]
//   odd n:         the missing last element quantizes as 0.0.
// GEMV: out[r, j] = sum_c x[r, c] * w_hat[j*k + c] (+ bias[j]), fp32 sums (fp64 for fp64 x), W never
// materialized. General path: each W row is decoded into an L1 buffer, then dotted with the m rows of x.
// AVX-512 fast path (every row holds whole blocks and 128-weight spans): 16 nibbles become 16 codes by
// one permute of the code table, and a span sums code * x per lane before scaling by the lane's absmax,
// (code * x) * absmax instead of (code * absmax) * x: the same sum up to one rounding per term.
#include "cpu/amx.h"
#include "cpu/common.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace PFP_ISA {
namespace {

using pfp::bf16;
using pfp::half;

constexpr int kCodes = 16;

// The nearest-code search over the code table sorted ascending (a stable sort: FP4's two zeros keep
// index order, 0 before 8, as bitsandbytes' argsort does). Passing midpoint p of sorted neighbours p and
// p + 1 moves from code index order[p] to order[p + 1], so the index is order[0] plus the steps of the
// midpoints passed: a sum of selects, which vectorizes where a lookup in `order` would not.
struct SearchTable {
  float midpoints[kCodes - 1];
  int32_t steps[kCodes - 1];
  int32_t lowest;
};

SearchTable make_search_table(const float* code) {
  int order[kCodes];
  for (int i = 0; i < kCodes; ++i) {
    int p = i;
    for (; p > 0 && code[i] < code[order[p - 1]]; --p) order[p] = order[p - 1];
    order[p] = i;
  }
  SearchTable table;
  for (int p = 0; p + 1 < kCodes; ++p) {
    table.midpoints[p] = (code[order[p]] + code[order[p + 1]]) / 2.0f;
    table.steps[p] = order[p + 1] - order[p];
  }
  table.lowest = order[0];
  return table;
}

inline int32_t nearest_code(float scaled, const SearchTable& table) {
  int32_t index = table.lowest;
  for (int p = 0; p + 1 < kCodes; ++p) index += !(table.midpoints[p] >= scaled) ? table.steps[p] : 0;
  return index;
}

// max |v[i]|, NaN if any v[i] is NaN (torch's amax); the max and the NaN test run in 16 lanes, branch-free,
// so both vectorize.
inline float block_absmax(const float* v, int64_t n) {
  float lanes[16] = {};
  int32_t nan_seen[16] = {};
  auto take = [&](int j, float value) {
    const float a = std::fabs(value);
    lanes[j] = a > lanes[j] ? a : lanes[j];
    nan_seen[j] |= a != a;
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) take(j, v[i + j]);
  for (int j = 0; i < n; ++i, ++j) take(j, v[i]);
  float result = 0.0f;
  int32_t any_nan = 0;
  for (int j = 0; j < 16; ++j) {
    result = lanes[j] > result ? lanes[j] : result;
    any_nan |= nan_seen[j];
  }
  return any_nan ? NAN : result;
}

constexpr int64_t kQuantizeStep = 4096;  // elements per step: whole blocks, at least one

// w: [numel] of T; packed: [(numel + 1) / 2]; absmax: [ceil(numel / blocksize)]; blocksize even.
template <typename T>
void quantize_impl(const T* w, uint8_t* packed, float* absmax, int64_t numel, int64_t blocksize,
                   const SearchTable& table, int nthreads) {
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  const int64_t step_blocks = kQuantizeStep / blocksize > 1 ? kQuantizeStep / blocksize : 1;
  const int64_t steps = (nblocks + step_blocks - 1) / step_blocks;
  const uint8_t zero_code = uint8_t(nearest_code(0.0f, table));
  pfp::parallel_for(steps, step_blocks * blocksize * 16, nthreads, [&](int64_t begin, int64_t end, int) {
    const SearchTable search = table;  // a local copy: the uint8 stores below cannot alias it
    std::vector<float> values(step_blocks * blocksize);
    std::vector<uint8_t> codes(step_blocks * blocksize + 1);
    for (int64_t step = begin; step < end; ++step) {
      const int64_t first = step * step_blocks * blocksize;
      const int64_t len = numel - first < step_blocks * blocksize ? numel - first : step_blocks * blocksize;
      float* v = values.data();
      pfp::load_row(w + first, v, len);
      for (int64_t offset = 0; offset < len; offset += blocksize) {
        float* block = v + offset;
        const int64_t block_len = len - offset < blocksize ? len - offset : blocksize;
        float amax = block_absmax(block, block_len);
        const float divisor = amax < 1e-38f ? 1e-38f : amax;  // NaN stays NaN
        if (block_len == blocksize) {
          const float inverse = 1.0f / divisor;
          for (int64_t i = 0; i < block_len; ++i) block[i] = block[i] * inverse;
        } else {
          amax = divisor;
          for (int64_t i = 0; i < block_len; ++i) block[i] = block[i] / divisor;
        }
        absmax[(first + offset) / blocksize] = amax;
      }
      for (int64_t i = 0; i < len; ++i) {
        const float s = v[i] < -1.0f ? -1.0f : (v[i] > 1.0f ? 1.0f : v[i]);
        codes[i] = uint8_t(nearest_code(s, search));
      }
      codes[len] = zero_code;
      uint8_t* out = packed + first / 2;
      for (int64_t j = 0; j < (len + 1) / 2; ++j) out[j] = uint8_t(codes[2 * j] << 4 | codes[2 * j + 1]);
    }
  });
}

// dst[0 .. 2*nbytes) = table[nibbles of bytes[0 .. nbytes)], high nibble first.
inline void decode_bytes(const uint8_t* __restrict bytes, int64_t nbytes, const float* __restrict table,
                         float* __restrict dst) {
  int64_t j = 0;
#if defined(__AVX512F__)
  // Each byte b zero-extended to a word, then (b >> 4) | (b << 8): its low byte is the high nibble,
  // its high byte has the low nibble in its low 4 bits, the only bits vpermps reads.
  const __m512 codes = _mm512_loadu_ps(table);
  for (; j + 8 <= nbytes; j += 8) {
    __m128i words = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j)));
    __m128i nibbles = _mm_or_si128(_mm_srli_epi16(words, 4), _mm_slli_epi16(words, 8));
    _mm512_storeu_ps(dst + 2 * j, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles), codes));
  }
#elif defined(__AVX2__)
  // As above with 8 lanes: codes 0-7 and 8-15 in two registers, bit 3 of the index picks one.
  const __m256 low_codes = _mm256_loadu_ps(table), high_codes = _mm256_loadu_ps(table + 8);
  for (; j + 4 <= nbytes; j += 4) {
    int32_t four;
    std::memcpy(&four, bytes + j, 4);
    __m128i words = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(four));
    __m128i nibbles =
        _mm_and_si128(_mm_or_si128(_mm_srli_epi16(words, 4), _mm_slli_epi16(words, 8)), _mm_set1_epi8(15));
    __m256i index = _mm256_cvtepu8_epi32(nibbles);
    __m256 from_high = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
    _mm256_storeu_ps(dst + 2 * j, _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_codes, index),
                                                   _mm256_permutevar8x32_ps(high_codes, index), from_high));
  }
#endif
  for (; j < nbytes; ++j) {
    dst[2 * j] = table[bytes[j] >> 4];
    dst[2 * j + 1] = table[bytes[j] & 15];
  }
}

// dst[0 .. count) = the outputs of w_hat[first .. first + count), block by block: per block, Table(block's
// absmax) holds the block's 16 outputs; a leading low nibble and a trailing high nibble go through table[index],
// the whole bytes between through table.decode(bytes, nbytes, dst) (two outputs a byte, high nibble first).
template <typename Table, typename Out>
void decode_blocks(const uint8_t* packed, const float* absmax, const float* code, int64_t first, int64_t count,
                   int64_t blocksize, Out* dst) {
  const int64_t end = first + count;
  for (int64_t e = first; e < end;) {
    const int64_t block = e / blocksize;
    const int64_t stop = (block + 1) * blocksize < end ? (block + 1) * blocksize : end;
    const Table table(code, absmax[block]);
    if (e & 1) *dst++ = table[packed[e++ / 2] & 15];
    const int64_t pairs = (stop - e) / 2;
    table.decode(packed + e / 2, pairs, dst);
    dst += 2 * pairs;
    e += 2 * pairs;
    if (e < stop) *dst++ = table[packed[e++ / 2] >> 4];
  }
}

// fp32 outputs: code * absmax.
struct Fp32Table {
  alignas(64) float values[kCodes];
  Fp32Table(const float* code, float absmax) {
    for (int c = 0; c < kCodes; ++c) values[c] = code[c] * absmax;
  }
  float operator[](int index) const { return values[index]; }
  void decode(const uint8_t* bytes, int64_t nbytes, float* dst) const { decode_bytes(bytes, nbytes, values, dst); }
};

void decode_range(const uint8_t* packed, const float* absmax, const float* code, int64_t first, int64_t count,
                  int64_t blocksize, float* dst) {
  decode_blocks<Fp32Table>(packed, absmax, code, first, count, blocksize, dst);
}

#if defined(__AVX512BW__)
// 16-bit outputs (bf16, fp16) straight from the nibbles: the 16 values T(code * absmax), the value the fp32 path
// rounds once to T, so both paths give the same bits: bf16 by to_bf16's integer rounding (NaN kept quiet), fp16
// by F16C's round-to-nearest-even conversion, the instruction to_half uses in this build. One word permute then
// turns 32 nibbles into 32 outputs (twice the fp32 path's elements per instruction, no conversion per element).
template <typename T>
struct Table16 {
  __m512i words;                    // the 16 outputs' bits in the low 16 words
  alignas(64) uint16_t values[32];  // the same, for the odd nibbles at a block's ends

  Table16(const float* code, float absmax) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax));
    if constexpr (std::is_same<T, bf16>::value) {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i rounded =
          _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
      const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
      const __mmask16 is_nan =
          _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
      words = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_nan, rounded, quiet_nan)));
    } else {
      words = _mm512_castsi256_si512(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    _mm512_store_si512(values, words);
  }
  T operator[](int index) const { return T{values[index]}; }

  void decode(const uint8_t* bytes, int64_t nbytes, T* out) const {
    uint16_t* dst = reinterpret_cast<uint16_t*>(out);
    int64_t j = 0;
    // Each byte b zero-extended to a dword, then (b >> 4) | (b & 15) << 16: its low word indexes the high
    // nibble's code (the even element), its high word the low nibble's (the odd one), in memory order.
    for (; j + 16 <= nbytes; j += 16) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j)));
      const __m512i index =
          _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(15)), 16));
      _mm512_storeu_si512(dst + 2 * j, _mm512_permutexvar_epi16(index, words));
    }
    for (; j < nbytes; ++j) {
      dst[2 * j] = values[bytes[j] >> 4];
      dst[2 * j + 1] = values[bytes[j] & 15];
    }
  }
};
#endif

template <typename T>
void store_fp32(const float* src, T* dst, int64_t n) {
  pfp::store_row(src, dst, n);
}
template <>
void store_fp32<double>(const float* src, double* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

constexpr int64_t kDecodeChunk = 4096;

template <typename T>
void dequantize_impl(const uint8_t* packed, const float* absmax, const float* code, T* out, int64_t start,
                     int64_t count, int64_t blocksize, int nthreads) {
  const int64_t chunks = (count + kDecodeChunk - 1) / kDecodeChunk;
  pfp::parallel_for(chunks, kDecodeChunk, nthreads, [&](int64_t begin, int64_t end, int) {
    alignas(64) float values[kDecodeChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t offset = c * kDecodeChunk, len = count - offset < kDecodeChunk ? count - offset : kDecodeChunk;
      if constexpr (std::is_same<T, float>::value) {
        decode_range(packed, absmax, code, start + offset, len, blocksize, out + offset);
#if defined(__AVX512BW__)
      } else if constexpr (std::is_same<T, bf16>::value || std::is_same<T, half>::value) {
        decode_blocks<Table16<T>>(packed, absmax, code, start + offset, len, blocksize, out + offset);
#endif
      } else {
        decode_range(packed, absmax, code, start + offset, len, blocksize, values);
        store_fp32(values, out + offset, len);
      }
    }
  });
}

// src [n] of dtype -> compute type C.
template <typename C>
std::vector<C> load_vector(const void* src, int dtype, int64_t n) {
  std::vector<C> dst(n);
  switch (dtype) {
    case pfp::kFloat32: pfp::load_row(static_cast<const float*>(src), dst.data(), n); break;
    case pfp::kFloat16: pfp::load_row(static_cast<const half*>(src), dst.data(), n); break;
    case pfp::kBFloat16: pfp::load_row(static_cast<const bf16*>(src), dst.data(), n); break;
    case pfp::kFloat64: pfp::load_row(static_cast<const double*>(src), dst.data(), n); break;
    default: throw std::invalid_argument("nf4: unsupported dtype code");
  }
  return dst;
}

// Any k and blocksize: each W row is decoded into an L1-resident fp32 row, then dotted with the m rows
// of x (C: fp32, or fp64 for fp64 x). dots[r * n + j] for rows j in [begin, end).
template <typename C>
void gemv_rows_decoded(const C* x, const uint8_t* packed, const float* absmax, const float* code, int64_t begin,
                       int64_t end, int64_t m, int64_t n, int64_t k, int64_t blocksize, C* dots) {
  std::vector<float> row(k);
  const float* w = row.data();
  for (int64_t j = begin; j < end; ++j) {
    decode_range(packed, absmax, code, j * k, k, blocksize, row.data());
    for (int64_t r = 0; r < m; ++r) {
      const C* xr = x + r * k;
      dots[r * n + j] = pfp::lane_sum<C>(k, [&](int64_t c) { return C(w[c]) * xr[c]; });
    }
  }
}

#if defined(__AVX512F__)
constexpr int64_t kSpan = 128;  // weights per 64 packed bytes: the unit of the fast path

// Lane i of a 64-byte load holds bytes 4i .. 4i+3, i.e. weights 8i .. 8i+7; shifted right by 4v, its
// low 4 bits (the only bits vpermps reads) are the nibble of weight 8i + (v ^ 1), high nibble first.
// So 16 weights cost one shift and one permute, and x is reordered once to match:
// x_split [m, k], per span of 128 columns position 16v + i holds column 8i + (v ^ 1). Its buffer starts
// on a cache line, so no 64-byte load of it straddles two lines.
struct SplitX {
  std::vector<float> storage;
  float* data;
  SplitX(const float* x, int64_t m, int64_t k) : storage(m * k + 15) {
    data = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
    for (int64_t span = 0; span < m * k; span += kSpan)
      for (int v = 0; v < 8; ++v)
        for (int i = 0; i < 16; ++i) data[span + 16 * v + i] = x[span + 8 * i + (v ^ 1)];
  }
};

// Columns are taken in tiles whose x slice (M rows) fits in L1, each tile meeting a group of W rows in
// turn, so x loads hit L1 (all of x does not fit at M = 8); dots carry the sums across tiles. Packed bytes
// and absmax of the row kPrefetchRows ahead are prefetched into L1 (the hardware prefetcher alone leaves the
// absmax reads exposed), and the packed bytes kFarPrefetchRows ahead into L2: more lines in flight than the L1
// prefetches and the L2 streamer keep alone. On the 2-core AMX host a LoRA decode step over a 4096 x 4096 base
// then read 18-22 GB/s from DRAM instead of 16 (python -m pyfastpeft.bench --family lora, qlora M=1). A
// prefetch past the end of an array is harmless (it never faults).
constexpr int64_t kTileBytes = 32 * 1024;
constexpr int64_t kRowGroup = 16;
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kFarPrefetchRows = 64;

// blocksize a power of two >= 32, k % 128 == 0 and k % blocksize == 0 (a row holds whole spans and whole blocks,
// and a span from column c meets blocks c / blocksize + 8i / blocksize); dots[r * n + j] += the dot
// of W row j with x row r. Each lane's 8 weights lie in one block (blocksize >= 32), so a span is
//   sum_i scale[i] * sum_v code[q(8i + (v ^ 1))] * x_split[16v + i],   scale[i] = absmax[block of 8i]
// with scale gathered from absmax by lane_block[i] = 8i / blocksize.
// group_done(group, group_end) runs as each group of rows is complete, while the prefetched bytes of the next
// stream in: the caller's epilogue then costs little more than the memory-bound loop alone.
template <int M, typename F>
void gemv_rows_fast(const float* x_split, const uint8_t* packed, const float* absmax, const float* code, int64_t begin,
                    int64_t end, int64_t n, int64_t k, int64_t blocksize, float* dots, F&& group_done) {
  const __m512 codes = _mm512_loadu_ps(code);
  const int block_shift = __builtin_ctzll(uint64_t(blocksize));  // c / blocksize without a divide per span
  const int64_t row_blocks = k >> block_shift;
  alignas(64) int32_t lane_block[16];
  for (int i = 0; i < 16; ++i) lane_block[i] = int32_t(8 * i / blocksize);
  const __m512i lane_block_v = _mm512_load_si512(lane_block);
  const __mmask16 span_blocks = __mmask16((1u << (lane_block[15] + 1)) - 1);
  const int64_t tile_unit = blocksize > kSpan ? blocksize : kSpan;
  const int64_t tile_units = kTileBytes / (int64_t(sizeof(float)) * M * tile_unit);
  const int64_t tile = (tile_units > 1 ? tile_units : 1) * tile_unit;
  for (int64_t group = begin; group < end; group += kRowGroup) {
    const int64_t group_end = group + kRowGroup < end ? group + kRowGroup : end;
    for (int64_t tile_begin = 0; tile_begin < k; tile_begin += tile) {
      const int64_t tile_end = tile_begin + tile < k ? tile_begin + tile : k;
      for (int64_t j = group; j < group_end; ++j) {
        const uint8_t* bytes = packed + j * (k / 2);
        const float* scales = absmax + j * row_blocks;
        __m512 acc[M];
        for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t c = tile_begin; c < tile_end; c += kSpan) {
          _mm_prefetch(reinterpret_cast<const char*>(bytes + kPrefetchRows * (k / 2) + c / 2), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(bytes + kFarPrefetchRows * (k / 2) + c / 2), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(scales + kPrefetchRows * row_blocks + (c >> block_shift)),
                       _MM_HINT_T0);
          const __m512i raw = _mm512_loadu_si512(bytes + c / 2);
          const __m512 scale =
              _mm512_permutexvar_ps(lane_block_v, _mm512_maskz_loadu_ps(span_blocks, scales + (c >> block_shift)));
          __m512 span_sum[M];
#pragma GCC unroll 8
          for (int v = 0; v < 8; ++v) {
            const __m512 w = _mm512_permutexvar_ps(_mm512_srli_epi32(raw, 4 * v), codes);
#pragma GCC unroll 8
            for (int r = 0; r < M; ++r) {
              const __m512 xv = _mm512_load_ps(x_split + r * k + c + 16 * v);
              span_sum[r] = v == 0 ? _mm512_mul_ps(w, xv) : _mm512_fmadd_ps(w, xv, span_sum[r]);
            }
          }
          for (int r = 0; r < M; ++r) acc[r] = _mm512_fmadd_ps(span_sum[r], scale, acc[r]);
        }
        for (int r = 0; r < M; ++r) dots[r * n + j] += _mm512_reduce_add_ps(acc[r]);
      }
    }
    group_done(group, group_end);
  }
}

template <int... Ms, typename F>
void gemv_fast_dispatch(std::integer_sequence<int, Ms...>, int64_t m, const float* x_split, const uint8_t* packed,
                        const float* absmax, const float* code, int64_t begin, int64_t end, int64_t n, int64_t k,
                        int64_t blocksize, float* dots, F&& group_done) {
  ((m == Ms ? gemv_rows_fast<Ms>(x_split, packed, absmax, code, begin, end, n, k, blocksize, dots, group_done)
            : void()),
   ...);
}
#endif

constexpr int64_t kMaxGemvRows = 8;

// An optional rank-r term of the output: out[i, j] += scaling * sum_q xa[i, q] * b[j, q] (LoRA's up-projection).
template <typename T>
struct LowRank {
  const T* b = nullptr;   // [n, rank]
  const T* xa = nullptr;  // [m, rank]
  int64_t rank = 0;
  double scaling = 0.0;
};

// x: [m, k] of T; out: [m, n] of T; bias: [n] of bias_dtype or null. Each thread finishes its own output columns:
// the dots, the bias, the low-rank term, one rounding.
template <typename T>
void gemv_impl(const T* x, const uint8_t* packed, const float* absmax, const float* code, const void* bias,
               int bias_dtype, T* out, int64_t m, int64_t n, int64_t k, int64_t blocksize, int nthreads,
               const LowRank<T>& low_rank = {}) {
  // the contract's blocksize, even and >= 2 (the ops check it first; the k % blocksize below must not divide by 0)
  if (blocksize < 2 || blocksize % 2 != 0) throw std::invalid_argument("nf4 GEMV: blocksize must be even and >= 2");
  using C = typename pfp::Compute<T>::type;
  std::vector<C> xs(m * k), dots(m * n);
  pfp::load_row(x, xs.data(), m * k);
  const std::vector<C> bias_values = bias ? load_vector<C>(bias, bias_dtype, n) : std::vector<C>(n, C(0));
  const int64_t rank = low_rank.b ? low_rank.rank : 0;
  std::vector<C> xa(m * rank);
  if (rank) pfp::load_row(low_rank.xa, xa.data(), m * rank);
  const C scaling = C(low_rank.scaling);
  auto finish = [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<C, float>) {
      if (rank > 0 && rank <= 16) {  // each row of b in one vector: its dot with xa is lane_sum's tree, vectorized
        const __mmask16 lanes = pfp::lanes16(rank);
        __m512 xa_v[kMaxGemvRows];
        for (int64_t r = 0; r < m; ++r) xa_v[r] = _mm512_maskz_loadu_ps(lanes, xa.data() + r * rank);
        for (int64_t j = begin; j < end; ++j) {
          const __m512 b_j = pfp::load16(low_rank.b + j * rank, lanes);
          for (int64_t r = 0; r < m; ++r) {
            const C value =
                dots[r * n + j] + bias_values[j] + scaling * _mm512_reduce_add_ps(_mm512_mul_ps(b_j, xa_v[r]));
            out[r * n + j] = pfp::from_compute<T>(value);
          }
        }
        return;
      }
    }
#endif
    C b_stack[256];  // these rows of b, converted at once (on the stack for a group of 16 rows of rank <= 16)
    std::vector<C> b_heap((end - begin) * rank > 256 ? (end - begin) * rank : 0);
    C* b_rows = b_heap.empty() ? b_stack : b_heap.data();
    if (rank) pfp::load_row(low_rank.b + begin * rank, b_rows, (end - begin) * rank);
    for (int64_t j = begin; j < end; ++j) {
      const C* b_j = b_rows + (j - begin) * rank;
      for (int64_t r = 0; r < m; ++r) {
        C value = dots[r * n + j] + bias_values[j];
        if (rank) {  // lane_sum: independent partial sums, which vectorize (a running sum would not)
          const C* xa_r = xa.data() + r * rank;
          value += scaling * pfp::lane_sum<C>(rank, [&](int64_t q) { return xa_r[q] * b_j[q]; });
        }
        out[r * n + j] = pfp::from_compute<T>(value);
      }
    }
  };
#if defined(__AVX512F__)
  constexpr bool fp32 = std::is_same<C, float>::value;
  const bool power_of_two = (blocksize & (blocksize - 1)) == 0;
  const bool fast = fp32 && power_of_two && k % blocksize == 0 && k % kSpan == 0 && blocksize % 32 == 0;
  std::unique_ptr<SplitX> x_split;
  if constexpr (fp32) {
    if (fast) x_split = std::make_unique<SplitX>(xs.data(), m, k);
  }
#endif
  pfp::parallel_for(n, m * k, nthreads, [&](int64_t begin, int64_t end, int) {
#if defined(__AVX512F__)
    if constexpr (fp32) {
      if (fast) {
        gemv_fast_dispatch(std::integer_sequence<int, 1, 2, 3, 4, 5, 6, 7, 8>(), m, x_split->data, packed, absmax, code,
                           begin, end, n, k, blocksize, dots.data(), finish);
        return;
      }
    }
#endif
    gemv_rows_decoded(xs.data(), packed, absmax, code, begin, end, m, n, k, blocksize, dots.data());
    finish(begin, end);
  });
}

// ---- bf16 GEMM on AMX tiles (cpu/amx.h), W decoded straight into B's tiles -----------------------------------------
// A step is 32 elements of a row of W: 16 packed bytes in one block (k % 32 == 0, blocksize % 32 == 0). Byte i holds
// the pair (W[j, 2i], W[j, 2i + 1]), so the 32 decoded bf16 of row j are the 16 dwords of that row of B's dword
// matrix, and one dword transpose per 16 rows gives the VNNI tile: no dequantized W is written outside the panel
// the thread keeps in L2. Each value is bf16(code * absmax) rounded to nearest even, as nf4_dequantize to bf16
// (a subnormal product becomes 0 here, which the tile product does to a subnormal input anyway).
#if PFP_HAS_AMX
// The 32 bf16 values of W's elements [first, first + 32) (first even, all in one block): byte i of the 16 packed
// bytes holds the pair (2i, 2i + 1), the high nibble first; each value bf16(code * absmax) rounded to nearest even.
__attribute__((target("avx512bf16"))) inline __m512i decode_32(const uint8_t* packed, const float* absmax, __m512 codes,
                                                               int64_t first, int64_t blocksize) {
  const __m256bh table = _mm512_cvtneps_pbh(_mm512_mul_ps(codes, _mm512_set1_ps(absmax[first / blocksize])));
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + first / 2)));
  // low word: the high nibble (the even element), high word: the low nibble
  const __m512i index = _mm512_or_si512(_mm512_srli_epi32(bytes, 4),
                                        _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), 16));
  return _mm512_permutexvar_epi16(index, _mm512_castsi256_si512(reinterpret_cast<const __m256i&>(table)));
}

__attribute__((target("avx512bf16"))) void decode_b_tiles(const uint8_t* packed, const float* absmax, const float* code,
                                                          int64_t n, int64_t k, int64_t blocksize, int64_t n0,
                                                          int64_t groups, int64_t steps, int8_t* panel) {
  const __m512 codes = _mm512_loadu_ps(code);
  __m512i rows[16];
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t s = 0; s < steps; ++s) {
      for (int c = 0; c < 16; ++c) {
        const int64_t j = n0 + 16 * g + c;
        if (j >= n) {
          rows[c] = _mm512_setzero_si512();
          continue;
        }
        rows[c] = decode_32(packed, absmax, codes, j * k + 32 * s, blocksize);
      }
      amx::transpose_dwords(rows, panel + (g * steps + s) * amx::kTileBytes);
    }
}

// dX = dY @ w_hat's operand: B = w_hat^T [k, n], a tile row pairing two rows of W. Tile (g, s) of the panel (16 of
// dX's columns from k0 + 16 g, 32 rows of W from 32 s) holds in dword j of its row p the pair
// (w_hat[32 s + 2 p, k0 + 16 g + j], w_hat[32 s + 2 p + 1, k0 + 16 g + j]); rows of W past n are zero. Each W row's
// 32 columns of a group pair are 16 packed bytes in one block (k % 32 == 0, blocksize % 32 == 0), decoded as
// decode_b_tiles decodes them; two rows' values then interleave into the tile rows (one permute each).
__attribute__((target("avx512bf16"))) void decode_bt_tiles(const uint8_t* packed, const float* absmax,
                                                           const float* code, int64_t n, int64_t k, int64_t blocksize,
                                                           int64_t k0, int64_t groups, int64_t steps, int8_t* panel) {
  const __m512 codes = _mm512_loadu_ps(code);
  // word 2j of tile 0's row: element j of the even row, word 2j + 1: element j of the odd row; tile 1 from j + 16
  alignas(64) uint16_t interleave[2][32];
  for (int t = 0; t < 2; ++t)
    for (int j = 0; j < 16; ++j) {
      interleave[t][2 * j] = uint16_t(16 * t + j);
      interleave[t][2 * j + 1] = uint16_t(32 + 16 * t + j);
    }
  const __m512i pick[2] = {_mm512_load_si512(interleave[0]), _mm512_load_si512(interleave[1])};
  for (int64_t g = 0; g < groups; g += 2)
    for (int64_t s = 0; s < steps; ++s) {
      __m512i rows[32];
      for (int c = 0; c < 32; ++c) {
        const int64_t r = 32 * s + c;
        if (r >= n) {
          rows[c] = _mm512_setzero_si512();
          continue;
        }
        rows[c] = decode_32(packed, absmax, codes, r * k + k0 + 16 * g, blocksize);
      }
      for (int t = 0; t < 2 && g + t < groups; ++t) {
        int8_t* tile = panel + ((g + t) * steps + s) * amx::kTileBytes;
        for (int p = 0; p < 16; ++p)
          _mm512_store_si512(tile + 64 * p, _mm512_permutex2var_epi16(rows[2 * p], pick[t], rows[2 * p + 1]));
      }
    }
}

// dy [m, n] @ w_hat [n, k] (k % 32 == 0) on the tiles, or by the dot products (kTiles false), each 32 x 32 block of
// fp32 sums handed to emit(row, col, block) (row stride 32).
template <bool kTiles, typename Emit>
void matmul_grad_input_tiles(const void* dy, const uint8_t* packed, const float* absmax, const float* code, int64_t m,
                             int64_t n, int64_t k, int64_t blocksize, int nthreads, Emit&& emit) {
  const int64_t steps = (n + 31) / 32;
  const amx::PackedA a_tiles(dy, m, 2 * n, steps, nthreads);
  auto decode = [&](int64_t k0, int64_t groups, int8_t* panel) {
    decode_bt_tiles(packed, absmax, code, n, k, blocksize, k0, groups, steps, panel);
  };
  amx::gemm<true, float, kTiles>(a_tiles, m, k, nthreads, decode, nullptr, 0, emit);
}

// run(std::true_type{}) on AMX tiles, run(std::false_type{}) by the dot products: the engine as a compile-time flag.
template <typename Run>
void on_engine(bool tiles, Run&& run) {
  if (tiles) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

// x [m, k] @ w_hat^T on the tiles, each 32 x 32 block of fp32 sums handed to emit(row, col, block) (row stride 32).
// kTiles false: the same operands and blocks by AVX512-BF16's dot products (amx::blocks_dots), where the CPU
// has those but no AMX.
template <bool kTiles = true, typename Emit>
void matmul_tiles(const void* x, const uint8_t* packed, const float* absmax, const float* code, int64_t m, int64_t n,
                  int64_t k, int64_t blocksize, int nthreads, Emit&& emit) {
  const amx::PackedA a_tiles(x, m, 2 * k, k / 32, nthreads);
  auto decode = [&](int64_t n0, int64_t groups, int8_t* panel) {
    decode_b_tiles(packed, absmax, code, n, k, blocksize, n0, groups, k / 32, panel);
  };
  amx::gemm<true, float, kTiles>(a_tiles, m, n, nthreads, decode, nullptr, 0, emit);
}

// LoRA's up-projection s xa B^T as one more tile product in each block's epilogue (rank <= 32: one step of K).
// xa's rows are padded to 32 ranks (64 bytes a row, zero past rank and past m, to a whole block of 32 rows) and read
// as A tiles; B^T [rank, n] is packed once as B tiles, two per 32 columns (amx::pack_pair_tiles: tile t holds
// columns [16 t, + 16), dword j of row p b[16 t + j][2 p] low and b[16 t + j][2 p + 1] high; zero past n and rank).
struct UpProjection {
  float scaling;
  amx::Aligned xa, b;
  UpProjection(const bf16* xa_rows, const bf16* b_rows, int64_t m, int64_t n, int64_t rank, double scaling_)
      : scaling(float(scaling_)), xa((m + 31) / 32 * 32 * 64), b((n + 31) / 32 * 2 * amx::kTileBytes) {
    bf16* padded = reinterpret_cast<bf16*>(xa.data);
    for (int64_t i = 0; i < (m + 31) / 32 * 32; ++i)
      for (int64_t q = 0; q < 32; ++q) padded[i * 32 + q] = i < m && q < rank ? xa_rows[i * rank + q] : bf16{0};
    for (int64_t c = 0; c < n; c += 32)
      amx::pack_pair_tiles(b_rows + c * rank, rank, std::min<int64_t>(32, n - c), 1, rank,
                           b.data + c / 16 * amx::kTileBytes);
  }
};

// out's block at (row, col), inside [m, n]: bf16(block + s * (xa B^T)'s block), in fp32 (one fused multiply-add)
// and rounded once. Tiles 0..7 are free between gemm's blocks.
__attribute__((target("amx-tile,amx-bf16,avx512bf16"))) void emit_with_up(const float* block, const UpProjection& up,
                                                                          int64_t row, int64_t col, int64_t m,
                                                                          int64_t n, bf16* out) {
  alignas(64) float sums[32 * 32];
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, up.xa.data + row * 64, 64);
  _tile_loadd(5, up.xa.data + (row + 16) * 64, 64);
  _tile_loadd(6, up.b.data + (col / 16) * amx::kTileBytes, 64);
  _tile_loadd(7, up.b.data + (col / 16 + 1) * amx::kTileBytes, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
  _tile_stored(0, sums, 128);
  _tile_stored(1, sums + 16, 128);
  _tile_stored(2, sums + 16 * 32, 128);
  _tile_stored(3, sums + 16 * 32 + 16, 128);
  const __m512 scaling = _mm512_set1_ps(up.scaling);
  const __mmask32 valid = __mmask32(pfp::lanes64(n - col));
  for (int64_t i = 0; i < 32 && row + i < m; ++i) {
    const __m512 low = _mm512_fmadd_ps(scaling, _mm512_load_ps(sums + 32 * i), _mm512_load_ps(block + 32 * i));
    const __m512 high =
        _mm512_fmadd_ps(scaling, _mm512_load_ps(sums + 32 * i + 16), _mm512_load_ps(block + 32 * i + 16));
    _mm512_mask_storeu_epi16(out + (row + i) * n + col, valid, amx::round32_bf16(low, high));
  }
}
#endif

}  // namespace

// nf4_quantize: packed[(numel + 1) / 2] and absmax[ceil(numel / blocksize)] of w[numel] (w_dtype any of the
// four; fp64 is rounded to fp32 first), byte for byte pyfastpeft.reference.nf4.quantize_4bit.
// code: fp32 [16], the table (NF4 or FP4; any 16 values work). blocksize even. All contiguous.
void nf4_quantize(const void* w, int w_dtype, uint8_t* packed, float* absmax, int64_t numel, int64_t blocksize,
                  const float* code, int nthreads) {
  const SearchTable table = make_search_table(code);
#define PFP_NF4_QUANTIZE(T) quantize_impl(static_cast<const T*>(w), packed, absmax, numel, blocksize, table, nthreads)
  switch (w_dtype) {
    case pfp::kFloat32: PFP_NF4_QUANTIZE(float); return;
    case pfp::kFloat16: PFP_NF4_QUANTIZE(half); return;
    case pfp::kBFloat16: PFP_NF4_QUANTIZE(bf16); return;
    case pfp::kFloat64: PFP_NF4_QUANTIZE(double); return;
  }
#undef PFP_NF4_QUANTIZE
  throw std::invalid_argument("nf4_quantize: unsupported w dtype code");
}

// nf4_dequantize: out[i] = code[q[start + i]] * absmax[(start + i) / blocksize] for i in [0, count), in fp32
// and rounded once to out_dtype (any of the four). packed: the whole weight's bytes; absmax: fp32, de-nested;
// code: fp32 [16]; blocksize even; start may be odd (then out[0] is a low nibble).
void nf4_dequantize(const uint8_t* packed, const float* absmax, const float* code, void* out, int out_dtype,
                    int64_t start, int64_t count, int64_t blocksize, int nthreads) {
#define PFP_NF4_DEQUANTIZE(T) \
  dequantize_impl(packed, absmax, code, static_cast<T*>(out), start, count, blocksize, nthreads)
  switch (out_dtype) {
    case pfp::kFloat32: PFP_NF4_DEQUANTIZE(float); return;
    case pfp::kFloat16: PFP_NF4_DEQUANTIZE(half); return;
    case pfp::kBFloat16: PFP_NF4_DEQUANTIZE(bf16); return;
    case pfp::kFloat64: PFP_NF4_DEQUANTIZE(double); return;
  }
#undef PFP_NF4_DEQUANTIZE
  throw std::invalid_argument("nf4_dequantize: unsupported out dtype code");
}

// nf4_dequantize_cols: out[r, j] = W[r, col_start + j] for r in [0, rows), j in [0, cols): a tile of columns of the
// [rows, k] weight (dX = dY W by column tiles: each tile's GEMM sums over all of N at once). Each out row is
// nf4_dequantize's range [r * k + col_start, + cols), so the same bits; out: [rows, cols] row-major, contiguous;
// col_start + cols <= k; the rest as nf4_dequantize.
void nf4_dequantize_cols(const uint8_t* packed, const float* absmax, const float* code, void* out, int out_dtype,
                         int64_t rows, int64_t k, int64_t col_start, int64_t cols, int64_t blocksize, int nthreads) {
  if (col_start < 0 || cols < 0 || col_start + cols > k)
    throw std::invalid_argument("nf4_dequantize_cols: columns outside the weight");
  pfp::dispatch_float(out_dtype, "nf4_dequantize_cols", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // one row's range per task, decoded in the caller's thread (the rows are the parallel loop)
    pfp::parallel_for(rows, cols, nthreads, [&](int64_t begin, int64_t end, int) {
      for (int64_t r = begin; r < end; ++r)
        dequantize_impl(packed, absmax, code, static_cast<T*>(out) + r * cols, r * k + col_start, cols, blocksize, 1);
    });
  });
}

// nf4_matmul: out [m, n] bf16 = x [m, k] bf16 @ w_hat [n, k]^T with fp32 sums of the bf16 products, on AMX tiles,
// or where the CPU has no AMX but AVX512-BF16, by its dot products on the same packed operands (w_hat's values as
// nf4_dequantize gives them in bf16). Only where pfp::amx_in_use() or pfp::avx512_bf16_in_use(), k % 32 == 0 and
// blocksize % 32 == 0; throws std::invalid_argument otherwise. packed, absmax, code as nf4_gemv; all contiguous.
void nf4_matmul(const void* x, const uint8_t* packed, const float* absmax, const float* code, void* out, int64_t m,
                int64_t n, int64_t k, int64_t blocksize, int nthreads) {
#if PFP_HAS_AMX
  const bool tiles = pfp::amx_in_use();
  if ((tiles || pfp::avx512_bf16_in_use()) && k % 32 == 0 && blocksize % 32 == 0 && blocksize > 0) {
    if (m == 0 || n == 0) return;
    auto emit = [&](int64_t row, int64_t col, const float* block) {
      const int64_t cols = std::min<int64_t>(32, n - col);
      for (int64_t i = 0; i < 32 && row + i < m; ++i)
        pfp::store_row<bf16, float>(block + 32 * i, static_cast<bf16*>(out) + (row + i) * n + col, cols);
    };
    on_engine(tiles, [&](auto kTiles) {
      matmul_tiles<kTiles()>(x, packed, absmax, code, m, n, k, blocksize, nthreads, emit);
    });
    return;
  }
#else
  (void)x, (void)packed, (void)absmax, (void)code, (void)out, (void)m, (void)n, (void)k, (void)blocksize,
      (void)nthreads;
#endif
  throw std::invalid_argument("nf4_matmul: needs AMX tiles or AVX512-BF16, k % 32 == 0 and blocksize % 32 == 0");
}

// nf4_matmul_grad_input: dx [m, k] bf16 = dy [m, n] bf16 @ w_hat [n, k], fp32 sums over all of n of the bf16
// products, rounded once; on AMX tiles or by AVX512-BF16's dot products as nf4_matmul, whose conditions it shares
// (k % 32 == 0 and blocksize % 32 == 0; n any). Throws std::invalid_argument where they do not hold.
void nf4_matmul_grad_input(const void* dy, const uint8_t* packed, const float* absmax, const float* code, void* dx,
                           int64_t m, int64_t n, int64_t k, int64_t blocksize, int nthreads) {
#if PFP_HAS_AMX
  const bool tiles = pfp::amx_in_use();
  if ((tiles || pfp::avx512_bf16_in_use()) && k % 32 == 0 && blocksize % 32 == 0 && blocksize > 0) {
    if (m == 0 || k == 0) return;
    if (n == 0) {  // an empty sum
      std::fill_n(static_cast<bf16*>(dx), m * k, bf16{});
      return;
    }
    auto emit = [&](int64_t row, int64_t col, const float* block) {
      for (int64_t i = 0; i < 32 && row + i < m; ++i)
        pfp::store_row<bf16, float>(block + 32 * i, static_cast<bf16*>(dx) + (row + i) * k + col, 32);
    };
    on_engine(tiles, [&](auto kTiles) {
      matmul_grad_input_tiles<kTiles()>(dy, packed, absmax, code, m, n, k, blocksize, nthreads, emit);
    });
    return;
  }
#else
  (void)dy, (void)packed, (void)absmax, (void)code, (void)dx, (void)m, (void)n, (void)k, (void)blocksize,
      (void)nthreads;
#endif
  throw std::invalid_argument(
      "nf4_matmul_grad_input: needs AMX tiles or AVX512-BF16, k % 32 == 0 and blocksize % 32 == 0");
}

// lora_nf4_matmul: nf4_matmul with LoRA's up-projection in its epilogue, the training forward's QLoRA product:
//   out[i, j] = bf16(sum_c x[i, c] w_hat[j, c] + scaling * sum_q xa[i, q] lora_b[j, q])
// both sums fp32 of the bf16 products on tiles (a subnormal input counting as zero), added in fp32 and rounded once.
// xa: bf16 [m, rank] (lora_down's), lora_b: bf16 [n, rank], 1 <= rank <= 32; the rest as nf4_matmul, whose
// conditions it shares (throws std::invalid_argument where they or the rank do not hold).
void lora_nf4_matmul(const void* x, const uint8_t* packed, const float* absmax, const float* code, const void* xa,
                     const void* lora_b, double scaling, void* out, int64_t m, int64_t n, int64_t k, int64_t rank,
                     int64_t blocksize, int nthreads) {
#if PFP_HAS_AMX
  if (pfp::amx_in_use() && k % 32 == 0 && blocksize % 32 == 0 && blocksize > 0 && rank >= 1 && rank <= 32) {
    if (m == 0 || n == 0) return;
    const UpProjection up(static_cast<const bf16*>(xa), static_cast<const bf16*>(lora_b), m, n, rank, scaling);
    matmul_tiles(x, packed, absmax, code, m, n, k, blocksize, nthreads,
                 [&](int64_t row, int64_t col, const float* block) {
                   emit_with_up(block, up, row, col, m, n, static_cast<bf16*>(out));
                 });
    return;
  }
#else
  (void)x, (void)packed, (void)absmax, (void)code, (void)xa, (void)lora_b, (void)scaling, (void)out, (void)m, (void)n,
      (void)k, (void)rank, (void)blocksize, (void)nthreads;
#endif
  throw std::invalid_argument("lora_nf4_matmul: needs AMX tiles, k % 32 == 0, blocksize % 32 == 0 and rank <= 32");
}

// nf4_gemv: out[m, n] = x[m, k] @ w_hat[n, k]^T (+ bias[n]), W never materialized; 1 <= m <= 8.
// x, out: row-major, dtype x_dtype (fp32, fp16, bf16: fp32 sums; fp64: fp64 sums); bias: null or [n] of
// bias_dtype (any of the four); packed: [(n*k + 1) / 2] (a row may start on a low nibble when k is odd);
// absmax: fp32 [ceil(n*k / blocksize)], de-nested; code: fp32 [16]; blocksize even. All contiguous.
void nf4_gemv(const void* x, int x_dtype, const uint8_t* packed, const float* absmax, const float* code,
              const void* bias, int bias_dtype, void* out, int64_t m, int64_t n, int64_t k, int64_t blocksize,
              int nthreads) {
  if (m < 1 || m > kMaxGemvRows) throw std::invalid_argument("nf4_gemv: m must be in [1, 8]");
#define PFP_NF4_GEMV(T)                                                                                      \
  gemv_impl(static_cast<const T*>(x), packed, absmax, code, bias, bias_dtype, static_cast<T*>(out), m, n, k, \
            blocksize, nthreads)
  switch (x_dtype) {
    case pfp::kFloat32: PFP_NF4_GEMV(float); return;
    case pfp::kFloat16: PFP_NF4_GEMV(half); return;
    case pfp::kBFloat16: PFP_NF4_GEMV(bf16); return;
    case pfp::kFloat64: PFP_NF4_GEMV(double); return;
  }
#undef PFP_NF4_GEMV
  throw std::invalid_argument("nf4_gemv: unsupported x dtype code");
}

// lora_nf4_gemv: a decode step of LoRA over an NF4 base in one call, the down-projection then the GEMV:
//   xa[i, q]  = lora_down's (dropout(x) @ lora_a^T)[i, q], rounded to the dtype
//   out[i, j] = x[i] . w_hat[j] (+ bias[j]) + scaling * sum_q xa[i, q] * lora_b[j, q]
// the second in nf4_gemv's fp32 (fp64) sums plus the up-projection's, rounded once. lora_a [rank, k], lora_b
// [n, rank], out [m, n]: contiguous, dtype x_dtype; xa: [m, rank] of x_dtype, or null when the caller does not keep
// it; dropout, seed, offset, threshold, keep_scale: as lora_down; the rest as nf4_gemv; 1 <= m <= 8.
void lora_nf4_gemv(const void* x, int x_dtype, const uint8_t* packed, const float* absmax, const float* code,
                   const void* bias, int bias_dtype, const void* lora_a, const void* lora_b, void* xa, double scaling,
                   bool dropout, int64_t seed, int64_t offset, float threshold, float keep_scale, void* out, int64_t m,
                   int64_t n, int64_t k, int64_t rank, int64_t blocksize, int nthreads) {
  if (m < 1 || m > kMaxGemvRows) throw std::invalid_argument("lora_nf4_gemv: m must be in [1, 8]");
  pfp::dispatch_float(x_dtype, "lora_nf4_gemv", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    std::vector<T> own_xa(xa == nullptr ? size_t(m * rank) : 0);
    T* down = xa == nullptr ? own_xa.data() : static_cast<T*>(xa);
    lora_down(x, lora_a, down, nullptr, m, k, rank, x_dtype, dropout, seed, offset, threshold, keep_scale, nthreads);
    gemv_impl(static_cast<const T*>(x), packed, absmax, code, bias, bias_dtype, static_cast<T*>(out), m, n, k,
              blocksize, nthreads, LowRank<T>{static_cast<const T*>(lora_b), down, rank, scaling});
  });
}

}  // namespace PFP_ISA
