// Fused linear cross-entropy on the CPU: the pass over one chunk of logit rows that sits between the
// chunk's two matmuls (logits = h W^T before it, dh = dz W and dW += dz^T h after it, both torch's;
// pyfastpeft/ops/flce.py drives the chunks). One row of V logits z, label y, smoothing eps, softcap s
// (0: none), class weights w (optional; all 1 without), gradient weight g (d reduced loss / d loss of this
// row) and z-loss gradient weight q (optional, 0 without: 2 * lse_square_scale * d reduced loss / d z-loss):
//   c_v  = s * tanh(z_v / s)                       (c = z without softcap)
//   lse  = m + log(sum_v exp(c_v - m)),  m = max_v c_v, or 0 where that max is +-inf (torch.logsumexp's
//          shift: a +inf logit gives lse +inf and a row of -inf gives -inf, not the NaN of inf - inf)
//   loss = lse - (1 - eps) * c_y - (eps / V) * sum_v c_v                      (without class weights)
//        = (1 - eps) * w_y * (lse - c_y) + (eps / V) * (W * lse - sum_v w_v c_v),  W = sum_v w_v  (with)
//          (0 where y == ignore_index; the eps term only when eps > 0; the z-loss is not in it: the caller
//          adds it from lse)
//   dz_v = (P * exp(c_v - lse) - g * (eps / V) * w_v - g * (1 - eps) * w_y * [v == y]) * (1 - (c_v / s)^2)
//   P    = g * ((1 - eps) * w_y + (eps / V) * W) + q * lse        (g + q * lse without class weights)
// (the last factor only with a softcap: d/dz s*tanh(z/s) = 1 - tanh^2). Compute in fp32 (fp64 for fp64
// logits); rows split over threads, each row in three sweeps of its (L2-resident) V values.
#include "cpu/common.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace PFP_ISA {
namespace {

// tanh(x) = 1 - 2 / (exp(2x) + 1): branch-free so it vectorizes; saturates to +-1 (exp_approx gives
// +inf above 88 and 0 below -87). Absolute error ~1e-7 near 0, which is what the logits need.
inline float tanh_c(float x) { return 1.0f - 2.0f / (pfp::exp_approx(2.0f * x) + 1.0f); }
inline double tanh_c(double x) { return std::tanh(x); }

// Max of x[0, n) in 16 interleaved lanes (vectorizes without -ffast-math, like pfp::lane_sum). NaNs
// are skipped here; they reach lse through the sum of exponentials.
template <typename C>
inline C lane_max(const C* __restrict x, int64_t n) {
  C acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = -std::numeric_limits<C>::infinity();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] = x[i + j] > acc[j] ? x[i + j] : acc[j];
  for (int j = 0; i < n; ++i, ++j) acc[j] = x[i] > acc[j] ? x[i] : acc[j];
  for (int width = 8; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] = acc[j + width] > acc[j] ? acc[j + width] : acc[j];
  return acc[0];
}

