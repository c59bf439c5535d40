// Fused linear distillation on CUDA: the row pass of csrc/cpu/distill.cpp over one chunk of student and teacher
// logits (the matmuls around it are torch's; the math is in pyfastpeft/reference/distill.py). One row of V
// student logits zs, teacher logits zt, label y, temperature tau, beta, hard-label weight a, gradient weight g:
//   log p_v = zs_v / tau - lse(zs / tau),  log q_v = zt_v / tau - lse(zt / tau)
//   beta 0:     kd = sum_v q_v (log q_v - log p_v)                           dkd_v = p_v - q_v
//   beta 1:     r_v = log p_v - log q_v,  K = sum_v p_v r_v,  kd = K         dkd_v = p_v (r_v - K)
//   otherwise:  log m_v = logaddexp(log(1 - beta) + log p_v, log(beta) + log q_v),  r_v = log p_v - log m_v,
//               K = sum_v p_v r_v,  kd = (1 - beta) K + beta sum_v q_v (log q_v - log m_v)
//                                                                            dkd_v = (1 - beta) p_v (r_v - K)
//   loss = a (lse(zs) - zs_y) + (1 - a) kd   (0 where y == ignore_index; the cross-entropy only when a > 0)
//   dzs_v = g ((1 - a) / tau dkd_v + a (exp(zs_v - lse(zs)) - [v == y]))
// Mapping: one block per row (grid-stride over rows past gridDim.x), threads strided over the row. Sweeps: the
// maxima, the sums of exponentials (block reductions after each), the loss (the teacher row, scratch, becomes
// q_v for beta 0, r_v otherwise), then with a gradient dzs over the student row. Every element is read and
// written by the same thread. Compute in fp32 (fp64 for fp64 logits).
#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

#include <math_constants.h>

#include <cmath>

namespace pfp_cuda {
namespace {

constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float log_c(float v) { return logf(v); }
__device__ __forceinline__ double log_c(double v) { return log(v); }
__device__ __forceinline__ float log1p_c(float v) { return log1pf(v); }
__device__ __forceinline__ double log1p_c(double v) { return log1p(v); }

struct Max {  // fmax: a NaN operand yields the other one
  template <typename C>
  __device__ __forceinline__ C operator()(C a, C b) const {
    return fmax(a, b);
  }
};

// logsumexp of scale * x over the row, from the block's max (0 where that is infinite, as torch's shift)
template <typename C>
__device__ __forceinline__ C row_lse(const C* __restrict__ x, int64_t vocab, C scale) {
  C top = -C(CUDART_INF);
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) top = fmax(top, x[v] * scale);
  top = block_reduce(top, Max{}, -C(CUDART_INF));
  const C shift = isinf(top) ? C(0) : top;
  C sum = C(0);
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) sum += exp_c(x[v] * scale - shift);
  return shift + log_c(block_sum(sum));
}

