// General affine quantization on the CPU: dynamic (group ranges, then codes), static (given parameters) and
// dequantization, per tensor, per channel and per block. pyfastpeft/reference/quantize.py is the oracle and
// writes out the format; every formula runs here with the same fp32 operations in the same order, so the codes
// are identical (rint = nearbyintf under the default rounding mode: round half to even):
//   ranges:    lo = min(min(x), 0), hi = max(max(x), 0), both NaN when the group holds a NaN
//   absmax:    a = max(-lo, hi),  scale = a / qmax,  m = a > 0 ? qmax / a : 0
//              code = clamp(rint(x * m), -qmax, qmax)                        (NaN rint -> 0)
//   zeropoint: scale = (hi - lo) / qmax,  zp = scale > 0 ? clamp(rint(-lo / scale), 0, qmax) : 0   (NaN rint -> 0)
//   affine:    code = scale > 0 ? clamp(rint(x / scale) + zp, qmin, qmax) : zp   (NaN rint -> zp)
//              (dynamic zeropoint, and static parameters of either scheme with zp = 0 for absmax)
//   dequant:   x_hat = (code - zp) * scale in fp32, rounded once to the output dtype.
// Layout (every array contiguous): x is [outer, channels, inner] with one group per channel (per tensor:
// channels = 1); when blocksize > 0 it is flat, numel = outer * channels * inner, in blocks of blocksize
// consecutive elements, the last one short. Parameters are fp32 scale [groups], int32 zero_point [groups].
// Threads: per tensor, a parallel reduction, then parallel coding; per block / per channel with inner > 1, one
// group per task (its range, then its codes, one load while it fits kGroupBuffer; the AVX-512 build codes absmax
// groups of fp32 / bf16 / fp16 into int8 straight from x, see kDirect); per column (inner == 1),
// each thread owns a range of columns: a pass over the rows for their ranges, then one for their codes.
// Static coding and dequantization walk the tensor in chunks of kChunk elements that share one group
// (or, per column, a chunk of a row whose element j belongs to column group + j).
#include "cpu/common.h"
#include "cpu/kernels.h"

#include <algorithm>
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

constexpr int64_t kChunk = 4096;         // elements per load buffer
constexpr int64_t kBackwardsRun = 64;    // chunks for_each_chunk takes in order when it goes backwards
constexpr int64_t kGroupBuffer = 16384;  // groups up to this size are loaded once for range and codes

struct Coder {
  bool multiply;  // absmax dynamic: rint(x * m); otherwise the affine rint(x / scale) + zp
  float qmin, qmax;
};

Coder make_coder(int bits, bool zeropoint, bool dynamic) {
  const float qmax = zeropoint ? float((1 << bits) - 1) : float((1 << (bits - 1)) - 1);
  return Coder{dynamic && !zeropoint, zeropoint ? 0.0f : -qmax, qmax};
}

inline float clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

inline float code_by_multiplier(float v, float multiplier, float qmax) {
  const float rounded = std::nearbyint(v * multiplier);
  return rounded != rounded ? 0.0f : clamp(rounded, -qmax, qmax);
}

inline float code_affine(float v, float scale, float zero_point, float qmin, float qmax) {
  const float rounded = std::nearbyint(v / scale);
  const float code = clamp(rounded + zero_point, qmin, qmax);
  return scale > 0.0f && rounded == rounded ? code : zero_point;
}

// out[i] = code of v[i]; the parameters are [0] for every i, or [i] when kPerElement (per-column chunks).
template <bool kPerElement, typename CodeT>
void code_values(const float* __restrict v, int64_t n, const float* __restrict scale,
                 const float* __restrict zero_point, const float* __restrict multiplier, const Coder& coder,
                 CodeT* __restrict out) {
  const float qmin = coder.qmin, qmax = coder.qmax;
  if (coder.multiply) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = CodeT(int32_t(code_by_multiplier(v[i], multiplier[kPerElement ? i : 0], qmax)));
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = kPerElement ? i : 0;
      out[i] = CodeT(int32_t(code_affine(v[i], scale[k], zero_point[k], qmin, qmax)));
    }
  }
}