// One row in place: z becomes c (softcap applied), then, when grad_weight is given, dz. class_weight: null or
// [vocab], weight_sum its sum W; z_grad_weight: null or this row's q.
template <typename C>
inline void row_pass(C* __restrict z, int64_t label, const C* grad_weight, const C* z_grad_weight,
                     const C* __restrict class_weight, C weight_sum, C* loss, C* lse, int64_t vocab,
                     int64_t ignore_index, C smoothing, C softcap) {
  if (softcap != C(0)) {
    const C inverse = C(1) / softcap;
    for (int64_t v = 0; v < vocab; ++v) z[v] = softcap * tanh_c(z[v] * inverse);
  }
  const C row_max = lane_max(z, vocab);
  const C shift = std::isinf(row_max) ? C(0) : row_max;
  const C sum_exp = pfp::lane_sum<C>(vocab, [&](int64_t v) { return pfp::exp_approx(z[v] - shift); });
  const C row_lse = shift + std::log(sum_exp);
  *lse = row_lse;
  const bool ignored = label == ignore_index;
  const bool in_range = label >= 0 && label < vocab;
  const bool has_target = in_range && !ignored;
  const C nan = std::numeric_limits<C>::quiet_NaN();
  const C uniform = smoothing / C(vocab);
  const C label_weight = class_weight && has_target ? class_weight[label] : C(1);  // w_y (1 without weights)
  if (ignored) {
    *loss = C(0);
  } else if (!in_range) {
    *loss = nan;
  } else if (!class_weight) {
    const C sum_c = smoothing != C(0) ? pfp::lane_sum<C>(vocab, [&](int64_t v) { return z[v]; }) : C(0);
    *loss = row_lse - (C(1) - smoothing) * z[label] - uniform * sum_c;
  } else {
    C value = (C(1) - smoothing) * label_weight * (row_lse - z[label]);
    if (smoothing != C(0))
      value +=
          uniform * (weight_sum * row_lse - pfp::lane_sum<C>(vocab, [&](int64_t v) { return class_weight[v] * z[v]; }));
    *loss = value;
  }
  if (!grad_weight) return;
  const C g = ignored ? C(0) : (in_range ? *grad_weight : nan);
  const C g_uniform = g * uniform;
  const C g_target = g * (C(1) - smoothing) * label_weight;
  C p_scale = class_weight ? g * ((C(1) - smoothing) * label_weight + uniform * weight_sum) : g;
  if (z_grad_weight && !ignored) p_scale += *z_grad_weight * row_lse;
  // dz_v = (p_scale * p_v - smooth(v)) * softcap factor, smooth(v) = g * eps / V (times w_v with class weights);
  // one instantiation per form of smooth, so the unweighted sweep stays a plain vector loop
  const auto sweep = [&](auto smooth) {
    if (softcap != C(0)) {
      const C inverse = C(1) / softcap;
      const C t_target = has_target ? z[label] * inverse : C(0);
      for (int64_t v = 0; v < vocab; ++v) {
        const C t = z[v] * inverse;
        z[v] = (p_scale * pfp::exp_approx(z[v] - row_lse) - smooth(v)) * (C(1) - t * t);
      }
      if (has_target) z[label] -= g_target * (C(1) - t_target * t_target);
    } else {
      for (int64_t v = 0; v < vocab; ++v) z[v] = p_scale * pfp::exp_approx(z[v] - row_lse) - smooth(v);
      if (has_target) z[label] -= g_target;
    }
  };
  if (class_weight)
    sweep([&](int64_t v) { return g_uniform * class_weight[v]; });
  else
    sweep([&](int64_t) { return g_uniform; });
}

#if defined(__AVX512F__)
// s tanh(z / s) of 16 lanes as tanh_c computes it: 1 - 2 / (exp(2 z / s) + 1), exp16's exponential.
inline __m512 softcap16(__m512 z, __m512 softcap, __m512 inverse) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = pfp::exp16(_mm512_mul_ps(_mm512_set1_ps(2.0f), _mm512_mul_ps(z, inverse)));
  return _mm512_mul_ps(softcap, _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one))));
}