template <typename C>
__global__ void __launch_bounds__(kMaxThreads)
    distill_rows_kernel(C* __restrict__ student, C* __restrict__ teacher, const int64_t* __restrict__ labels,
                        const C* __restrict__ grad_weights, C* __restrict__ loss, int64_t rows, int64_t vocab,
                        int64_t ignore_index, C beta, C log_student_share, C log_teacher_share, C inverse_tau, C hard) {
  const bool has_hard = hard != C(0);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    C* zs = student + row * vocab;
    C* zt = teacher + row * vocab;
    const int64_t label = labels[row];
    if (label == ignore_index) {  // uniform across the block: no thread reaches a reduction below
      if (threadIdx.x == 0) loss[row] = C(0);
      if (grad_weights != nullptr)
        for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) zs[v] = C(0);
      continue;
    }
    const bool bad_label = has_hard && !(label >= 0 && label < vocab);
    const C lse_s = row_lse(zs, vocab, inverse_tau);
    const C lse_t = row_lse(zt, vocab, inverse_tau);
    const C lse_raw = has_hard ? (inverse_tau == C(1) ? lse_s : row_lse(zs, vocab, C(1))) : C(0);
    C part_p = C(0), part_q = C(0);  // this thread's terms of K (or of the forward KL) and of sum q (log q - log m)
    if (beta == C(0)) {
      for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
        const C log_q = zt[v] * inverse_tau - lse_t, log_p = zs[v] * inverse_tau - lse_s;
        const C q = exp_c(log_q);
        zt[v] = q;
        part_p += q * (log_q - log_p);
      }
    } else if (beta == C(1)) {
      for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
        const C log_q = zt[v] * inverse_tau - lse_t, log_p = zs[v] * inverse_tau - lse_s;
        const C r = log_p - log_q;
        zt[v] = r;
        part_p += exp_c(log_p) * r;
      }
    } else {
      for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
        const C log_q = zt[v] * inverse_tau - lse_t, log_p = zs[v] * inverse_tau - lse_s;
        const C a = log_p + log_student_share, b = log_q + log_teacher_share;
        const C log_m = fmax(a, b) + log1p_c(exp_c(-fabs(a - b)));
        const C r = log_p - log_m;
        zt[v] = r;
        part_p += exp_c(log_p) * r;
        part_q += exp_c(log_q) * (log_q - log_m);
      }
    }
    const C kl_p = block_sum(part_p);
    const C kd = (beta == C(0) || beta == C(1)) ? kl_p : (C(1) - beta) * kl_p + beta * block_sum(part_q);
    if (threadIdx.x == 0) {
      C value = (C(1) - hard) * kd;
      if (has_hard) value += bad_label ? C(CUDART_NAN) : hard * (lse_raw - zs[label]);
      loss[row] = value;
    }
    if (grad_weights == nullptr) continue;
    // zs[label] was read by thread 0 above; the sweep below overwrites it (by its own thread): wait for the read
    __syncthreads();
    const C g = bad_label ? C(CUDART_NAN) : grad_weights[row];
    const C kd_scale = g * (C(1) - hard) * inverse_tau * ((beta == C(0) || beta == C(1)) ? C(1) : C(1) - beta);
    const C ce_scale = g * hard;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      const C p = exp_c(zs[v] * inverse_tau - lse_s);
      C dz = kd_scale * (beta == C(0) ? p - zt[v] : p * (zt[v] - kl_p));
      if (has_hard) dz += ce_scale * (exp_c(zs[v] - lse_raw) - (v == label ? C(1) : C(0)));
      zs[v] = dz;
    }
  }
}

template <typename C>
void launch(void* student, void* teacher, const int64_t* labels, const void* grad_weights, void* loss, int64_t rows,
            int64_t vocab, int64_t ignore_index, double beta, double temperature, double hard_label_weight,
            cudaStream_t stream, int device) {
  if (rows == 0) return;
  DeviceGuard guard(device);
  const int threads = block_threads(vocab, kMaxThreads);
  // log(1 - beta) and log(beta), the mixture's shares, used only for 0 < beta < 1
  const bool mixture = beta > 0.0 && beta < 1.0;
  const double log_student_share = mixture ? std::log1p(-beta) : 0.0,
               log_teacher_share = mixture ? std::log(beta) : 0.0;
  distill_rows_kernel<C><<<grid_blocks(rows), threads, 0, stream>>>(
      static_cast<C*>(student), static_cast<C*>(teacher), labels, static_cast<const C*>(grad_weights),
      static_cast<C*>(loss), rows, vocab, ignore_index, C(beta), C(log_student_share), C(log_teacher_share),
      C(1.0 / temperature), C(hard_label_weight));
  PFP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// distill_rows: the row pass above over student and teacher logits [rows, vocab] (row-major, contiguous) on
// `device`, in place: the teacher rows are scratch; the student rows end as dzs when grad_weights is given (zero
// on ignored rows). dtype: kFloat32, or kFloat64 for fp64 inputs; the logits, grad_weights [rows] and loss [rows]
// all of it. labels: int64 [rows]; with hard_label_weight > 0 a label outside [0, vocab) other than ignore_index
// gives that row a NaN loss and gradient (nothing is read out of bounds). beta in [0, 1]; temperature > 0.
void distill_rows(void* student, void* teacher, const int64_t* labels, const void* grad_weights, void* loss,
                  int64_t rows, int64_t vocab, int dtype, int64_t ignore_index, double beta, double temperature,
                  double hard_label_weight, cudaStream_t stream, int device) {
  switch (dtype) {
    case kFloat32:
      return launch<float>(student, teacher, labels, grad_weights, loss, rows, vocab, ignore_index, beta, temperature,
                           hard_label_weight, stream, device);
    case kFloat64:
      return launch<double>(student, teacher, labels, grad_weights, loss, rows, vocab, ignore_index, beta, temperature,
                            hard_label_weight, stream, device);
  }
  throw std::invalid_argument("distill: unsupported logits dtype code " + std::to_string(dtype));
}

}  // namespace pfp_cuda
