// Fused linear distillation on the CPU: the pass over one chunk of student and teacher logit rows that sits
// between the chunk's matmuls (zs = h W^T, zt = g U^T before it; dh = dzs W and dW += dzs^T h after it, all
// torch's; pyfastpeft/ops/distill.py drives the chunks). One row of V student logits zs, teacher logits zt,
// label y, temperature tau, beta, hard-label weight a, gradient weight g (the math in
// pyfastpeft/reference/distill.py):
//   log p_v = zs_v / tau - lse(zs / tau),  log q_v = zt_v / tau - lse(zt / tau)
//   beta 0:     kd = sum_v q_v (log q_v - log p_v)                           dkd_v = p_v - q_v
//   beta 1:     r_v = log p_v - log q_v,  K = sum_v p_v r_v,  kd = K         dkd_v = p_v (r_v - K)
//   otherwise:  log m_v = logaddexp(log(1 - beta) + log p_v, log(beta) + log q_v),  r_v = log p_v - log m_v,
//               K = sum_v p_v r_v,  kd = (1 - beta) K + beta sum_v q_v (log q_v - log m_v)
//                                                                            dkd_v = (1 - beta) p_v (r_v - K)
//   ce = lse(zs) - zs_y (only when a > 0)
//   loss = a ce + (1 - a) kd, 0 where y == ignore_index
//   dzs_v = g ((1 - a) / tau dkd_v + a (exp(zs_v - lse(zs)) - [v == y]))
// Three sweeps per row over its (L2-resident) 2V values: the logsumexps; the loss (the teacher row is
// overwritten with q_v for beta 0, with r_v otherwise, the two things the gradient sweep needs); then, with a
// gradient, dzs over the student row. Compute in fp32 (fp64 for fp64 logits).
#include "cpu/common.h"
#include "cpu/kernels.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace PFP_ISA {
namespace {

// log(1 + y) for y in [0, 1] (the argument is in [1, 2], always a normal float), branch-free so it vectorizes:
// Cephes' logf polynomial on f in [sqrt(1/2) - 1, sqrt(2) - 1] after halving 1 + y above sqrt(2). Absolute error
// ~1e-7, which is what a log-probability needs.
inline float log1p_unit(float y) {
  const bool high = y > 0.41421356f;
  const float f = high ? 0.5f * y - 0.5f : y;  // (1 + y) / 2 - 1, exact in float for y in (0.41, 1]
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float e = high ? 1.0f : 0.0f;
  return f + (p * f * z - 0.5f * z + e * -2.12194440e-4f) + e * 0.693359375f;
}
inline double log1p_unit(double y) { return std::log1p(y); }

// logaddexp(a, b) for finite a, b (log-probabilities of finite logits)
template <typename C>
inline C log_add_exp(C a, C b) {
  const C high = a > b ? a : b;
  const C gap = a > b ? b - a : a - b;
  return high + log1p_unit(pfp::exp_approx(gap));
}

// Max of x[0, n) in 16 interleaved lanes (vectorizes without -ffast-math).
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

// logsumexp of scale * x over [0, n) (scale > 0), shifted by its max (0 where that max is infinite, as torch)
template <typename C>
inline C scaled_lse(const C* __restrict x, int64_t n, C scale) {
  const C top = lane_max(x, n) * scale;
  const C shift = std::isinf(top) ? C(0) : top;
  return shift + std::log(pfp::lane_sum<C>(n, [&](int64_t v) { return pfp::exp_approx(x[v] * scale - shift); }));
}

struct Settings {
  int64_t ignore_index;
  double beta, temperature, hard;
};

template <typename C>
inline void row_pass(C* __restrict zs, C* __restrict zt, int64_t label, const C* grad_weight, C* loss, int64_t vocab,
                     const Settings& settings) {
  const C beta = C(settings.beta), inverse_tau = C(1) / C(settings.temperature), hard = C(settings.hard);
  if (label == settings.ignore_index) {
    *loss = C(0);
    if (grad_weight)
      for (int64_t v = 0; v < vocab; ++v) zs[v] = C(0);
    return;
  }
  const bool bad_label = hard != C(0) && !(label >= 0 && label < vocab);
  const C lse_s = scaled_lse(zs, vocab, inverse_tau);
  const C lse_t = scaled_lse(zt, vocab, inverse_tau);
  const C lse_raw = hard != C(0) ? (inverse_tau == C(1) ? lse_s : scaled_lse(zs, vocab, C(1))) : C(0);
  // sweep 2: the divergence; zt becomes q (beta 0) or r (otherwise)
  C kd, kl_p = C(0);
  if (beta == C(0)) {
    kd = pfp::lane_sum<C>(vocab, [&](int64_t v) {
      const C log_q = zt[v] * inverse_tau - lse_t, log_p = zs[v] * inverse_tau - lse_s;
      const C q = pfp::exp_approx(log_q);
      zt[v] = q;
      return q * (log_q - log_p);
    });
  } else if (beta == C(1)) {
    kl_p = kd = pfp::lane_sum<C>(vocab, [&](int64_t v) {
      const C log_q = zt[v] * inverse_tau - lse_t, log_p = zs[v] * inverse_tau - lse_s;
      const C r = log_p - log_q;
      zt[v] = r;
      return pfp::exp_approx(log_p) * r;
    });
  } else {
    const C log_student_share = std::log1p(-beta), log_teacher_share = std::log(beta);
    // two sums in one pass, in 16 interleaved lanes each (lane_sum's order, so it vectorizes)
    C lanes_p[16] = {}, lanes_q[16] = {};
    const auto term = [&](int64_t v, int j) {
      const C log_q = zt[v] * inverse_tau - lse_t, log_p = zs[v] * inverse_tau - lse_s;
      const C log_m = log_add_exp(log_p + log_student_share, log_q + log_teacher_share);
      const C r = log_p - log_m;
      zt[v] = r;
      lanes_p[j] += pfp::exp_approx(log_p) * r;
      lanes_q[j] += pfp::exp_approx(log_q) * (log_q - log_m);
    };
    int64_t v = 0;
    for (; v + 16 <= vocab; v += 16)
      for (int j = 0; j < 16; ++j) term(v + j, j);
    for (int j = 0; v < vocab; ++v, ++j) term(v, j);
    for (int width = 8; width > 0; width /= 2)
      for (int j = 0; j < width; ++j) {
        lanes_p[j] += lanes_p[j + width];
        lanes_q[j] += lanes_q[j + width];
      }
    kl_p = lanes_p[0];
    const C kl_q = lanes_q[0];
    kd = (C(1) - beta) * kl_p + beta * kl_q;
  }
  C value = (C(1) - hard) * kd;
  if (hard != C(0)) value += bad_label ? std::numeric_limits<C>::quiet_NaN() : hard * (lse_raw - zs[label]);
  *loss = value;
  if (!grad_weight) return;
  // sweep 3: dzs
  const C g = bad_label ? std::numeric_limits<C>::quiet_NaN() : *grad_weight;
  const C kd_scale = g * (C(1) - hard) * inverse_tau, ce_scale = g * hard;
  const C p_share = beta == C(0) || beta == C(1) ? C(1) : C(1) - beta;
  for (int64_t v = 0; v < vocab; ++v) {
    const C p = pfp::exp_approx(zs[v] * inverse_tau - lse_s);
    const C dkd = beta == C(0) ? p - zt[v] : p_share * p * (zt[v] - kl_p);
    C dz = kd_scale * dkd;
    if (hard != C(0)) dz += ce_scale * pfp::exp_approx(zs[v] - lse_raw);
    zs[v] = dz;
  }
  if (hard != C(0) && !bad_label) zs[label] -= ce_scale;
}

template <typename C>
void rows_impl(C* student, C* teacher, const int64_t* labels, const C* grad_weight, C* loss, int64_t rows,
               int64_t vocab, const Settings& settings, int nthreads) {
  pfp::parallel_for(rows, 8 * vocab, nthreads, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row)
      row_pass<C>(student + row * vocab, teacher + row * vocab, labels[row], grad_weight ? grad_weight + row : nullptr,
                  loss + row, vocab, settings);
  });
}

}  // namespace

