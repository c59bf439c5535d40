// 8-bit blockwise dynamic quantization and the fused 8-bit Adam / Lion steps on the CPU. The formulas, rounding and
// NaN rules are written out in pyfastpeft/reference/blockwise.py; this file reproduces them bit for bit (it is built
// with -ffp-contract=off so that no multiply-add is fused where the reference rounds twice).
//
// Nearest code: the answer for a scaled value s in [-1, 1] is the number of the code's 255 fp32 midpoints strictly
// below s. Instead of a binary search (8 dependent loads per value), a table indexed by s's sign, exponent and top
// 8 mantissa bits gives the answer at the bucket's lowest value; one comparison with the next midpoint finishes it,
// exact as long as no bucket holds two midpoints (true of both dynamic maps: a bucket spans at most 0.4% of its
// value, the closest midpoints are 0.7% apart). A code for which that fails is served by the binary search.
// Where the CPU has AVX512-VBMI, the optimizers' full blocks instead decode and search 64 values at a time in bytes
// (lookup64, nearest64_vbmi: register tables, no gather), with the same answers.
#include "cpu/common.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

namespace PFP_ISA {
namespace {

constexpr int kMantissaBits = 8;
constexpr int kShift = 23 - kMantissaBits;
// Every |s| below 2^-26 shares the first bucket (no dynamic-map midpoint is that small): the table then spans 26
// binades, 13 KB for both signs, and stays in L1.
constexpr uint32_t kKeyBase = uint32_t(127 - 26) << kMantissaBits;
constexpr uint32_t kBuckets = (0x3F800000u >> kShift) - kKeyBase + 1;  // keys of |s| <= 1.0
constexpr float kTiny = 1e-38f;                                        // bnb's floor under a block's absmax
constexpr int64_t kStateBlock = 256;                                   // the optimizers' state blocksize

// The search structures of one 256-value code.
struct Coder {
  float code[256];
  float mid[256];  // the 255 midpoints, then +inf: mid[answer] < s is false for answer 255
  bool table_exact = true;
  std::vector<uint8_t> table;  // [2 * kBuckets + 4]: positive s by key, then negative s; +4 for 32-bit gathers
  // The same answers packed for one 32-bit gather per value: bits 0-7 the bucket's lowest answer, bit 8 whether a
  // midpoint lies in the bucket, bits 9-23 that midpoint's low 15 bits (its higher bits are the bucket's key).
  std::vector<uint32_t> packed;  // [2 * kBuckets]
  uint8_t planes[4][256];        // planes[p][k]: byte p (least significant first) of code[k]'s bits
  // The search without a gather (nearest64_vbmi), where build_byte_search finds that it fits: level 1 by the sign and
  // binade of s (index binade + 32 * sign, binade = max(exponent - 101, 0): |s| < 2^-25 shares binade 0), level 2
  // by the binade's top `bits` mantissa bits, few enough that no sub-bucket holds two midpoints.
  bool byte_search = false;
  uint8_t level1[4][64];       // [0] 8 - bits, [1] (1 << bits) - 1, [2] sub-table offset % 128, [3] offset / 128
  uint8_t level2[512];         // the answer at each sub-bucket's lowest s; sub-tables never straddle 128 entries
  uint8_t mid_planes[4][256];  // mid as planes: the bits of mid[k] are mid_planes[p][k] << 8p
  int negative_codes = 0;      // codes 0 .. negative_codes - 1 have the sign bit set, the rest not
  bool signs_sorted = true;
};

// Number of midpoints strictly below s; NaN counts as above all of them (as torch.bucketize has it).
inline int count_below(const float* mid, float s) {
  int idx = 0;
  for (int step = 128; step >= 1; step >>= 1)
    if (!(s <= mid[idx + step - 1])) idx += step;
  return idx;
}

// Fills the byte search's tables where the code allows it: an exact bucket table, negative codes first (the sign
// rule compares indexes), each binade's answers resolved by at most its top 7 mantissa bits, binade 0 (and all
// below it) by none, and all sub-tables within 512 entries.
void build_byte_search(Coder& c) {
  if (!c.table_exact || !c.signs_sorted || c.negative_codes > 255) return;
  struct Sub {
    int level1_index, bits;
    uint8_t answers[128];
  };
  std::vector<Sub> subs;
  for (int side = 0; side < 2; ++side) {
    for (int binade = 0; binade <= 26; ++binade) {
      const uint32_t exponent = 101u + uint32_t(binade);
      Sub sub{binade + 32 * side, -1, {}};
      for (int bits = 0; bits <= (binade == 0 ? 0 : 7) && sub.bits < 0; ++bits) {
        bool fits = true;
        for (uint32_t j = 0; j < (1u << bits) && fits; ++j) {
          const uint32_t width = 1u << (23 - bits);
          float lo = pfp::bits_to_float((exponent << 23) | j * width);
          const float hi = pfp::bits_to_float((exponent << 23) | ((j + 1) * width - 1));
          if (binade == 0) lo = 0.0f;  // and every |s| below 2^-26
          const int a = side == 0 ? count_below(c.mid, lo) : count_below(c.mid, -hi);
          const int b = side == 0 ? count_below(c.mid, hi) : count_below(c.mid, -lo);
          fits = b - a <= 1;
          sub.answers[j] = uint8_t(a);
        }
        if (fits) sub.bits = bits;
      }
      if (sub.bits < 0) return;
      subs.push_back(sub);
    }
  }
  // largest first: power-of-two sizes laid end to end then never straddle a 128-entry block
  std::stable_sort(subs.begin(), subs.end(), [](const Sub& x, const Sub& y) { return x.bits > y.bits; });
  std::memset(c.level1, 0, sizeof(c.level1));
  std::memset(c.level2, 0, sizeof(c.level2));
  int offset = 0;
  for (const Sub& sub : subs) {
    if (offset + (1 << sub.bits) > 512) return;
    c.level1[0][sub.level1_index] = uint8_t(8 - sub.bits);
    c.level1[1][sub.level1_index] = uint8_t((1 << sub.bits) - 1);
    c.level1[2][sub.level1_index] = uint8_t(offset % 128);
    c.level1[3][sub.level1_index] = uint8_t(offset / 128);
    std::memcpy(c.level2 + offset, sub.answers, size_t(1) << sub.bits);
    offset += 1 << sub.bits;
  }
  for (int k = 0; k < 256; ++k)
    for (int p = 0; p < 4; ++p) c.mid_planes[p][k] = uint8_t(pfp::float_to_bits(c.mid[k]) >> (8 * p));
  c.byte_search = true;
}

std::shared_ptr<const Coder> build_coder(const float* code) {
  auto coder = std::make_shared<Coder>();
  std::memcpy(coder->code, code, sizeof(coder->code));
  for (int k = 0; k < 256; ++k)
    for (int p = 0; p < 4; ++p) coder->planes[p][k] = uint8_t(pfp::float_to_bits(code[k]) >> (8 * p));
  for (int k = 0; k < 255; ++k) coder->mid[k] = (code[k] + code[k + 1]) / 2.0f;
  coder->mid[255] = INFINITY;
  coder->table.assign(2 * kBuckets + 4, 0);
  coder->packed.assign(2 * kBuckets, 0);
  for (uint32_t key = 0; key < kBuckets; ++key) {
    float lo = key == 0 ? 0.0f : pfp::bits_to_float((key + kKeyBase) << kShift);
    float hi = std::fmin(pfp::bits_to_float(((key + kKeyBase) << kShift) | ((1u << kShift) - 1)), 1.0f);
    int pos_lo = count_below(coder->mid, lo), pos_hi = count_below(coder->mid, hi);
    int neg_lo = count_below(coder->mid, -hi), neg_hi = count_below(coder->mid, -lo);
    if (pos_hi - pos_lo > 1 || neg_hi - neg_lo > 1) coder->table_exact = false;
    coder->table[key] = uint8_t(pos_lo);
    coder->table[kBuckets + key] = uint8_t(neg_lo);
    // the midpoint inside, as a magnitude: mid[pos_lo] for positive s, -mid[neg_lo] for negative s
    auto pack = [&](int lo_answer, int hi_answer, float magnitude) {
      uint32_t entry = uint32_t(lo_answer);
      if (hi_answer > lo_answer && key != 0) entry |= (1u << 8) | ((pfp::float_to_bits(magnitude) & 0x7FFFu) << 9);
      if (hi_answer > lo_answer && key == 0) coder->table_exact = false;  // the shared tiny bucket holds a midpoint
      return entry;
    };
    coder->packed[key] = pack(pos_lo, pos_hi, pos_hi > pos_lo ? coder->mid[pos_lo] : 0.0f);
    coder->packed[kBuckets + key] = pack(neg_lo, neg_hi, neg_hi > neg_lo ? -coder->mid[neg_lo] : 0.0f);
  }
  while (coder->negative_codes < 256 && std::signbit(code[coder->negative_codes])) ++coder->negative_codes;
  for (int k = coder->negative_codes; k < 256; ++k) coder->signs_sorted &= !std::signbit(code[k]);
  build_byte_search(*coder);
  return coder;
}

// The coder of `code`, built once and kept for the next calls (a training run quantizes every state with the same
// two maps); a few maps are kept, compared by value, so a changed map is never served a stale table.
std::shared_ptr<const Coder> coder_for(const float* code) {
  static std::mutex mutex;
  static std::shared_ptr<const Coder> cache[4];
  static int next = 0;
  std::lock_guard<std::mutex> lock(mutex);
  for (auto& entry : cache)
    if (entry && std::memcmp(entry->code, code, sizeof(entry->code)) == 0) return entry;
  auto coder = build_coder(code);
  cache[next] = coder;
  next = (next + 1) % 4;
  return coder;
}

inline int nearest_one(const Coder& c, float s) {
  if (s != s) return 255;
  if (!c.table_exact) return count_below(c.mid, s);
  uint32_t bits = pfp::float_to_bits(s);
  uint32_t key = (bits & 0x7FFFFFFFu) >> kShift;
  key = key > kKeyBase ? key - kKeyBase : 0;
  int base = c.table[key + ((bits >> 31) ? kBuckets : 0)];
  return base + (c.mid[base] < s ? 1 : 0);
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// nearest_one for 16 values at once, from the packed table (the coder's table must be exact).
inline __m512i nearest16(const Coder& c, __m512 s) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), byte = _mm512_set1_epi32(0xFF);
  const __m512i negative_offset = _mm512_set1_epi32(int(kBuckets)), one = _mm512_set1_epi32(1);
  const __m512i last = _mm512_set1_epi32(255), key_base = _mm512_set1_epi32(int(kKeyBase));
  const __m512i low15 = _mm512_set1_epi32(0x7FFF), has_mid = _mm512_set1_epi32(1 << 8);
  __m512i bits = _mm512_castps_si512(s);
  __mmask16 nan = _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q);
  __mmask16 neg = _mm512_movepi32_mask(bits);
  __m512i mag = _mm512_and_si512(bits, magnitude);
  __m512i full_key = _mm512_srli_epi32(mag, kShift);
  __m512i key = _mm512_sub_epi32(_mm512_max_epu32(full_key, key_base), key_base);
  key = _mm512_mask_add_epi32(key, neg, key, negative_offset);
  key = _mm512_mask_mov_epi32(key, nan, _mm512_setzero_si512());  // a NaN's key would read past the table
  __m512i entry = _mm512_i32gather_epi32(key, c.packed.data(), 4);
  __m512i base = _mm512_and_si512(entry, byte);
  // the midpoint's magnitude bits: the bucket's key above, the stored low 15 bits below
  __m512i mid =
      _mm512_or_si512(_mm512_slli_epi32(full_key, kShift), _mm512_and_si512(_mm512_srli_epi32(entry, 9), low15));
  __mmask16 inside = _mm512_test_epi32_mask(entry, has_mid);
  // s above the midpoint: |s| > |mid| for positive s, |s| < |mid| for negative s
  __mmask16 up = (_mm512_cmpgt_epu32_mask(mag, mid) & ~neg) | (_mm512_cmplt_epu32_mask(mag, mid) & neg);
  __m512i idx = _mm512_mask_add_epi32(base, up & inside, base, one);
  return _mm512_mask_mov_epi32(idx, nan, last);
}