// row_pass without class weights, 16 lanes a step over the row as stored (S: fp32, or bf16 widened as it is read and
// its results rounded once as they are written back, in place). Lane j of each sweep takes elements j, j + 16, ...
// and the tail's elements go to lanes 0.., and the lanes fold as lane_max and lane_sum fold theirs. With a softcap
// (kCap) the first sweep writes c to `c_row` (the row itself for fp32 logits, a thread's fp32 row for bf16 ones, which
// take it back rounded when there is no gradient); the later sweeps read c there. With a gradient, the sweep that
// sums e_v = exp(c_v - shift) keeps them in `e` (the row itself for fp32 logits without a softcap, else a thread's
// fp32 row), and dz_v = ((P / sum_v e_v) e_v - g eps / V) (1 - (c_v / s)^2 with a softcap): one exponential an
// element where row_pass takes two. So fp32 logits and bf16 ones give the same fp32 values (the bf16 path's results
// are the fp32 path's rounded to bf16), whichever AVX-512 host runs it. The scalar loops above vectorized only in
// part and took 6.5 ms for a bf16 row pass of 255 x 32000 on Zen 4 (two threads).
template <bool kBf16Ins, bool kCap, typename S>
void row_pass16(S* z, float* c_row, float* e, int64_t label, const float* grad_weight, const float* z_grad_weight,
                float* loss, float* lse, int64_t vocab, int64_t ignore_index, float smoothing, float softcap) {
  const int64_t whole = vocab / 16 * 16;
  const __mmask16 tail = pfp::lanes16(vocab - whole);
  const __m512 cap = _mm512_set1_ps(softcap), inverse = _mm512_set1_ps(kCap ? 1.0f / softcap : 0.0f);
  // c's 16 lanes at v (all of them, or the tail's): as stored without a softcap, else from c_row
  const auto value = [&](int64_t v, __mmask16 lanes) {
    if constexpr (kCap) return _mm512_maskz_loadu_ps(lanes, c_row + v);
    return pfp::load16(z + v, lanes);
  };
  __m512 max_v = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), sum_c = _mm512_setzero_ps();
  // max_ps(v, m) is m where v is NaN: NaNs are skipped, as lane_max skips them
  for (int64_t v = 0; v < whole; v += 16) {
    __m512 c = pfp::load16(z + v);
    if constexpr (kCap) {
      c = softcap16(c, cap, inverse);
      _mm512_storeu_ps(c_row + v, c);
    }
    max_v = _mm512_max_ps(c, max_v);
    sum_c = _mm512_add_ps(sum_c, c);
  }
  if (tail) {
    __m512 c = pfp::load16(z + whole, tail);
    if constexpr (kCap) {
      c = softcap16(c, cap, inverse);
      _mm512_mask_storeu_ps(c_row + whole, tail, c);
    }
    max_v = _mm512_mask_max_ps(max_v, tail, c, max_v);
    sum_c = _mm512_mask_add_ps(sum_c, tail, sum_c, c);
  }
  const float row_max = _mm512_reduce_max_ps(max_v);
  const __m512 shift = _mm512_set1_ps(std::isinf(row_max) ? 0.0f : row_max);
  const bool ignored = label == ignore_index;
  const bool in_range = label >= 0 && label < vocab;
  float c_label = 0.0f;  // before e may overwrite it
  if (in_range) c_label = kCap ? c_row[label] : pfp::to_compute<float>(z[label]);
  __m512 sum_exp = _mm512_setzero_ps();
  for (int64_t v = 0; v < whole; v += 16) {
    const __m512 ev = pfp::exp16(_mm512_sub_ps(value(v, __mmask16(0xFFFF)), shift));
    if (grad_weight) _mm512_storeu_ps(e + v, ev);
    sum_exp = _mm512_add_ps(sum_exp, ev);
  }
  if (tail) {
    const __m512 ev = pfp::exp16(_mm512_sub_ps(value(whole, tail), shift));
    if (grad_weight) _mm512_mask_storeu_ps(e + whole, tail, ev);
    sum_exp = _mm512_mask_add_ps(sum_exp, tail, sum_exp, ev);
  }
  const float total = _mm512_reduce_add_ps(sum_exp);
  const float row_lse = _mm512_cvtss_f32(shift) + std::log(total);
  *lse = row_lse;
  const float uniform = smoothing / float(vocab);
  if (ignored)
    *loss = 0.0f;
  else if (!in_range)
    *loss = std::numeric_limits<float>::quiet_NaN();
  else
    *loss = row_lse - (1.0f - smoothing) * c_label - uniform * (smoothing != 0.0f ? _mm512_reduce_add_ps(sum_c) : 0.0f);
  if (!grad_weight) {
    if constexpr (kCap && !std::is_same_v<S, float>) {  // the logits end as c
      for (int64_t v = 0; v < whole; v += 16) pfp::store16_if<kBf16Ins>(z + v, _mm512_loadu_ps(c_row + v));
      if (tail) pfp::store16_if<kBf16Ins>(z + whole, tail, _mm512_maskz_loadu_ps(tail, c_row + whole));
    }
    return;
  }
  const float g = ignored ? 0.0f : (in_range ? *grad_weight : std::numeric_limits<float>::quiet_NaN());
  float p_scale = g;
  if (z_grad_weight && !ignored) p_scale += *z_grad_weight * row_lse;
  const float g_uniform = g * uniform, g_target = g * (1.0f - smoothing);
  // P exp(c_v - lse) = (P / sum) e_v, with the same NaNs where the sum is 0 (a row of -inf: every dz) or inf (a +inf
  // logit: its own dz; the others' P / sum is 0, as their exp(c_v - lse))
  const __m512 p = _mm512_set1_ps(p_scale / total), smooth = _mm512_set1_ps(g_uniform), one = _mm512_set1_ps(1.0f);
  const bool target = in_range && !ignored;
  const float e_label = target ? e[label] : 0.0f;  // before the sweep overwrites it (fp32 in place)
  // dz's 16 lanes at v, and 1 - (c / s)^2 with a softcap
  const auto dz = [&](int64_t v, __mmask16 lanes) {
    const __m512 d = _mm512_fmsub_ps(p, _mm512_maskz_loadu_ps(lanes, e + v), smooth);
    if constexpr (!kCap) return d;
    const __m512 t = _mm512_mul_ps(value(v, lanes), inverse);
    return _mm512_mul_ps(d, _mm512_fnmadd_ps(t, t, one));
  };
  for (int64_t v = 0; v < whole; v += 16) pfp::store16_if<kBf16Ins>(z + v, dz(v, __mmask16(0xFFFF)));
  if (tail) pfp::store16_if<kBf16Ins>(z + whole, tail, dz(whole, tail));
  if (target) {  // the target's dz with its term, from the same e and c, rounded once
    const __m512 d = _mm512_fmsub_ps(p, _mm512_set1_ps(e_label), smooth);
    float value_y = _mm512_cvtss_f32(d) - g_target;
    if constexpr (kCap) {
      const float t = c_label * (1.0f / softcap), factor = 1.0f - t * t;
      value_y = _mm512_cvtss_f32(d) * factor - g_target * factor;
    }
    pfp::store16_if<kBf16Ins>(z + label, __mmask16(1), _mm512_set1_ps(value_y));
  }
}