template <bool kPerElement, typename CodeT>
void dequantize_values(const CodeT* __restrict codes, int64_t n, const float* __restrict scale,
                       const float* __restrict zero_point, float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = kPerElement ? i : 0;
    out[i] = (float(codes[i]) - zero_point[k]) * scale[k];
  }
}

template <typename T>
void load_values(const T* src, float* dst, int64_t n) {
  pfp::load_row(src, dst, n);
}

template <typename T>
void store_values(const float* src, T* dst, int64_t n) {
  pfp::store_row(src, dst, n);
}
template <>
void store_values<double>(const float* src, double* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

// A group's running range: lo <= 0 <= hi, nan set once a NaN was seen.
struct Range {
  float lo = 0.0f, hi = 0.0f;
  int32_t nan = 0;
  void merge(const Range& other) {
    lo = other.lo < lo ? other.lo : lo;
    hi = other.hi > hi ? other.hi : hi;
    nan |= other.nan;
  }
};

#if defined(__AVX512F__)
// Absmax coding of fp32, bf16 or fp16 x into int8 reads x in place, 16 lanes at a time: the range by magnitude bits
// (pfp::magnitude_bits) and the codes by one conversion, instead of an fp32 copy and the portable loops.
template <typename T, typename CodeT>
constexpr bool kDirect = std::is_same_v<CodeT, int8_t> && !std::is_same_v<T, double>;

// best = max(best, magnitude bits of x[0, n)); bf16 32 lanes at a time in its own 16 bits (a widening load per 16
// made this pass compute-bound).
template <typename T>
inline __m512i extend_magnitude(const T* x, int64_t n, __m512i best) {
  if constexpr (std::is_same_v<T, pfp::bf16>) {
    __m512i best16 = _mm512_setzero_si512();
    for (int64_t i = 0; i < n; i += 32)
      best16 = _mm512_max_epu16(best16, pfp::magnitude_bits32(x + i, pfp::lanes32(n - i)));
    return pfp::widen_magnitudes(best, best16);
  } else {
    for (int64_t i = 0; i < n; i += 16)
      best = _mm512_max_epu32(best, pfp::magnitude_bits(pfp::load16(x + i, pfp::lanes16(n - i))));
    return best;
  }
}

// The range the absmax scheme reads (max(-lo, hi) = max |x|, or NaN) from magnitude bits.
inline Range magnitude_range(__m512i best) {
  const float a = pfp::magnitude_max(best);
  return a != a ? Range{0.0f, 0.0f, 1} : Range{-a, a, 0};
}

// codes[i] = code_by_multiplier(x[i], multiplier, qmax), i in [0, n), where scale and multiplier are the dynamic
// absmax parameters of a group that holds x[0, n) (so |x[i]| <= absmax).
template <typename T>
void code_direct(const T* x, int64_t n, float scale, float multiplier, float qmax, int8_t* codes) {
  // scale (= absmax / qmax) and multiplier (= qmax / absmax, or 0) finite: every |x * multiplier| <= qmax (1 + 2^-22),
  // finite, and it rounds into [-qmax, qmax], so the conversion alone (nearest even under the default rounding
  // mode, as nearbyint) is the code.
  const __m512 m = _mm512_set1_ps(multiplier);
  if (std::isfinite(scale) && std::isfinite(multiplier)) {
    pfp::store_codes(x, n, codes, [&](__m512 v) { return _mm512_cvtps_epi32(_mm512_mul_ps(v, m)); });
    return;
  }
  pfp::store_codes(x, n, codes, [&](__m512 v) {  // code_by_multiplier in lanes: NaN -> 0, +-inf -> +-qmax
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, m), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 number = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(number, _mm512_set1_ps(-qmax)), _mm512_set1_ps(qmax)));
  });
}
#else
template <typename T, typename CodeT>
constexpr bool kDirect = false;
#endif

