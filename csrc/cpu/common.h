// Shared pieces of the CPU kernels: dtype codes, scalar conversions, row load/store into a
// compute buffer, the thread split, and (AVX-512 builds) 16-lane loads and stores of every storage type,
// lane masks and the int8 code store. Torch-free: kernels see raw pointers and sizes only.
//
// Every kernel source is compiled three times (see CMakeLists.txt) with PFP_ISA naming the
// namespace (pfp_avx512, pfp_avx2, pfp_scalar) and the matching -m flags, so the plain loops
// below are auto-vectorized for each instruction set; fp16 conversion uses F16C intrinsics where
// the build has them.
#pragma once

#include <omp.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "native_types.h"

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pfp {

struct bf16 {
  uint16_t bits;
};
struct half {
  uint16_t bits;
};

// dispatch_dtype over the CPU kernels' storage types (csrc/native_types.h).
template <typename Body>
void dispatch_float(int dtype, const char* what, Body&& body) {
  dispatch_dtype<half, bf16>(dtype, what, static_cast<Body&&>(body));
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(bf16 v) { return bits_to_float(uint32_t(v.bits) << 16); }

// Round to nearest even, NaN kept quiet (same as torch's c10::BFloat16 conversion).
inline bf16 to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = ((u >> 16) | 0x40u);
  bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return bf16{uint16_t(is_nan ? nan : rounded)};
}

// IEEE half <-> float, branch-free so the loops vectorize even without F16C.
inline float to_float(half v) {
  uint32_t h = v.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t em = h & 0x7FFFu;
  // normal/subnormal: shift exponent+mantissa into place and rescale by 2^112 (handles subnormals
  // exactly because the product is exact); inf/NaN: force the float exponent to all ones.
  float magnitude = bits_to_float(em << 13) * bits_to_float(0x77800000u);  // 2^112
  uint32_t mag_bits = float_to_bits(magnitude);
  mag_bits = em >= 0x7C00u ? (mag_bits | 0x7F800000u) : mag_bits;
  return bits_to_float(sign | mag_bits);
}

inline half to_half(float f) {
#if defined(__F16C__)
  return half{uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT))};
#else
  // Round to nearest even (Giesen's float_to_half_fast3_rtne).
  uint32_t u = float_to_bits(f);
  uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= 0x47800000u) {  // overflow to inf, or NaN
    out = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (u < 0x38800000u) {                                    // subnormal or zero half
    float denorm = bits_to_float(u) + bits_to_float(0x3F000000u);  // + 0.5
    out = uint16_t(float_to_bits(denorm) - 0x3F000000u);
  } else {
    uint32_t mant_odd = (u >> 13) & 1u;
    u += 0xC8000FFFu + mant_odd;  // rebias exponent (-112 << 23) and round
    out = uint16_t(u >> 13);
  }
  return half{uint16_t(out | (sign >> 16))};
#endif
}

template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

template <typename C>
inline C to_compute(float v) {
  return C(v);
}
template <typename C>
inline C to_compute(double v) {
  return C(v);
}
template <typename C>
inline C to_compute(bf16 v) {
  return C(to_float(v));
}
template <typename C>
inline C to_compute(half v) {
  return C(to_float(v));
}

template <typename T>
inline T from_compute(float v);
template <>
inline float from_compute<float>(float v) {
  return v;
}
template <>
inline bf16 from_compute<bf16>(float v) {
  return to_bf16(v);
}
template <>
inline half from_compute<half>(float v) {
  return to_half(v);
}
template <typename T>
inline T from_compute(double v);
template <>
inline double from_compute<double>(double v) {
  return v;
}

// The value v takes once stored as T (rounding emulation for the "none" RMSNorm mode and the
// llama mode's cast of the normalized row).
template <typename T, typename C>
inline C round_to(C v) {
  return to_compute<C>(from_compute<T>(v));
}