// rows [begin, end). c: the row itself for fp32 logits, a thread's fp32 row for bf16 ones; e: the row itself for
// fp32 logits without a softcap, else a thread's fp32 row.
template <bool kBf16Ins, bool kCap, typename S>
void rows16(S* logits, const int64_t* labels, const float* grad_weight, const float* z_grad_weight, float* loss,
            float* lse, int64_t begin, int64_t end, int64_t vocab, int64_t ignore_index, float smoothing,
            float softcap) {
  constexpr bool fp32 = std::is_same_v<S, float>;
  std::vector<float> own_c(kCap && !fp32 ? size_t(vocab) : 0);
  std::vector<float> own_e(grad_weight && (kCap || !fp32) ? size_t(vocab) : 0);
  for (int64_t row = begin; row < end; ++row) {
    S* z = logits + row * vocab;
    float* row_fp32 = nullptr;
    if constexpr (fp32) row_fp32 = z;
    float* c = fp32 ? row_fp32 : own_c.data();
    float* e = fp32 && !kCap ? row_fp32 : own_e.data();
    row_pass16<kBf16Ins, kCap>(z, c, e, labels[row], grad_weight ? grad_weight + row : nullptr,
                               grad_weight && z_grad_weight ? z_grad_weight + row : nullptr, loss + row, lse + row,
                               vocab, ignore_index, smoothing, softcap);
  }
}
template <bool kBf16Ins, typename S>
void rows16_any(S* logits, const int64_t* labels, const float* grad_weight, const float* z_grad_weight, float* loss,
                float* lse, int64_t begin, int64_t end, int64_t vocab, int64_t ignore_index, float smoothing,
                float softcap) {
  if (softcap != 0.0f)
    rows16<kBf16Ins, true>(logits, labels, grad_weight, z_grad_weight, loss, lse, begin, end, vocab, ignore_index,
                           smoothing, softcap);
  else
    rows16<kBf16Ins, false>(logits, labels, grad_weight, z_grad_weight, loss, lse, begin, end, vocab, ignore_index,
                            smoothing, softcap);
}
// bf16 rows with AVX512-BF16 stores (the same bits as the integer rounding; flatten inlines them under this target)
__attribute__((target("avx512bf16"), flatten)) void rows16_bf16ins(pfp::bf16* logits, const int64_t* labels,
                                                                   const float* grad_weight, const float* z_grad_weight,
                                                                   float* loss, float* lse, int64_t begin, int64_t end,
                                                                   int64_t vocab, int64_t ignore_index, float smoothing,
                                                                   float softcap) {
  rows16_any<true>(logits, labels, grad_weight, z_grad_weight, loss, lse, begin, end, vocab, ignore_index, smoothing,
                   softcap);
}
#endif

// Rows of logits stored as S, everything else and the pass in C: in place where S is C; otherwise (bf16 logits,
// fp32 C) each row is widened into a thread's C row (L2-resident), passed, and stored back rounded to S once (dz in
// the dtype the next matmuls take).
template <typename S, typename C>
void rows_impl(S* logits, const int64_t* labels, const C* grad_weight, const C* z_grad_weight, const C* class_weight,
               C* loss, C* lse, int64_t rows, int64_t vocab, int64_t ignore_index, double label_smoothing,
               double softcap, int nthreads) {
  constexpr bool in_place = std::is_same<S, C>::value;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<C, float>) {
    if (!class_weight) {
      const bool bf16ins = std::is_same_v<S, pfp::bf16> && pfp::avx512_bf16_in_use();
      pfp::parallel_for(rows, 4 * vocab, nthreads, [&](int64_t begin, int64_t end, int) {
        if constexpr (std::is_same_v<S, pfp::bf16>) {
          if (bf16ins)
            return rows16_bf16ins(logits, labels, grad_weight, z_grad_weight, loss, lse, begin, end, vocab,
                                  ignore_index, float(label_smoothing), float(softcap));
        }
        rows16_any<false>(logits, labels, grad_weight, z_grad_weight, loss, lse, begin, end, vocab, ignore_index,
                          float(label_smoothing), float(softcap));
      });
      return;
    }
  }