// Running max |v| of a block, NaN if any v is (abs_max's result once folded), kept as magnitude bits: for floats
// without a sign, integer order is float order, and a NaN's bits lie above +inf's, so one integer max a vector does
// what a float max and a NaN flag did.
struct AbsMax {
  __m512i max = _mm512_setzero_si512();
  void add(__m512 v) {
    max = _mm512_max_epu32(max, _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF)));
  }
  float value() const {
    const uint32_t bits = _mm512_reduce_max_epu32(max);
    return bits > 0x7F800000u ? NAN : pfp::bits_to_float(bits);
  }
};

inline void store_codes16(uint8_t* codes, __m512i idx) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(idx));
}
#endif

// codes[i] = nearest code of scaled[i] (each in [-1, 1] or NaN), for n values.
void nearest_codes(const Coder& c, const float* scaled, uint8_t* codes, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  if (c.table_exact)
    for (; i + 16 <= n; i += 16) store_codes16(codes + i, nearest16(c, _mm512_loadu_ps(scaled + i)));
#endif
  for (; i < n; ++i) codes[i] = uint8_t(nearest_one(c, scaled[i]));
}

inline float to_f32(float v) { return v; }
inline float to_f32(double v) { return float(v); }
inline float to_f32(pfp::bf16 v) { return pfp::to_float(v); }
inline float to_f32(pfp::half v) { return pfp::to_float(v); }
template <typename T>
inline T from_f32(float v) {
  if constexpr (std::is_same_v<T, double>) {
    return double(v);
  } else {
    return pfp::from_compute<T>(v);
  }
}