// Convert n elements into a compute-type buffer, and back. fp16 uses F16C where the build has it.
template <typename T, typename C>
inline void load_row(const T* __restrict src, C* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_compute<C>(src[i]);
}
template <typename T, typename C>
inline void store_row(const C* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_compute<T>(src[i]);
}

#if defined(__F16C__)
template <>
inline void load_row<half, float>(const half* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].bits);
}
template <>
inline void store_row<half, float>(const float* __restrict src, half* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = half{uint16_t(_cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT))};
}
#endif

#if defined(__AVX512F__)
// 16 lanes of fp32 from the storage type (masked lanes read as 0, nothing read past them), and back. bf16 is
// stored like to_bf16 (nearest even, NaN kept quiet); fp16 loads through F16C (exact).
inline __m512 load16(const float* src, __mmask16 valid) { return _mm512_maskz_loadu_ps(valid, src); }
inline __m512 load16(const bf16* src, __mmask16 valid) {
  const __m256i raw = _mm256_maskz_loadu_epi16(valid, src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const half* src, __mmask16 valid) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, src)); }
inline void store16(float* dst, __mmask16 valid, __m512 v) { _mm512_mask_storeu_ps(dst, valid, v); }
// 16 fp32 lanes rounded to bf16 as to_bf16 rounds (nearest even, NaN kept quiet), the bf16 bits in the high half
// of each lane and zeros below: read as fp32, the value stored and read back. Seven operations: a NaN lane takes
// u | 0x400000 before the mask, where the rounding add could carry into the exponent.
inline __m512i bf16_high16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i picked = _mm512_mask_or_epi32(sum, nan, u, _mm512_set1_epi32(0x400000));
  return _mm512_and_si512(picked, _mm512_set1_epi32(int(0xFFFF0000u)));
}
// The 16 bf16 of v, rounded as bf16_high16 rounds, in lane order.
inline __m256i pack16(__m512 v) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high16(v), 16)); }
inline void store16(bf16* dst, __mmask16 valid, __m512 v) { _mm256_mask_storeu_epi16(dst, valid, pack16(v)); }
inline void store16(half* dst, __mmask16 valid, __m512 v) {
  _mm256_mask_storeu_epi16(dst, valid, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// All 16 lanes, unmasked: for loops that take whole vectors plainly and leave one masked tail.
inline __m512 load16(const float* src) { return _mm512_loadu_ps(src); }
inline __m512 load16(const bf16* src) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const half* src) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}
inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
inline void store16(bf16* dst, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), pack16(v)); }
inline void store16(half* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// 32 consecutive elements as two vectors of 16 fp32 lanes in an order of their own (put32_if stores them back): for
// elementwise kernels, whose inputs and outputs all take the same order. bf16 widens by interleaving zeros below each
// value (vpunpck{l,h}wd: lo holds elements 0-3, 8-11, 16-19, 24-27, hi the rest) and narrows by vpackusdw, which puts
// them back in place: one operation a vector each way, against two and three for load16/store16 (Zen 4 splits the
// lane-crossing vpmovzxwd and vpmovdw). fp32 and fp16: lo is elements 0-15, hi 16-31.
inline void load32(const float* src, __m512& lo, __m512& hi) {
  lo = _mm512_loadu_ps(src);
  hi = _mm512_loadu_ps(src + 16);
}
inline void load32(const half* src, __m512& lo, __m512& hi) {
  lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16)));
}
inline void load32(const bf16* src, __m512& lo, __m512& hi) {
  const __m512i raw = _mm512_loadu_si512(src), zero = _mm512_setzero_si512();
  lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw));
  hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw));
}
// The 32 bf16 of lo, hi (load32's lane order) in element order, rounded as bf16_high16 rounds.
inline __m512i pack32(__m512 lo, __m512 hi) {
  return _mm512_packus_epi32(_mm512_srli_epi32(bf16_high16(lo), 16), _mm512_srli_epi32(bf16_high16(hi), 16));
}