#endif
  const C weight_sum = class_weight ? pfp::lane_sum<C>(vocab, [&](int64_t v) { return class_weight[v]; }) : C(vocab);
  pfp::parallel_for(rows, 4 * vocab, nthreads, [&](int64_t begin, int64_t end, int) {
    std::vector<C> widened(in_place ? 0 : vocab);
    for (int64_t row = begin; row < end; ++row) {
      S* stored = logits + row * vocab;
      C* z;
      if constexpr (in_place) {
        z = stored;
      } else {
        pfp::load_row(stored, widened.data(), vocab);
        z = widened.data();
      }
      row_pass<C>(z, labels[row], grad_weight ? grad_weight + row : nullptr,
                  grad_weight && z_grad_weight ? z_grad_weight + row : nullptr, class_weight, weight_sum, loss + row,
                  lse + row, vocab, ignore_index, C(label_smoothing), C(softcap));
      if constexpr (!in_place) pfp::store_row(z, stored, vocab);
    }
  });
}

}  // namespace

// flce_rows: the row pass above over logits [rows, vocab] (row-major, contiguous), in place.
// dtype (pfp::DType): kFloat32, or kFloat64 for fp64 inputs; grad_weight, z_grad_weight, class_weight, loss, lse
// all of it. logits_dtype: dtype (the row pass in place), or kBFloat16 with dtype kFloat32 (each row
// computed in fp32 and stored back rounded once). labels: int64 [rows]; a label outside [0, vocab) other than
// ignore_index gives that row a NaN loss and gradient (nothing is read out of bounds). loss, lse: [rows], written
// (loss 0 on ignored rows). grad_weight: null (logits end as the softcapped c) or [rows]: logits end as dz, zero on
// ignored rows. z_grad_weight: null (no z-loss) or [rows], read only with grad_weight. class_weight: null or
// [vocab]. label_smoothing in [0, 1); softcap > 0, or 0 for none; vocab >= 1.
void flce_rows(void* logits, const int64_t* labels, const void* grad_weight, const void* z_grad_weight,
               const void* class_weight, void* loss, void* lse, int64_t rows, int64_t vocab, int dtype,
               int logits_dtype, int64_t ignore_index, double label_smoothing, double softcap, int nthreads) {
  if (logits_dtype != dtype) {
    if (dtype != pfp::kFloat32 || logits_dtype != pfp::kBFloat16) {
      throw std::invalid_argument("flce: bf16 logits go with fp32 statistics, got logits dtype code " +
                                  std::to_string(logits_dtype) + " and dtype code " + std::to_string(dtype));
    }
    return rows_impl(static_cast<pfp::bf16*>(logits), labels, static_cast<const float*>(grad_weight),
                     static_cast<const float*>(z_grad_weight), static_cast<const float*>(class_weight),
                     static_cast<float*>(loss), static_cast<float*>(lse), rows, vocab, ignore_index, label_smoothing,
                     softcap, nthreads);
  }
  switch (dtype) {
    case pfp::kFloat32:
      return rows_impl(static_cast<float*>(logits), labels, static_cast<const float*>(grad_weight),
                       static_cast<const float*>(z_grad_weight), static_cast<const float*>(class_weight),
                       static_cast<float*>(loss), static_cast<float*>(lse), rows, vocab, ignore_index, label_smoothing,
                       softcap, nthreads);
    case pfp::kFloat64:
      return rows_impl(static_cast<double*>(logits), labels, static_cast<const double*>(grad_weight),
                       static_cast<const double*>(z_grad_weight), static_cast<const double*>(class_weight),
                       static_cast<double*>(loss), static_cast<double*>(lse), rows, vocab, ignore_index,
                       label_smoothing, softcap, nthreads);
  }
  throw std::invalid_argument("flce: unsupported logits dtype code " + std::to_string(dtype));
}

}  // namespace PFP_ISA