// max |v| over n values; a NaN anywhere gives NaN (torch's amax).
inline float abs_max(const float* v, int64_t n) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    float a = std::fabs(v[i]);
    nan |= a != a;
    m = a > m ? a : m;
  }
  return nan ? NAN : m;
}

// v clamped to [-1, 1], NaN kept (torch's clamp; fmin / fmax would drop it).
inline float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// Scales v[0, n) of one block in place to [-1, 1] (the full-block or partial-block rule) and returns the absmax
// to store for it.
inline float scale_block(float* v, int64_t n, bool full) {
  float absmax = abs_max(v, n);
  float floor = absmax > kTiny ? absmax : kTiny;  // NaN stays NaN below
  if (absmax != absmax) floor = absmax;
  if (full) {
    float inv = 1.0f / floor;
    for (int64_t i = 0; i < n; ++i) v[i] = clamp_unit(v[i] * inv);
    return absmax;
  }
  for (int64_t i = 0; i < n; ++i) v[i] = clamp_unit(v[i] / floor);
  return floor;
}

template <typename T>
void quantize_impl(const T* x, uint8_t* codes, float* absmax, int64_t numel, int64_t blocksize, const Coder& coder,
                   int nthreads) {
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  pfp::parallel_for(blocks, blocksize * 4, nthreads, [&](int64_t begin, int64_t end, int) {
    std::vector<float> values;
    values.resize(size_t(blocksize));
    for (int64_t b = begin; b < end; ++b) {
      int64_t start = b * blocksize, len = numel - start < blocksize ? numel - start : blocksize;
      for (int64_t i = 0; i < len; ++i) values[i] = to_f32(x[start + i]);
#if defined(__AVX512F__) && defined(__AVX512DQ__)
      if (len == blocksize && blocksize % 16 == 0 && coder.table_exact) {  // a full block: the scalar loops' math
        AbsMax block_max;
        for (int64_t i = 0; i < len; i += 16) block_max.add(_mm512_loadu_ps(values.data() + i));
        const float amax = block_max.value();
        const float floor = amax != amax ? amax : (amax > kTiny ? amax : kTiny);
        const __m512 inv = _mm512_set1_ps(1.0f / floor), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
        for (int64_t i = 0; i < len; i += 16) {
          const __m512 s = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(_mm512_loadu_ps(values.data() + i), inv)));
          store_codes16(codes + start + i, nearest16(coder, s));
        }
        absmax[b] = amax;
        continue;
      }
#endif
      absmax[b] = scale_block(values.data(), len, len == blocksize);
      nearest_codes(coder, values.data(), codes + start, len);
    }
  });
}

template <typename T>
void dequantize_impl(const uint8_t* codes, const float* absmax, const float* code, T* out, int64_t numel,
                     int64_t blocksize, int nthreads) {
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  pfp::parallel_for(blocks, blocksize, nthreads, [&](int64_t begin, int64_t end, int) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t start = b * blocksize, len = numel - start < blocksize ? numel - start : blocksize;
      const float a = absmax[b];
      for (int64_t i = 0; i < len; ++i) out[start + i] = from_f32<T>(code[codes[start + i]] * a);
    }
  });
}

// Writes the quantized state v[0, n) of one optimizer block: codes and absmax, with bnb's sign rule when signed.
inline void store_state(float* v, float* scratch, int64_t n, const Coder& coder, bool signed_state, uint8_t* codes,
                        float* absmax) {
  std::memcpy(scratch, v, size_t(n) * sizeof(float));
  *absmax = scale_block(scratch, n, n == kStateBlock);
  nearest_codes(coder, scratch, codes, n);
  if (!signed_state) return;
  for (int64_t i = 0; i < n; ++i) {
    int c = codes[i];
    if (std::signbit(coder.code[c]) != std::signbit(v[i])) {
      c += v[i] > 0.0f ? 1 : -1;
      codes[i] = uint8_t(c < 0 ? 0 : (c > 255 ? 255 : c));
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// Full 256-element blocks of the optimizers run these AVX-512 versions (the partial last block and the other
// instruction sets run the scalar loops): the same operations in the same order, so the same bits.

// Lanes whose value is NaN or +-inf.
inline __mmask16 not_finite(__m512 v) { return _mm512_fpclass_ps_mask(v, 0x01 | 0x08 | 0x10 | 0x80); }

// out[r] lane j = the float whose byte p is planes[p][index byte 16 r + j], p = 0..3: each byte from its 256-entry
// plane (two vpermi2b over 128, picked by the index's bit 7), then the planes interleave into floats. The unpacks
// work within 128-bit lanes (float j of lane L of out[r] is built from byte 16 L + 4 r + j of what they are given),
// so the index is first reordered to put its byte 16 r + 4 L + j there. On Zen 4 about three times fewer operations a
// value than Map256's permutes and blends (a standalone decoding loop: 0.08 against 0.24 ns a value).
__attribute__((target("avx512vbmi"))) inline void lookup64(const uint8_t (*planes)[256], __m512i index, __m512 out[4]) {
  alignas(64) static constexpr uint8_t kInterleave[64] = {
      0,  1,  2,  3,  16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4,  5,  6,  7,  20, 21,
      22, 23, 36, 37, 38, 39, 52, 53, 54, 55, 8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43,
      56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  index = _mm512_permutexvar_epi8(_mm512_load_si512(kInterleave), index);
  const __mmask64 high = _mm512_movepi8_mask(index);
  __m512i plane[4];
  for (int p = 0; p < 4; ++p) {
    const uint8_t* table = planes[p];
    const __m512i low_half = _mm512_permutex2var_epi8(_mm512_loadu_si512(table), index, _mm512_loadu_si512(table + 64));
    const __m512i high_half =
        _mm512_permutex2var_epi8(_mm512_loadu_si512(table + 128), index, _mm512_loadu_si512(table + 192));
    plane[p] = _mm512_mask_blend_epi8(high, low_half, high_half);
  }
  const __m512i low01 = _mm512_unpacklo_epi8(plane[0], plane[1]), high01 = _mm512_unpackhi_epi8(plane[0], plane[1]);
  const __m512i low23 = _mm512_unpacklo_epi8(plane[2], plane[3]), high23 = _mm512_unpackhi_epi8(plane[2], plane[3]);
  out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(low01, low23));
  out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(low01, low23));
  out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(high01, high23));
  out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(high01, high23));
}