// Extends range over v[0, n). min/max are exact, so any order of the comparisons gives the same range; the
// vector paths keep the NaN test apart (vminps/vmaxps return their second operand, the running value, for NaN).
inline void extend_range(const float* v, int64_t n, Range& range) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 lo = _mm512_set1_ps(range.lo), hi = _mm512_set1_ps(range.hi);
  __mmask16 nan = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 value = _mm512_loadu_ps(v + i);
    lo = _mm512_min_ps(value, lo);
    hi = _mm512_max_ps(value, hi);
    nan |= _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
  }
  range.merge(Range{_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), int32_t(nan != 0)});
#elif defined(__AVX2__)
  __m256 lo = _mm256_set1_ps(range.lo), hi = _mm256_set1_ps(range.hi), nan = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 value = _mm256_loadu_ps(v + i);
    lo = _mm256_min_ps(value, lo);
    hi = _mm256_max_ps(value, hi);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(value, value, _CMP_UNORD_Q));
  }
  alignas(32) float lanes_lo[8], lanes_hi[8];
  _mm256_store_ps(lanes_lo, lo);
  _mm256_store_ps(lanes_hi, hi);
  for (int j = 0; j < 8; ++j) range.merge(Range{lanes_lo[j], lanes_hi[j], 0});
  range.nan |= _mm256_movemask_ps(nan) != 0;
#endif
  for (; i < n; ++i) range.merge(Range{v[i] < 0.0f ? v[i] : 0.0f, v[i] > 0.0f ? v[i] : 0.0f, v[i] != v[i]});
}

struct Params {
  float scale, zero_point, multiplier;
};

Params dynamic_params(const Range& range, const Coder& coder, bool zeropoint) {
  const float qmax = coder.qmax;
  if (!zeropoint) {
    const float absmax = range.nan ? NAN : (-range.lo > range.hi ? -range.lo : range.hi);
    return Params{absmax / qmax, 0.0f, absmax > 0.0f ? qmax / absmax : 0.0f};
  }
  const float lo = range.nan ? NAN : range.lo, hi = range.nan ? NAN : range.hi;
  const float scale = (hi - lo) / qmax;
  const float rounded = std::nearbyint(-lo / scale);
  const float zero_point = scale > 0.0f && rounded == rounded ? clamp(rounded, 0.0f, qmax) : 0.0f;
  return Params{scale, zero_point, 0.0f};
}

void store_params(const Params& params, int64_t group, float* scale, int32_t* zero_point) {
  scale[group] = params.scale;
  if (zero_point) zero_point[group] = int32_t(params.zero_point);
}

// Calls run(first, len, group, per_element) over the whole tensor in chunks of at most kChunk elements, in
// parallel: per_element false, elements [first, first + len) all belong to `group`; true (per column), element
// first + j belongs to group + j. backwards (not per column): each thread takes its chunks last first.
template <typename Run>
void for_each_chunk(int64_t outer, int64_t channels, int64_t inner, int64_t blocksize, int nthreads, Run run,
                    bool backwards = false) {
  const int64_t numel = outer * channels * inner;
  if (blocksize <= 0 && inner == 1 && channels > 1) {
    const int64_t per_row = (channels + kChunk - 1) / kChunk;
    pfp::parallel_for(outer * per_row, kChunk, nthreads, [&](int64_t begin, int64_t end, int) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t row = p / per_row, column = (p % per_row) * kChunk;
        run(row * channels + column, channels - column < kChunk ? channels - column : kChunk, column, true);
      }
    });
    return;
  }
  // Segments: whole blocks, or the [outer, channels] rows of inner elements (per tensor: one segment).
  const int64_t segment = blocksize > 0 ? blocksize : inner;
  const int64_t segments = blocksize > 0 ? (numel + blocksize - 1) / blocksize : outer * channels;
  const int64_t per_segment = (segment + kChunk - 1) / kChunk;
  pfp::parallel_for(segments * per_segment, kChunk, nthreads, [&](int64_t begin, int64_t end, int) {
    auto chunk = [&](int64_t p) {
      const int64_t s = p / per_segment, offset = (p % per_segment) * kChunk;
      const int64_t segment_end = (s + 1) * segment < numel ? (s + 1) * segment : numel;
      const int64_t first = s * segment + offset;
      if (first >= segment_end) return;  // the short last block has fewer chunks
      const int64_t len = segment_end - first < kChunk ? segment_end - first : kChunk;
      run(first, len, blocksize > 0 ? s : s % channels, false);
    };
    if (!backwards) {
      for (int64_t p = begin; p < end; ++p) chunk(p);
      return;
    }
    // runs of kBackwardsRun chunks, the last run first, each run's chunks in order: a stream the prefetchers follow
    // (one chunk at a time backwards measured slower than forwards)
    for (int64_t run_begin = begin + (end - begin - 1) / kBackwardsRun * kBackwardsRun; run_begin >= begin;
         run_begin -= kBackwardsRun)
      for (int64_t p = run_begin; p < end && p < run_begin + kBackwardsRun; ++p) chunk(p);
  });
}