// pack32 in one vcvtne2ps2bf16 (nearest even, NaN kept quiet, as pack32) and one vpermq that puts the 4-element
// groups of load32's order back in place. For callers with this target that checked pfp::avx512_bf16_in_use(). The
// instruction reads a subnormal as zero: a pair that holds one (rare) takes pack32.
constexpr int kSubnormal = 0x20;  // vfpclassps: denormal, either sign
__attribute__((target("avx512bf16"))) inline __m512i pack32_bf16ins(__m512 lo, __m512 hi) {
  if ((_mm512_fpclass_ps_mask(lo, kSubnormal) | _mm512_fpclass_ps_mask(hi, kSubnormal)) != 0) return pack32(lo, hi);
  // words 0-15: lo's lanes, 16-31: hi's; as 4-word groups: lo holds elements 0-3, 8-11, ..., hi 4-7, 12-15, ...
  const __m512i packed = _mm512_castps_si512(reinterpret_cast<__m512>(_mm512_cvtne2ps_pbh(hi, lo)));
  return _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7), packed);
}

// store16, pack16 (one vector, or two in element order) and round16<bf16> by vcvtneps2bf16 / vcvtne2ps2bf16, under
// the same contract as pack32_bf16ins; a vector that holds a subnormal takes the integer rounding.
__attribute__((target("avx512bf16"))) inline void store16_bf16ins(bf16* dst, __mmask16 valid, __m512 v) {
  if (_mm512_fpclass_ps_mask(v, kSubnormal) != 0) return store16(dst, valid, v);
  _mm256_mask_storeu_epi16(dst, valid, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
__attribute__((target("avx512bf16"))) inline __m256i pack16_bf16ins(__m512 v) {
  if (_mm512_fpclass_ps_mask(v, kSubnormal) != 0) return pack16(v);
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}
__attribute__((target("avx512bf16"))) inline __m512i pack16x2_bf16ins(__m512 first, __m512 second) {
  if ((_mm512_fpclass_ps_mask(first, kSubnormal) | _mm512_fpclass_ps_mask(second, kSubnormal)) != 0)
    return _mm512_inserti64x4(_mm512_castsi256_si512(pack16(first)), pack16(second), 1);
  return _mm512_castps_si512(reinterpret_cast<__m512>(_mm512_cvtne2ps_pbh(second, first)));  // words 0-15: first's
}
__attribute__((target("avx512bf16"))) inline void store16_bf16ins(bf16* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), pack16_bf16ins(v));
}
__attribute__((target("avx512bf16"))) inline __m512 round16_bf16ins(__m512 v) {
  if (_mm512_fpclass_ps_mask(v, kSubnormal) != 0) return _mm512_castsi512_ps(bf16_high16(v));
  const __m256i bits = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// store16 and round16 of T by the AVX512-BF16 instructions where kBf16Ins and T is bf16 (the caller is
// a function with that target, run only where pfp::avx512_bf16_in_use()), else by the integer rounding: the same
// bits either way. Kernels template their rows on kBf16Ins and call these (on Zen 4 the integer rounding's seven
// operations a vector held the bf16 rows of RMSNorm and SwiGLU to about half the copy rate). always_inline: under
// the callers' flatten alone GCC left some RMSNorm stores as calls, one per 16 elements.
template <bool kBf16Ins, typename T>
__attribute__((always_inline)) inline void store16_if(T* dst, __mmask16 valid, __m512 v) {
  if constexpr (kBf16Ins && std::is_same_v<T, bf16>)
    store16_bf16ins(dst, valid, v);
  else
    store16(dst, valid, v);
}
template <bool kBf16Ins, typename T>
__attribute__((always_inline)) inline void store16_if(T* dst, __m512 v) {
  if constexpr (kBf16Ins && std::is_same_v<T, bf16>)
    store16_bf16ins(dst, v);
  else
    store16(dst, v);
}

// ---- streaming stores ----------------------------------------------------------------------------------------
// A plain store first reads its line into the cache (read for ownership): a pass that reads one tensor and writes
// one moves three bytes for every two it counts. A streaming store writes whole lines without reading them, past
// the caches, so it pays only for an output the next operation would not find in cache anyway: from kStreamBytes of
// output a call (the last-level cache here is 32 MiB). The put*_if stores take it where `stream` and dst is aligned
// to the store's width, the plain store elsewhere (the same bits either way); a thread that streamed calls
// stream_fence() (sfence) before its results may be read by another. RMSNorm 4096 x 4096 on Zen 4, two threads,
// streaming and plain stores alternating in one process: the forward took 0.63-0.75x the time, fp32's backward
// 0.84-0.86x, bf16's the same (its dx in 64-byte stores, put16x2_if).
constexpr int64_t kStreamBytes = int64_t(16) << 20;
inline bool streams(int64_t output_bytes) { return output_bytes >= kStreamBytes; }
inline void stream_fence() { _mm_sfence(); }
inline bool aligned_to(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0; }

// 16 lanes of v into dst[0, 16), rounded as store16_if rounds: fp32 streamed where `stream` allows, bf16 and fp16
// always plainly, since 32 bytes are half a line: a bf16 RMSNorm backward whose dx went out by 32-byte streaming
// stores left half-written lines behind and took 1.18x the time (whole lines of bf16: put16x2_if, put32_if).
template <bool kBf16Ins, typename T>
__attribute__((always_inline)) inline void put16_if(T* dst, __m512 v, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (stream && aligned_to(dst, 64)) return _mm512_stream_ps(dst, v);
  }
  store16_if<kBf16Ins>(dst, v);
}
// The `valid` lanes: all of them as put16_if, fewer by a masked plain store (a row's tail).
template <bool kBf16Ins, typename T>
__attribute__((always_inline)) inline void put16_if(T* dst, __mmask16 valid, __m512 v, bool stream) {
  if (valid == __mmask16(0xFFFF)) return put16_if<kBf16Ins>(dst, v, stream);
  store16_if<kBf16Ins>(dst, valid, v);
}
// 64 bytes of packed bits into dst, streamed where `stream` allows and dst is aligned, plainly elsewhere.
inline void put_line(void* dst, __m512i packed, bool stream) {
  if (stream && aligned_to(dst, 64)) return _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), packed);
  _mm512_storeu_si512(dst, packed);
}
// 32 elements from two vectors in element order (first: elements 0-15) into dst[0, 32): bf16 in one 64-byte store,
// a whole line, streamed where `stream` allows; fp32 and fp16 as two put16_if.
template <bool kBf16Ins, typename T>
__attribute__((always_inline)) inline void put16x2_if(T* dst, __m512 first, __m512 second, bool stream) {
  if constexpr (std::is_same_v<T, bf16>) {
    __m512i packed;
    if constexpr (kBf16Ins)
      packed = pack16x2_bf16ins(first, second);
    else
      packed = _mm512_inserti64x4(_mm512_castsi256_si512(pack16(first)), pack16(second), 1);
    put_line(dst, packed, stream);
  } else {
    put16_if<kBf16Ins>(dst, first, stream);
    put16_if<kBf16Ins>(dst + 16, second, stream);
  }
}
// 32 elements from lo, hi in load32's lane order into dst[0, 32), as put16x2_if stores them.
template <bool kBf16Ins, typename T>
__attribute__((always_inline)) inline void put32_if(T* dst, __m512 lo, __m512 hi, bool stream) {
  if constexpr (std::is_same_v<T, bf16>) {
    __m512i packed;
    if constexpr (kBf16Ins)
      packed = pack32_bf16ins(lo, hi);
    else
      packed = pack32(lo, hi);
    put_line(dst, packed, stream);
  } else {
    put16x2_if<kBf16Ins>(dst, lo, hi, stream);  // load32's order is element order for fp32 and fp16
  }
}