// Byte c of each dword of v[0..3], in lane order: 64 bytes. Two vpermt2b pick them from v[0], v[1] (bytes 0-31)
// and v[2], v[3] (bytes 32-63): byte d takes byte 4 (d % 16) + c of the pair's first (d % 32 < 16) or second.
__attribute__((target("avx512vbmi"))) inline __m512i dword_bytes(const __m512i v[4], int c) {
  alignas(64) static constexpr uint8_t kFirstBytes[64] = {
      0,  4,  8,  12,  16,  20,  24,  28,  32,  36,  40, 44, 48, 52,  56,  60,  64,  68,  72,  76, 80, 84,
      88, 92, 96, 100, 104, 108, 112, 116, 120, 124, 0,  4,  8,  12,  16,  20,  24,  28,  32,  36, 40, 44,
      48, 52, 56, 60,  64,  68,  72,  76,  80,  84,  88, 92, 96, 100, 104, 108, 112, 116, 120, 124};
  const __m512i index = _mm512_add_epi8(_mm512_load_si512(kFirstBytes), _mm512_set1_epi8(char(c)));
  return _mm512_mask_blend_epi8(__mmask64(0xFFFFFFFF00000000ull), _mm512_permutex2var_epi8(v[0], index, v[1]),
                                _mm512_permutex2var_epi8(v[2], index, v[3]));
}

// m[0] in bits 0-15 .. m[3] in bits 48-63, by mask-register unpacks (shifts and ors went through general registers)
inline __mmask64 join_masks(const __mmask16 m[4]) {
  return _mm512_kunpackd(__mmask64(_mm512_kunpackw(m[3], m[2])), __mmask64(_mm512_kunpackw(m[1], m[0])));
}

// nearest16 and store_full_state's sign rule for 64 values, in bytes and without a gather (c.byte_search):
// codes[i] = the nearest code of scaled[i] (in [-1, 1] or NaN), then, for a signed state, moved one step towards
// value[i]'s sign where the code's sign differs. The answer at s's sub-bucket start comes from the two levels of
// byte tables, and one comparison with the next midpoint (looked up by lookup64) finishes it, as nearest_one does.
// On Zen 4, where a gather costs about as much as 16 loads, this took the gathers' place in the AdamW8bit step.
__attribute__((target("avx512vbmi"))) inline void nearest64_vbmi(const Coder& c, const __m512 s[4], const float* value,
                                                                 bool signed_state, uint8_t* codes) {
  __m512i shifted[4];
  for (int r = 0; r < 4; ++r)
    shifted[r] = _mm512_srli_epi32(_mm512_castps_si512(s[r]), 15);  // byte 0: top 8 mantissa bits, 1: exponent
  const __m512i mantissa = dword_bytes(shifted, 0), exponent = dword_bytes(shifted, 1);
  const __mmask64 negative = _mm512_test_epi8_mask(dword_bytes(shifted, 2), _mm512_set1_epi8(1));
  const __mmask64 nan = _mm512_cmpeq_epi8_mask(exponent, _mm512_set1_epi8(char(0xFF)));  // no inf after the clamp
  __m512i level1 = _mm512_subs_epu8(exponent, _mm512_set1_epi8(101));
  level1 = _mm512_mask_add_epi8(level1, negative, level1, _mm512_set1_epi8(32));
  // the top `bits` mantissa bits: vpmultishiftqb takes 8 bits of the qword from byte j's bit 8 - bits on
  alignas(64) static constexpr uint8_t kByteBase[64] = {0, 8, 16, 24, 32, 40, 48, 56, 0, 8, 16, 24, 32, 40, 48, 56,
                                                        0, 8, 16, 24, 32, 40, 48, 56, 0, 8, 16, 24, 32, 40, 48, 56,
                                                        0, 8, 16, 24, 32, 40, 48, 56, 0, 8, 16, 24, 32, 40, 48, 56,
                                                        0, 8, 16, 24, 32, 40, 48, 56, 0, 8, 16, 24, 32, 40, 48, 56};
  const __m512i control =
      _mm512_add_epi8(_mm512_permutexvar_epi8(level1, _mm512_loadu_si512(c.level1[0])), _mm512_load_si512(kByteBase));
  const __m512i top = _mm512_and_si512(_mm512_multishift_epi64_epi8(control, mantissa),
                                       _mm512_permutexvar_epi8(level1, _mm512_loadu_si512(c.level1[1])));
  const __m512i index = _mm512_add_epi8(_mm512_permutexvar_epi8(level1, _mm512_loadu_si512(c.level1[2])), top),
                block = _mm512_permutexvar_epi8(level1, _mm512_loadu_si512(c.level1[3]));
  __m512i part[4];
  for (int q = 0; q < 4; ++q)
    part[q] = _mm512_permutex2var_epi8(_mm512_loadu_si512(c.level2 + 128 * q), index,
                                       _mm512_loadu_si512(c.level2 + 128 * q + 64));
  const __mmask64 odd = _mm512_test_epi8_mask(block, _mm512_set1_epi8(1));
  const __mmask64 upper = _mm512_test_epi8_mask(block, _mm512_set1_epi8(2));
  const __m512i base = _mm512_mask_blend_epi8(upper, _mm512_mask_blend_epi8(odd, part[0], part[1]),
                                              _mm512_mask_blend_epi8(odd, part[2], part[3]));
  __m512 mid[4];
  lookup64(c.mid_planes, base, mid);
  __mmask16 up[4];
  for (int r = 0; r < 4; ++r) up[r] = _mm512_cmp_ps_mask(mid[r], s[r], _CMP_LT_OQ);
  __m512i idx = _mm512_mask_add_epi8(base, join_masks(up), base, _mm512_set1_epi8(1));
  idx = _mm512_mask_mov_epi8(idx, nan, _mm512_set1_epi8(char(0xFF)));
  if (signed_state) {
    __m512i bits[4];
    __mmask16 positive[4];
    for (int r = 0; r < 4; ++r) {
      const __m512 v = _mm512_load_ps(value + 16 * r);
      bits[r] = _mm512_castps_si512(v);
      positive[r] = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
    }
    // the sign of value itself: where a NaN absmax made every s of the block NaN, s's sign is not value's
    const __mmask64 value_negative = _mm512_movepi8_mask(dword_bytes(bits, 3));
    const __mmask64 code_negative = _mm512_cmplt_epu8_mask(idx, _mm512_set1_epi8(char(c.negative_codes)));
    const __mmask64 flipped = code_negative ^ value_negative, up_step = join_masks(positive);
    idx = _mm512_mask_adds_epu8(idx, flipped & up_step, idx, _mm512_set1_epi8(1));
    idx = _mm512_mask_subs_epu8(idx, flipped & ~up_step, idx, _mm512_set1_epi8(1));
  }
  _mm512_storeu_si512(codes, idx);
}