// Codes of every element with per-group parameters (scale, zero_point, multiplier: fp32 [groups]).
template <typename T, typename CodeT>
void code_all(const T* x, const float* scale, const float* zero_point, const float* multiplier, CodeT* codes,
              int64_t outer, int64_t channels, int64_t inner, int64_t blocksize, const Coder& coder, int nthreads,
              bool backwards = false) {
  for_each_chunk(
      outer, channels, inner, blocksize, nthreads,
      [&](int64_t first, int64_t len, int64_t group, bool per_element) {
#if defined(__AVX512F__)
        if constexpr (kDirect<T, CodeT>) {
          if (coder.multiply && !per_element) {
            code_direct(x + first, len, scale[group], multiplier[group], coder.qmax, codes + first);
            return;
          }
        }
#endif
        alignas(64) float values[kChunk];
        load_values(x + first, values, len);
        if (per_element)
          code_values<true>(values, len, scale + group, zero_point + group, multiplier + group, coder, codes + first);
        else
          code_values<false>(values, len, scale + group, zero_point + group, multiplier + group, coder, codes + first);
      },
      backwards);
}

// Per tensor: the range of all of x (per-thread partial ranges, merged), then parallel coding.
template <typename T, typename CodeT>
void quantize_tensor(const T* x, CodeT* codes, float* scale, int32_t* zero_point, int64_t numel, const Coder& coder,
                     bool zeropoint, int nthreads) {
  std::vector<Range> partial(nthreads > 1 ? nthreads : 1);
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  pfp::parallel_for(chunks, kChunk, nthreads, [&](int64_t begin, int64_t end, int tid) {
#if defined(__AVX512F__)
    if constexpr (kDirect<T, CodeT>) {
      if (!zeropoint) {
        const int64_t first = begin * kChunk, last = end * kChunk < numel ? end * kChunk : numel;
        partial[tid] = magnitude_range(extend_magnitude(x + first, last - first, _mm512_setzero_si512()));
        return;
      }
    }
#endif
    alignas(64) float values[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t len = numel - c * kChunk < kChunk ? numel - c * kChunk : kChunk;
      load_values(x + c * kChunk, values, len);
      extend_range(values, len, partial[tid]);
    }
  });
  Range range;
  for (const Range& part : partial) range.merge(part);
  const Params params = dynamic_params(range, coder, zeropoint);
  store_params(params, 0, scale, zero_point);
  // Backwards: each thread codes the chunks whose range it took above (parallel_for splits both passes
  // alike), last chunk first, so the part of x that pass left in the last-level cache is read before it is evicted
  // (up to the cache's size of a second read that would come from DRAM). The codes do not depend on the order.
  code_all(x, &params.scale, &params.zero_point, &params.multiplier, codes, 1, 1, numel, 0, coder, nthreads, true);
}