// distill_rows: the row pass above over student and teacher logits [rows, vocab] (row-major, contiguous), in
// place: the teacher rows are scratch (overwritten); the student rows end as dzs when grad_weight is given
// (zero on ignored rows), else as they were. dtype (pfp::DType): kFloat32, or kFloat64 for fp64 inputs; the
// logits, grad_weight [rows] and loss [rows] all of it. labels: int64 [rows]; with hard_label_weight > 0 a
// label outside [0, vocab) other than ignore_index gives that row a NaN loss and gradient (nothing is read out
// of bounds). beta in [0, 1]; temperature > 0; hard_label_weight in [0, 1]; vocab >= 1.
void distill_rows(void* student, void* teacher, const int64_t* labels, const void* grad_weight, void* loss,
                  int64_t rows, int64_t vocab, int dtype, int64_t ignore_index, double beta, double temperature,
                  double hard_label_weight, int nthreads) {
  const Settings settings{ignore_index, beta, temperature, hard_label_weight};
  switch (dtype) {
    case pfp::kFloat32:
      return rows_impl(static_cast<float*>(student), static_cast<float*>(teacher), labels,
                       static_cast<const float*>(grad_weight), static_cast<float*>(loss), rows, vocab, settings,
                       nthreads);
    case pfp::kFloat64:
      return rows_impl(static_cast<double*>(student), static_cast<double*>(teacher), labels,
                       static_cast<const double*>(grad_weight), static_cast<double*>(loss), rows, vocab, settings,
                       nthreads);
  }
  throw std::invalid_argument("distill: unsupported logits dtype code " + std::to_string(dtype));
}

}  // namespace PFP_ISA