// store_state for a full block whose absmax is known: scale, nearest code, sign rule; absmax stored. kVbmi: the
// search is nearest64_vbmi's where the coder allows it (the caller runs under that target).
template <bool kVbmi = false>
inline void store_full_state(const float* v, float absmax, const Coder& coder, bool signed_state, uint8_t* codes,
                             float* absmax_out) {
  *absmax_out = absmax;
  const float floor = absmax != absmax ? absmax : (absmax > kTiny ? absmax : kTiny);
  const __m512 inv = _mm512_set1_ps(1.0f / floor), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  const __m512i one = _mm512_set1_epi32(1), minus_one = _mm512_set1_epi32(-1), zero = _mm512_setzero_si512();
  const __m512i last = _mm512_set1_epi32(255), negative_codes = _mm512_set1_epi32(coder.negative_codes);
  alignas(64) float scaled[kStateBlock];
  if constexpr (kVbmi) {
    if (coder.byte_search) {
      for (int64_t i = 0; i < kStateBlock; i += 64) {
        __m512 s[4];
        for (int r = 0; r < 4; ++r)
          s[r] = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(_mm512_load_ps(v + i + 16 * r), inv)));
        nearest64_vbmi(coder, s, v + i, signed_state, codes + i);
      }
      return;
    }
  }
  for (int64_t i = 0; i < kStateBlock; i += 16) {
    const __m512 value = _mm512_load_ps(v + i);
    // max/min return their second operand for a NaN: kept, as torch's clamp keeps it
    const __m512 s = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(value, inv)));
    if (!coder.table_exact) {
      _mm512_store_ps(scaled + i, s);
      continue;
    }
    __m512i idx = nearest16(coder, s);
    if (signed_state) {
      __mmask16 code_negative =
          coder.signs_sorted ? _mm512_cmplt_epi32_mask(idx, negative_codes)
                             : _mm512_movepi32_mask(_mm512_castps_si512(_mm512_i32gather_ps(idx, coder.code, 4)));
      __mmask16 flipped = code_negative ^ _mm512_movepi32_mask(_mm512_castps_si512(value));
      __mmask16 positive = _mm512_cmp_ps_mask(value, _mm512_setzero_ps(), _CMP_GT_OQ);
      __m512i step = _mm512_mask_mov_epi32(minus_one, positive, one);
      idx = _mm512_mask_add_epi32(idx, flipped, idx, step);
      idx = _mm512_min_epi32(_mm512_max_epi32(idx, zero), last);
    }
    store_codes16(codes + i, idx);
  }
  if (coder.table_exact) return;
  nearest_codes(coder, scaled, codes, kStateBlock);
  if (!signed_state) return;
  for (int64_t i = 0; i < kStateBlock; ++i) {
    int c = codes[i];
    if (std::signbit(coder.code[c]) != std::signbit(v[i])) {
      c += v[i] > 0.0f ? 1 : -1;
      codes[i] = uint8_t(c < 0 ? 0 : (c > 255 ? 255 : c));
    }
  }
}

// A 256-float map in registers: lookup(idx) = map[idx] for idx in [0, 255], by permutes (no gather).
struct Map256 {
  __m512 r[16];
  explicit Map256(const float* map) {
    for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(map + 16 * k);
  }
  __m512 lookup(__m512i idx) const {
    const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    __m512 q[8];
    for (int k = 0; k < 8; ++k) q[k] = _mm512_permutex2var_ps(r[2 * k], idx, r[2 * k + 1]);  // idx bits 0-4
    __m512 a0 = _mm512_mask_blend_ps(b5, q[0], q[1]), a1 = _mm512_mask_blend_ps(b5, q[2], q[3]);
    __m512 a2 = _mm512_mask_blend_ps(b5, q[4], q[5]), a3 = _mm512_mask_blend_ps(b5, q[6], q[7]);
    return _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, a0, a1), _mm512_mask_blend_ps(b6, a2, a3));
  }
};

inline __m512i load_codes16(const uint8_t* codes) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
}
#endif