// Groups made of `segments` runs of x: segment(g, s) gives the offset and length of run s of group g.
// Each group: its range, its parameters, its codes; one load when the group fits kGroupBuffer.
template <typename T, typename CodeT, typename Segment>
void quantize_groups(const T* x, CodeT* codes, float* scale, int32_t* zero_point, int64_t groups, int64_t segments,
                     int64_t group_size, Segment segment, const Coder& coder, bool zeropoint, int nthreads) {
#if defined(__AVX512F__)
  if constexpr (kDirect<T, CodeT>) {
    if (!zeropoint) {  // each group's range, then its codes, both read from x (the second read from cache for
                       // groups that fit it, as the per-row groups of a 4096-wide tensor do)
      pfp::parallel_for(groups, group_size, nthreads, [&](int64_t begin, int64_t end, int) {
        for (int64_t g = begin; g < end; ++g) {
          __m512i best = _mm512_setzero_si512();
          for (int64_t s = 0; s < segments; ++s) {
            const auto [offset, len] = segment(g, s);
            best = extend_magnitude(x + offset, len, best);
          }
          const Params params = dynamic_params(magnitude_range(best), coder, zeropoint);
          store_params(params, g, scale, zero_point);
          for (int64_t s = 0; s < segments; ++s) {
            const auto [offset, len] = segment(g, s);
            code_direct(x + offset, len, params.scale, params.multiplier, coder.qmax, codes + offset);
          }
        }
      });
      return;
    }
  }
#endif
  pfp::parallel_for(groups, group_size, nthreads, [&](int64_t begin, int64_t end, int) {
    const bool buffered = group_size <= kGroupBuffer;
    std::vector<float> values(buffered ? group_size : kChunk);
    for (int64_t g = begin; g < end; ++g) {
      Range range;
      int64_t loaded = 0;
      for (int64_t s = 0; s < segments; ++s) {
        const auto [offset, len] = segment(g, s);
        for (int64_t i = 0; i < len; i += kChunk) {
          const int64_t n = len - i < kChunk ? len - i : kChunk;
          float* dst = buffered ? values.data() + loaded : values.data();
          load_values(x + offset + i, dst, n);
          extend_range(dst, n, range);
          loaded += n;
        }
      }
      const Params params = dynamic_params(range, coder, zeropoint);
      store_params(params, g, scale, zero_point);
      loaded = 0;
      for (int64_t s = 0; s < segments; ++s) {
        const auto [offset, len] = segment(g, s);
        for (int64_t i = 0; i < len; i += kChunk) {
          const int64_t n = len - i < kChunk ? len - i : kChunk;
          float* src = buffered ? values.data() + loaded : values.data();
          if (!buffered) load_values(x + offset + i, src, n);
          code_values<false>(src, n, &params.scale, &params.zero_point, &params.multiplier, coder, codes + offset + i);
          loaded += n;
        }
      }
    }
  });
}