// round_to<T> of 16 lanes in registers: v as it reads back once stored as T (float: v itself).
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return _mm512_castsi512_ps(bf16_high16(v));
  } else if constexpr (std::is_same_v<T, half>) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    static_assert(std::is_same_v<T, float>, "round16: float, bf16 or half");
    return v;
  }
}
template <bool kBf16Ins, typename T>
__attribute__((always_inline)) inline __m512 round16_if(__m512 v) {
  if constexpr (kBf16Ins && std::is_same_v<T, bf16>)
    return round16_bf16ins(v);
  else
    return round16<T>(v);
}

// The lanes of the first n of 16, and of 64: none for n <= 0, all for n past the width.
inline __mmask16 lanes16(int64_t n) {
  return n <= 0 ? __mmask16(0) : n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}
inline __mmask64 lanes64(int64_t n) {
  return n <= 0 ? __mmask64(0) : n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1u;
}

// max |v| as the bits of |v| (the sign cleared): for those, unsigned integer order is the float order with
// every NaN above +inf, so one integer max both finds the largest magnitude and keeps a NaN.
inline __m512i magnitude_bits(__m512 v) {
  return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
}
inline float magnitude_max(__m512i best_bits) {  // NaN if any lane held one
  const uint32_t top = _mm512_reduce_max_epu32(best_bits);
  return top > 0x7F800000u ? bits_to_float(0x7FC00000u) : bits_to_float(top);
}