// The blocks of one optimizer call's tensors, numbered globally so that one parallel loop spreads all of them
// over the threads (a LoRA model's hundreds of small adapters would otherwise each pay for a parallel region).
struct BlockMap {
  std::vector<int64_t> first;  // first[t]: global number of tensor t's block 0; first[count]: the total
  BlockMap(const int64_t* numels, int64_t count) : first(size_t(count) + 1, 0) {
    for (int64_t t = 0; t < count; ++t) first[t + 1] = first[t] + (numels[t] + kStateBlock - 1) / kStateBlock;
  }
  int64_t total() const { return first.back(); }
  // the tensor holding global block gb
  int64_t tensor_of(int64_t gb) const {
    return int64_t(std::upper_bound(first.begin(), first.end(), gb) - first.begin()) - 1;
  }
};

template <typename T>
inline T* pointer(const int64_t* addresses, int64_t t) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(addresses[t]));
}

struct AdamConstants {
  float step_size, correction2_eps, beta1, beta2, one_minus_beta1, one_minus_beta2, decay;
  bool apply_decay;
};

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// One full block of adam_impl: param updated in place; the new codes and absmax written; m and v: the block's new
// states, as scratch. kVbmi: the old states are looked up 64 values at a time by lookup64, the search is
// nearest64_vbmi's (the caller runs it under that target: adam_block_vbmi).
template <bool kVbmi>
inline void adam_block_avx512(const float* grad, float* param, float* m, float* v, uint8_t* state1, uint8_t* state2,
                              float a1, float a2, const Coder& coder1, const Coder& coder2, const AdamConstants& k,
                              float* absmax1, float* absmax2) {
  const __m512 beta1 = _mm512_set1_ps(k.beta1), beta2 = _mm512_set1_ps(k.beta2);
  const __m512 omb1 = _mm512_set1_ps(k.one_minus_beta1), omb2 = _mm512_set1_ps(k.one_minus_beta2);
  const __m512 step_size = _mm512_set1_ps(k.step_size), c2eps = _mm512_set1_ps(k.correction2_eps);
  const __m512 decay = _mm512_set1_ps(k.decay), va1 = _mm512_set1_ps(a1), va2 = _mm512_set1_ps(a2);
  AbsMax max1, max2;
  // values i..i + 15: m_code, v_code the states' code values, scaled by their absmax here
  auto update16 = [&](int64_t i, __m512 m_code, __m512 v_code) {
    const __m512 gr = _mm512_loadu_ps(grad + i), pr = _mm512_loadu_ps(param + i);
    const __mmask16 ok = __mmask16(~not_finite(gr));
    const __m512 gv = _mm512_maskz_mov_ps(ok, gr);
    const __m512 m_old = _mm512_mul_ps(m_code, va1), v_old = _mm512_mul_ps(v_code, va2);
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(v_old, beta2), _mm512_mul_ps(_mm512_mul_ps(omb2, gv), gv));
    const __m512 mi = _mm512_add_ps(_mm512_mul_ps(m_old, beta1), _mm512_mul_ps(omb1, gv));
    __m512 updated = _mm512_div_ps(mi, _mm512_add_ps(_mm512_sqrt_ps(vi), c2eps));
    updated = _mm512_add_ps(pr, _mm512_mul_ps(step_size, updated));
    if (k.apply_decay) updated = _mm512_mul_ps(updated, decay);
    const __m512 m_new = _mm512_maskz_mov_ps(ok, mi), v_new = _mm512_maskz_mov_ps(ok, vi);
    _mm512_storeu_ps(param + i, _mm512_mask_mov_ps(pr, ok, updated));
    _mm512_store_ps(m + i, m_new);
    _mm512_store_ps(v + i, v_new);
    max1.add(m_new);
    max2.add(v_new);
  };
  if constexpr (kVbmi) {  // both states' codes 64 at a time by lookup64, kept in registers
    for (int64_t i = 0; i < kStateBlock; i += 64) {
      __m512 codes1[4], codes2[4];
      lookup64(coder1.planes, _mm512_loadu_si512(state1 + i), codes1);
      lookup64(coder2.planes, _mm512_loadu_si512(state2 + i), codes2);
      for (int r = 0; r < 4; ++r) update16(i + 16 * r, codes1[r], codes2[r]);
    }
  } else {
    const Map256 map1(coder1.code), map2(coder2.code);
    for (int64_t i = 0; i < kStateBlock; i += 16)
      update16(i, map1.lookup(load_codes16(state1 + i)), map2.lookup(load_codes16(state2 + i)));
  }
  store_full_state<kVbmi>(m, max1.value(), coder1, true, state1, absmax1);
  store_full_state<kVbmi>(v, max2.value(), coder2, false, state2, absmax2);
}

__attribute__((target("avx512vbmi"), flatten)) void adam_block_vbmi(const float* grad, float* param, float* m, float* v,
                                                                    uint8_t* state1, uint8_t* state2, float a1,
                                                                    float a2, const Coder& coder1, const Coder& coder2,
                                                                    const AdamConstants& k, float* absmax1,
                                                                    float* absmax2) {
  adam_block_avx512<true>(grad, param, m, v, state1, state2, a1, a2, coder1, coder2, k, absmax1, absmax2);
}
#endif