// Per column of [outer, channels] (inner == 1): each thread owns columns [begin, end), in tiles of kChunk
// columns: one pass over the rows extends the tile's ranges, a second codes it.
template <typename T, typename CodeT>
void quantize_columns(const T* x, CodeT* codes, float* scale, int32_t* zero_point, int64_t outer, int64_t channels,
                      const Coder& coder, bool zeropoint, int nthreads) {
  pfp::parallel_for(channels, outer, nthreads, [&](int64_t begin, int64_t end, int) {
    std::vector<float> values(kChunk), lo(kChunk), hi(kChunk), tile_scale(kChunk), tile_zero_point(kChunk),
        tile_multiplier(kChunk);
    std::vector<int32_t> nan(kChunk);
    for (int64_t t0 = begin; t0 < end; t0 += kChunk) {
      const int64_t width = end - t0 < kChunk ? end - t0 : kChunk;
      std::fill(lo.begin(), lo.end(), 0.0f);
      std::fill(hi.begin(), hi.end(), 0.0f);
      std::fill(nan.begin(), nan.end(), 0);
      for (int64_t row = 0; row < outer; ++row) {
        load_values(x + row * channels + t0, values.data(), width);
        for (int64_t j = 0; j < width; ++j) {
          const float v = values[j];
          lo[j] = v < lo[j] ? v : lo[j];
          hi[j] = v > hi[j] ? v : hi[j];
          nan[j] |= v != v;
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        const Params params = dynamic_params(Range{lo[j], hi[j], nan[j]}, coder, zeropoint);
        store_params(params, t0 + j, scale, zero_point);
        tile_scale[j] = params.scale;
        tile_zero_point[j] = params.zero_point;
        tile_multiplier[j] = params.multiplier;
      }
      for (int64_t row = 0; row < outer; ++row) {
        load_values(x + row * channels + t0, values.data(), width);
        code_values<true>(values.data(), width, tile_scale.data(), tile_zero_point.data(), tile_multiplier.data(),
                          coder, codes + row * channels + t0);
      }
    }
  });
}

template <typename T, typename CodeT>
void quantize_dynamic_impl(const T* x, CodeT* codes, float* scale, int32_t* zero_point, int64_t outer, int64_t channels,
                           int64_t inner, int64_t blocksize, const Coder& coder, bool zeropoint, int nthreads) {
  const int64_t numel = outer * channels * inner;
  using Segment = std::pair<int64_t, int64_t>;
  if (blocksize > 0) {
    auto block = [&](int64_t g, int64_t) {
      return Segment{g * blocksize, numel - g * blocksize < blocksize ? numel - g * blocksize : blocksize};
    };
    quantize_groups(x, codes, scale, zero_point, (numel + blocksize - 1) / blocksize, 1, blocksize, block, coder,
                    zeropoint, nthreads);
  } else if (channels == 1) {
    quantize_tensor(x, codes, scale, zero_point, numel, coder, zeropoint, nthreads);
  } else if (inner == 1) {
    quantize_columns(x, codes, scale, zero_point, outer, channels, coder, zeropoint, nthreads);
  } else {
    auto channel_run = [&](int64_t g, int64_t s) { return Segment{(s * channels + g) * inner, inner}; };
    quantize_groups(x, codes, scale, zero_point, channels, outer, outer * inner, channel_run, coder, zeropoint,
                    nthreads);
  }
}

// zero_point as fp32 [groups]; zeros where absent (absmax).
std::vector<float> zero_points_fp32(const int32_t* zero_point, int64_t groups) {
  std::vector<float> values(groups, 0.0f);
  if (zero_point)
    for (int64_t g = 0; g < groups; ++g) values[g] = float(zero_point[g]);
  return values;
}

int64_t group_count(int64_t outer, int64_t channels, int64_t inner, int64_t blocksize) {
  return blocksize > 0 ? (outer * channels * inner + blocksize - 1) / blocksize : channels;
}

// call(x as const T*, codes as int8_t* (absmax) or uint8_t* (zeropoint)) for T the type of x_dtype.
template <typename Call>
void dispatch_codes(int x_dtype, const void* x, bool zeropoint, void* codes, Call&& call) {
  auto with_codes = [&](auto* typed_x) {
    if (zeropoint)
      call(typed_x, static_cast<uint8_t*>(codes));
    else
      call(typed_x, static_cast<int8_t*>(codes));
  };
  switch (x_dtype) {
    case pfp::kFloat32: with_codes(static_cast<const float*>(x)); return;
    case pfp::kFloat16: with_codes(static_cast<const half*>(x)); return;
    case pfp::kBFloat16: with_codes(static_cast<const bf16*>(x)); return;
    case pfp::kFloat64: with_codes(static_cast<const double*>(x)); return;
  }
  throw std::invalid_argument("quantize: unsupported x dtype code");
}

}  // namespace