// The same order for bf16 without widening: 32 lanes of 16-bit magnitudes (bf16 bits, sign cleared; every NaN
// above +inf = 0x7F80), loaded n < 32 at the end (lanes past n read as 0).
inline __mmask32 lanes32(int64_t n) {
  return n <= 0 ? __mmask32(0) : n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1u);
}
inline __m512i magnitude_bits32(const bf16* src, __mmask32 valid) {
  return _mm512_and_si512(_mm512_maskz_loadu_epi16(valid, src), _mm512_set1_epi16(0x7FFF));
}
// best (fp32 magnitude bits, as magnitude_bits gives them) extended by 16-bit bf16 magnitudes: a bf16 widens to
// the fp32 bits b << 16, which keeps the order.
inline __m512i widen_magnitudes(__m512i best, __m512i best16) {
  const __m512i low = _mm512_and_si512(best16, _mm512_set1_epi32(0xFFFF)), high = _mm512_srli_epi32(best16, 16);
  return _mm512_max_epu32(best, _mm512_slli_epi32(_mm512_max_epu32(low, high), 16));
}
// For t > 0: the least bf16 magnitude bits whose value is >= t, so that for a bf16 x that is not NaN,
// |x| >= t <=> its 16-bit magnitude >= the result (positive floats order as their bits; +inf when t passes the
// largest finite bf16).
inline uint16_t bf16_magnitude_at_least(float t) {
  const uint32_t u = float_to_bits(t);
  uint32_t b = u >> 16;
  if ((b << 16) < u) ++b;
  return uint16_t(b > 0x7F80u ? 0x7F80u : b);
}

// Stores the valid bytes of 64 int8 codes: elements 0-15 in a, 16-31 in b, 32-47 in c, 48-63 in d, as int32
// lanes saturated to [-128, 127]. Two saturating packs and one permute, then one 64-byte store: a masked
// vpmovdb store per 16 codes is several times slower on Zen 4.
inline void store_codes64(int8_t* dst, __mmask64 valid, __m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i bytes = _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
  // Each 128-bit lane L of the byte pack holds elements 4L..4L+3 of a, b, c and d, one dword each.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_mask_storeu_epi8(dst, valid, _mm512_permutexvar_epi32(order, bytes));
}