// Runs body(t, b, start, len) for every 256-element block b of every tensor t (len < 256 for a tensor's partial last
// block), all the tensors' blocks spread over the threads in one parallel loop.
template <typename F>
void for_each_block(const int64_t* numels, int64_t count, int64_t work_per_block, int nthreads, F&& body) {
  const BlockMap blocks(numels, count);
  pfp::parallel_for(blocks.total(), work_per_block, nthreads, [&](int64_t begin, int64_t end, int) {
    int64_t t = begin < end ? blocks.tensor_of(begin) : 0;
    for (int64_t gb = begin; gb < end; ++gb) {
      while (gb >= blocks.first[t + 1]) ++t;
      const int64_t b = gb - blocks.first[t], start = b * kStateBlock;
      body(t, b, start, numels[t] - start < kStateBlock ? numels[t] - start : kStateBlock);
    }
  });
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// block(grad, param) over one full block of p and g: fp32 parameters where they are, 16-bit ones through fp32
// staging buffers (param written back after).
template <typename T, typename F>
inline void on_full_block(T* p, const T* g, float* grad, float* param, F&& block) {
  if constexpr (std::is_same_v<T, float>) {
    block(g, p);
  } else {
    pfp::load_row(g, grad, kStateBlock);
    pfp::load_row(p, param, kStateBlock);
    block(grad, param);
    pfp::store_row(param, p, kStateBlock);
  }
}
#endif

template <typename T>
void adam_impl(const int64_t* ps, const int64_t* gs, const int64_t* state1s, const int64_t* state2s,
               const int64_t* absmax1s, const int64_t* absmax2s, const int64_t* numels, int64_t count,
               const Coder& coder1, const Coder& coder2, const AdamConstants& k, int nthreads) {
  [[maybe_unused]] const bool vbmi = pfp::avx512_vbmi_in_use();
  for_each_block(numels, count, kStateBlock * 16, nthreads, [&](int64_t t, int64_t b, int64_t start, int64_t len) {
    alignas(64) float grad[kStateBlock], param[kStateBlock], m[kStateBlock], v[kStateBlock], scratch[kStateBlock];
    T* p = pointer<T>(ps, t) + start;
    const T* g = pointer<const T>(gs, t) + start;
    uint8_t *state1 = pointer<uint8_t>(state1s, t) + start, *state2 = pointer<uint8_t>(state2s, t) + start;
    float *absmax1 = pointer<float>(absmax1s, t) + b, *absmax2 = pointer<float>(absmax2s, t) + b;
    const float a1 = *absmax1, a2 = *absmax2;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if (len == kStateBlock) {
      on_full_block(p, g, grad, param, [&](const float* gr, float* pr) {
        if (vbmi)
          adam_block_vbmi(gr, pr, m, v, state1, state2, a1, a2, coder1, coder2, k, absmax1, absmax2);
        else
          adam_block_avx512<false>(gr, pr, m, v, state1, state2, a1, a2, coder1, coder2, k, absmax1, absmax2);
      });
      return;
    }
#endif
    pfp::load_row(g, grad, len);
    pfp::load_row(p, param, len);
    for (int64_t i = 0; i < len; ++i) {
      m[i] = coder1.code[state1[i]] * a1;
      v[i] = coder2.code[state2[i]] * a2;
    }
    for (int64_t i = 0; i < len; ++i) {
      const bool ok = std::isfinite(grad[i]);
      const float gv = ok ? grad[i] : 0.0f;
      const float vi = v[i] * k.beta2 + k.one_minus_beta2 * gv * gv;
      const float mi = m[i] * k.beta1 + k.one_minus_beta1 * gv;
      float updated = param[i] + k.step_size * (mi / (std::sqrt(vi) + k.correction2_eps));
      if (k.apply_decay) updated = updated * k.decay;
      v[i] = ok ? vi : 0.0f;
      m[i] = ok ? mi : 0.0f;
      param[i] = ok ? updated : param[i];
    }
    pfp::store_row(param, p, len);
    store_state(m, scratch, len, coder1, true, state1, absmax1);
    store_state(v, scratch, len, coder2, false, state2, absmax2);
  });
}

struct LionConstants {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, decay;
  bool apply_decay;
};

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// One full block of lion_impl; kVbmi as adam_block_avx512's.
template <bool kVbmi>
inline void lion_block_avx512(const float* grad, float* param, float* m, uint8_t* state1, float a1, const Coder& coder,
                              const LionConstants& k, float* absmax1) {
  const __m512 beta1 = _mm512_set1_ps(k.beta1), beta2 = _mm512_set1_ps(k.beta2);
  const __m512 omb1 = _mm512_set1_ps(k.one_minus_beta1), omb2 = _mm512_set1_ps(k.one_minus_beta2);
  const __m512 lr = _mm512_set1_ps(k.lr), decay = _mm512_set1_ps(k.decay), va1 = _mm512_set1_ps(a1);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
  AbsMax max1;
  auto update16 = [&](int64_t i, __m512 m_code) {  // m_code: the state's code values, scaled by its absmax here
    const __m512 gr = _mm512_loadu_ps(grad + i), pr = _mm512_loadu_ps(param + i);
    const __mmask16 ok = __mmask16(~not_finite(gr));
    const __m512 gv = _mm512_maskz_mov_ps(ok, gr);
    const __m512 mi = _mm512_mul_ps(m_code, va1);
    const __m512 blend = _mm512_add_ps(_mm512_mul_ps(mi, beta1), _mm512_mul_ps(omb1, gv));
    // torch.sign(blend): +1, -1, and +0 for +-0 and NaN (a NaN momentum leaves the parameter as it is)
    __m512 sign = _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(blend, zero, _CMP_GT_OQ), one);
    sign = _mm512_mask_mov_ps(sign, _mm512_cmp_ps_mask(blend, zero, _CMP_LT_OQ), minus_one);
    __m512 updated = k.apply_decay ? _mm512_mul_ps(pr, decay) : pr;
    updated = _mm512_sub_ps(updated, _mm512_mul_ps(lr, sign));
    const __m512 m_new = _mm512_maskz_mov_ps(ok, _mm512_add_ps(_mm512_mul_ps(mi, beta2), _mm512_mul_ps(omb2, gv)));
    _mm512_storeu_ps(param + i, _mm512_mask_mov_ps(pr, ok, updated));
    _mm512_store_ps(m + i, m_new);
    max1.add(m_new);
  };
  if constexpr (kVbmi) {  // the state's codes 64 at a time by lookup64, kept in registers
    for (int64_t i = 0; i < kStateBlock; i += 64) {
      __m512 codes1[4];
      lookup64(coder.planes, _mm512_loadu_si512(state1 + i), codes1);
      for (int r = 0; r < 4; ++r) update16(i + 16 * r, codes1[r]);
    }
  } else {
    const Map256 map1(coder.code);
    for (int64_t i = 0; i < kStateBlock; i += 16) update16(i, map1.lookup(load_codes16(state1 + i)));
  }
  store_full_state<kVbmi>(m, max1.value(), coder, true, state1, absmax1);
}

__attribute__((target("avx512vbmi"), flatten)) void lion_block_vbmi(const float* grad, float* param, float* m,
                                                                    uint8_t* state1, float a1, const Coder& coder,
                                                                    const LionConstants& k, float* absmax1) {
  lion_block_avx512<true>(grad, param, m, state1, a1, coder, k, absmax1);
}
#endif