// quantize_affine: dynamic quantization of x, numel = outer * channels * inner elements of x_dtype (fp32, fp16,
// bf16, or fp64 rounded to fp32 first). Groups: blocks of blocksize consecutive elements when blocksize > 0
// (groups = ceil(numel / blocksize)), otherwise the channels of the [outer, channels, inner] view
// (groups = channels; per tensor: channels = 1). Writes codes [numel] (int8 in [-qmax, qmax], qmax =
// 2^(bits-1) - 1, for absmax; uint8 in [0, 2^bits - 1] for zeropoint), scale fp32 [groups] and, for zeropoint,
// zero_point int32 [groups] (null for absmax). bits is 4 or 8; all arrays contiguous.
void quantize_affine(const void* x, int x_dtype, void* codes, float* scale, int32_t* zero_point, int64_t outer,
                     int64_t channels, int64_t inner, int64_t blocksize, int bits, bool zeropoint, int nthreads) {
  const Coder coder = make_coder(bits, zeropoint, true);
  dispatch_codes(x_dtype, x, zeropoint, codes, [&](auto* typed_x, auto* typed_codes) {
    quantize_dynamic_impl(typed_x, typed_codes, scale, zero_point, outer, channels, inner, blocksize, coder, zeropoint,
                          nthreads);
  });
}

// quantize_static: codes [numel] of x with given parameters, layout and code types as quantize_affine:
// code = scale > 0 ? clamp(rint(x / scale) + zero_point, qmin, qmax) : zero_point, a NaN rint giving zero_point.
// scale fp32 [groups]; zero_point int32 [groups], or null for absmax (zero point 0).
void quantize_static(const void* x, int x_dtype, const float* scale, const int32_t* zero_point, void* codes,
                     int64_t outer, int64_t channels, int64_t inner, int64_t blocksize, int bits, bool zeropoint,
                     int nthreads) {
  const Coder coder = make_coder(bits, zeropoint, false);
  const std::vector<float> zero_points = zero_points_fp32(zero_point, group_count(outer, channels, inner, blocksize));
  dispatch_codes(x_dtype, x, zeropoint, codes, [&](auto* typed_x, auto* typed_codes) {
    // The multiplier argument is never read: static coding divides by scale.
    code_all(typed_x, scale, zero_points.data(), scale, typed_codes, outer, channels, inner, blocksize, coder,
             nthreads);
  });
}

// dequantize_affine: out [numel] of out_dtype (any of the four) = (code - zero_point) * scale in fp32, rounded once.
// codes: int8 when codes_signed, else uint8, [numel]; scale fp32 [groups]; zero_point int32 [groups] or null
// (absmax); layout as quantize_affine.
void dequantize_affine(const void* codes, bool codes_signed, const float* scale, const int32_t* zero_point, void* out,
                       int out_dtype, int64_t outer, int64_t channels, int64_t inner, int64_t blocksize, int nthreads) {
  const std::vector<float> zero_points = zero_points_fp32(zero_point, group_count(outer, channels, inner, blocksize));
  auto run = [&](auto* typed_codes, auto* typed_out) {
    for_each_chunk(
        outer, channels, inner, blocksize, nthreads, [&](int64_t first, int64_t len, int64_t group, bool per_element) {
          alignas(64) float values[kChunk];
          if (per_element)
            dequantize_values<true>(typed_codes + first, len, scale + group, zero_points.data() + group, values);
          else
            dequantize_values<false>(typed_codes + first, len, scale + group, zero_points.data() + group, values);
          store_values(values, typed_out + first, len);
        });
  };
  auto with_codes = [&](auto* typed_out) {
    if (codes_signed)
      run(static_cast<const int8_t*>(codes), typed_out);
    else
      run(static_cast<const uint8_t*>(codes), typed_out);
  };
  switch (out_dtype) {
    case pfp::kFloat32: with_codes(static_cast<float*>(out)); return;
    case pfp::kFloat16: with_codes(static_cast<half*>(out)); return;
    case pfp::kBFloat16: with_codes(static_cast<bf16*>(out)); return;
    case pfp::kFloat64: with_codes(static_cast<double*>(out)); return;
  }
  throw std::invalid_argument("dequantize_affine: unsupported out dtype code");
}

}  // namespace PFP_ISA