// dst[i] = code16(src[i]) as int8 for i in [0, n), 64 at a time: code16 maps 16 lanes of src, widened to fp32
// (lanes past n read as 0 and are not stored), to int32 codes, saturated to [-128, 127] by store_codes64.
template <typename T, typename Code16>
inline void store_codes(const T* src, int64_t n, int8_t* dst, Code16&& code16) {
  for (int64_t i = 0; i < n; i += 64) {
    __m512i v[4];
    for (int j = 0; j < 4; ++j) v[j] = code16(load16(src + i + 16 * j, lanes16(n - i - 16 * j)));
    store_codes64(dst + i, lanes64(n - i), v[0], v[1], v[2], v[3]);
  }
}
#endif

// Sum of term(i) over [0, n) in 16 interleaved partial sums (lane j takes the i with i % 16 == j),
// folded pairwise at the end. Vectorizes without -ffast-math (an `omp simd` reduction does not
// reliably), and adds in the same order on every instruction set.
template <typename C, typename F>
inline C lane_sum(int64_t n, F&& term) {
  C acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += term(i + j);
  for (int j = 0; i < n; ++i, ++j) acc[j] += term(i);
  for (int width = 8; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  return acc[0];
}

// Static split of [0, total) over the calling OpenMP team: thread `tid` of `nt` gets [begin, end).
inline void split_range(int64_t total, int tid, int nt, int64_t& begin, int64_t& end) {
  int64_t chunk = total / nt, rest = total % nt;
  begin = tid * chunk + (tid < rest ? tid : rest);
  end = begin + chunk + (tid < rest ? 1 : 0);
}

// Run body(begin, end, tid) over [0, total) on up to nthreads threads; serial when the work is small
// (grain = elements of work below which threads cost more than they save).
template <typename F>
inline void parallel_for(int64_t total, int64_t work_per_item, int nthreads, F body) {
  const int64_t grain = 1 << 15;
  int64_t max_useful = (total * work_per_item) / grain + 1;
  int nt = int(nthreads < 1 ? 1 : (max_useful < nthreads ? max_useful : nthreads));
  if (nt > total) nt = int(total > 0 ? total : 1);
  if (nt <= 1) {
    body(int64_t(0), total, 0);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int tid = omp_get_thread_num(), team = omp_get_num_threads();
    int64_t begin, end;
    split_range(total, tid, team, begin, end);
    body(begin, end, tid);
  }
}

// exp for float compute, branch-free so it vectorizes (std::exp does not without -ffast-math):
// exp(x) = 2^n * p(r), n = round(x / ln2), r = x - n ln2 (two-part ln2, |r| <= ln2/2), p the
// Cephes degree-7 polynomial (relative error ~2 ulp). Results below 2^-126 flush to 0 and
// x > 88 gives +inf: the callers (sigmoid) saturate long before either matters. NaN gives NaN; the clamp
// maps it to hi first (each comparison is false for NaN: one minps and one maxps, as before), so the
// float-to-int conversion below never sees a NaN.
inline float exp_approx(float x) {
  const float hi = 88.0f, lo = -87.0f;
  float xc = x < hi ? x : hi;
  xc = xc > lo ? xc : lo;
  float n = xc * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest integer
  float r = xc - n * 0.693359375f;      // ln2 split hi/lo for an exact reduction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = int32_t(n) + 127;
  float scale = bits_to_float(uint32_t(e) << 23);
  float result = p * scale;
  result = x > hi ? INFINITY : result;
  result = x < lo ? 0.0f : result;
  return x != x ? x : result;
}
inline double exp_approx(double x) { return std::exp(x); }

#if defined(__AVX512F__)
// exp_approx of 16 lanes, with the same reduction and polynomial, 2^n applied by vscalefps: results past fp32's
// range are +inf, below it the nearest subnormal or 0, with no compare or blend. x is clamped to [-104, 104] first
// (beyond it exp is inf or 0 in fp32 already) so that r stays small; max/min keep a NaN (their second operand), and
// a NaN gives NaN.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(104.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace pfp