template <typename T>
void lion_impl(const int64_t* ps, const int64_t* gs, const int64_t* state1s, const int64_t* absmax1s,
               const int64_t* numels, int64_t count, const Coder& coder, const LionConstants& k, int nthreads) {
  [[maybe_unused]] const bool vbmi = pfp::avx512_vbmi_in_use();
  for_each_block(numels, count, kStateBlock * 12, nthreads, [&](int64_t t, int64_t b, int64_t start, int64_t len) {
    alignas(64) float grad[kStateBlock], param[kStateBlock], m[kStateBlock], scratch[kStateBlock];
    T* p = pointer<T>(ps, t) + start;
    const T* g = pointer<const T>(gs, t) + start;
    uint8_t* state1 = pointer<uint8_t>(state1s, t) + start;
    float* absmax1 = pointer<float>(absmax1s, t) + b;
    const float a1 = *absmax1;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if (len == kStateBlock) {
      on_full_block(p, g, grad, param, [&](const float* gr, float* pr) {
        if (vbmi)
          lion_block_vbmi(gr, pr, m, state1, a1, coder, k, absmax1);
        else
          lion_block_avx512<false>(gr, pr, m, state1, a1, coder, k, absmax1);
      });
      return;
    }
#endif
    pfp::load_row(g, grad, len);
    pfp::load_row(p, param, len);
    for (int64_t i = 0; i < len; ++i) {
      const bool ok = std::isfinite(grad[i]);
      const float gv = ok ? grad[i] : 0.0f;
      const float mi = coder.code[state1[i]] * a1;
      const float blend = mi * k.beta1 + k.one_minus_beta1 * gv;
      const float sign = blend > 0.0f ? 1.0f : (blend < 0.0f ? -1.0f : 0.0f);  // torch.sign: +0 for +-0 and NaN
      float updated = k.apply_decay ? param[i] * k.decay : param[i];
      updated = updated - k.lr * sign;
      m[i] = ok ? mi * k.beta2 + k.one_minus_beta2 * gv : 0.0f;
      param[i] = ok ? updated : param[i];
    }
    pfp::store_row(param, p, len);
    store_state(m, scratch, len, coder, true, state1, absmax1);
  });
}

}  // namespace

// blockwise_quantize: codes[numel] uint8 and absmax[ceil(numel / blocksize)] fp32 of x[numel] (fp32, fp16, bf16 or
// fp64, through its fp32 rounding), nearest of code[256] (fp32, sorted ascending), blocksize >= 1. All contiguous.
void blockwise_quantize(const void* x, int x_dtype, const float* code, uint8_t* codes, float* absmax, int64_t numel,
                        int64_t blocksize, int nthreads) {
  auto coder = coder_for(code);
  pfp::dispatch_float(x_dtype, "blockwise_quantize", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_impl(static_cast<const T*>(x), codes, absmax, numel, blocksize, *coder, nthreads);
  });
}

// blockwise_dequantize: out[numel] (out_dtype) = code[codes[i]] * absmax[i / blocksize] in fp32, rounded once;
// codes uint8 [numel], absmax fp32 [ceil(numel / blocksize)], code fp32 [256]. All contiguous.
void blockwise_dequantize(const uint8_t* codes, const float* absmax, const float* code, void* out, int out_dtype,
                          int64_t numel, int64_t blocksize, int nthreads) {
  pfp::dispatch_float(out_dtype, "blockwise_dequantize", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_impl(codes, absmax, code, static_cast<T*>(out), numel, blocksize, nthreads);
  });
}

// adam8bit_step: one 8-bit Adam step in place over `count` tensors, each given by the addresses in the arrays (one
// entry per tensor): p and g [numels[t]] of one dtype (fp32, fp16, bf16); state1, state2 uint8 [numels[t]]; absmax1,
// absmax2 fp32 [ceil(numels[t] / 256)]. code1 (signed) and code2 fp32 [256], sorted. step_size, correction2_eps,
// decay: this step's constants (see the reference), shared by all the tensors; decay applies only when apply_decay.
// All contiguous, no two overlapping.
void adam8bit_step(const int64_t* p, const int64_t* g, const int64_t* state1, const int64_t* state2,
                   const int64_t* absmax1, const int64_t* absmax2, const int64_t* numels, int64_t count, int dtype,
                   const float* code1, const float* code2, double step_size, double correction2_eps, double beta1,
                   double beta2, double decay, bool apply_decay, int nthreads) {
  auto coder1 = coder_for(code1);
  auto coder2 = coder_for(code2);
  const AdamConstants k{float(step_size),   float(correction2_eps), float(beta1), float(beta2),
                        float(1.0 - beta1), float(1.0 - beta2),     float(decay), apply_decay};
  pfp::dispatch_float(dtype, "adam8bit_step", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<T, double>) {
      throw std::invalid_argument("adam8bit_step: fp64 parameters are not supported");
    } else {
      adam_impl<T>(p, g, state1, state2, absmax1, absmax2, numels, count, *coder1, *coder2, k, nthreads);
    }
  });
}

// lion8bit_step: one 8-bit Lion step in place over `count` tensors given by address arrays as adam8bit_step's: p and
// g [numels[t]] of one dtype (fp32, fp16, bf16); state1 uint8 [numels[t]]; absmax1 fp32 [ceil(numels[t] / 256)];
// code1 fp32 [256], sorted. All contiguous, no two overlapping.
void lion8bit_step(const int64_t* p, const int64_t* g, const int64_t* state1, const int64_t* absmax1,
                   const int64_t* numels, int64_t count, int dtype, const float* code1, double lr, double beta1,
                   double beta2, double decay, bool apply_decay, int nthreads) {
  auto coder = coder_for(code1);
  const LionConstants k{float(lr),          float(beta1), float(beta2), float(1.0 - beta1),
                        float(1.0 - beta2), float(decay), apply_decay};
  pfp::dispatch_float(dtype, "lion8bit_step", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<T, double>) {
      throw std::invalid_argument("lion8bit_step: fp64 parameters are not supported");
    } else {
      lion_impl<T>(p, g, state1, absmax1, numels, count, *coder, k, nthreads);
    }
  });
}

// blockwise_table_exact: exact[0] = 1 when code's bucket table answers every value, 0 when the binary search serves
// it (code fp32 [256], sorted).
void blockwise_table_exact(const float* code, int32_t* exact) { exact[0] = coder_for(code)->table_exact ? 1 : 0; }

}  // namespace PFP_ISA
