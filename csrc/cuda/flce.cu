// Fused linear cross-entropy on CUDA: the row pass of csrc/cpu/flce.cpp over one chunk of logits (the
// matmuls around it are torch's). One row of V logits z, label y, smoothing eps, softcap s (0: none),
// class weights w (optional; all 1 without), gradient weight g and z-loss gradient weight q (optional, 0
// without; see pyfastpeft/reference/flce.py):
//   c_v  = s * tanh(z_v / s)                        (c = z without softcap)
//   lse  = m + log(sum_v exp(c_v - m)),  m = max_v c_v, or 0 where that max is +-inf (torch.logsumexp's
//          shift: a +inf logit gives lse +inf, a row of -inf gives -inf, a NaN logit gives NaN)
//   loss = lse - (1 - eps) * c_y - (eps / V) * sum_v c_v      (without class weights)
//        = (1 - eps) * w_y * (lse - c_y) + (eps / V) * (W * lse - sum_v w_v c_v),  W = sum_v w_v   (with)
//          (0 where y == ignore_index; the eps term only when eps > 0, so a -inf logit leaves the loss finite)
//   dz_v = (P * exp(c_v - lse) - g * (eps / V) * w_v - g * (1 - eps) * w_y * [v == y]) * (1 - (c_v / s)^2)
//   P    = g * ((1 - eps) * w_y + (eps / V) * W) + q * lse
// Mapping: one block per row (grid-stride over rows past gridDim.x), threads strided over the row.
// Sweep 1: each thread keeps an online (max, sum of exp relative to shift(max)) pair, sum c (sum w c and W
// with class weights) and c_y over its columns; block reductions combine them. A NaN logit never becomes the max (c >
// max is false) and turns the sum NaN wherever the thread meets it, first or not. Sweep 2 (with a gradient) rereads z
// and overwrites it with dz: every element is read and written by the same thread. Compute in fp32 (fp64 for fp64
// logits).
#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

#include <math_constants.h>

#include <cmath>

namespace pfp_cuda {
namespace {

constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float log_c(float v) { return logf(v); }
__device__ __forceinline__ double log_c(double v) { return log(v); }
__device__ __forceinline__ float tanh_c(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_c(double v) { return tanh(v); }
template <typename C>
__device__ __forceinline__ C negative_infinity();
template <>
__device__ __forceinline__ float negative_infinity<float>() {
  return -CUDART_INF_F;
}
template <>
__device__ __forceinline__ double negative_infinity<double>() {
  return -CUDART_INF;
}
template <typename C>
__device__ __forceinline__ C quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return CUDART_NAN_F;
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return CUDART_NAN;
}

struct FMax {  // fmax: a NaN operand yields the other one
  template <typename C>
  __device__ __forceinline__ C operator()(C a, C b) const {
    return fmax(a, b);
  }
};

// The exponent shift of a max: the max itself, or 0 where it is +-inf.
template <typename C>
__device__ __forceinline__ C shift_of(C max) {
  return isinf(max) ? C(0) : max;
}

template <typename C>
__device__ __forceinline__ C softcapped(C z, C softcap) {
  return softcap != C(0) ? softcap * tanh_c(z / softcap) : z;
}

template <typename C>
__global__ void __launch_bounds__(kMaxThreads)
    flce_rows_kernel(C* __restrict__ logits, const int64_t* __restrict__ labels, const C* __restrict__ grad_weights,
                     const C* __restrict__ z_grad_weights, const C* __restrict__ class_weight, C* __restrict__ loss,
                     C* __restrict__ lse, int64_t rows, int64_t vocab, int64_t ignore_index, C smoothing, C softcap) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    C* z = logits + row * vocab;
    const int64_t label = labels[row];
    const bool ignored = label == ignore_index;
    const bool in_range = label >= 0 && label < vocab;
    C thread_max = negative_infinity<C>(), thread_sum = C(0), sum_c = C(0), target = C(0), weight_sum = C(0);
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      const C c = softcapped(z[v], softcap);
      if (c > thread_max) {  // a new max, so not NaN; +inf makes the sum +inf (or keeps a NaN)
        thread_sum = isinf(c) ? thread_sum + c : thread_sum * exp_c(thread_max - c) + C(1);
        thread_max = c;
      } else {  // c <= max (-inf after only -inf adds exp(-inf) = 0), or NaN: the sum becomes NaN
        thread_sum += exp_c(c - shift_of(thread_max));
      }
      if (class_weight) {
        sum_c += class_weight[v] * c;
        weight_sum += class_weight[v];
      } else {
        sum_c += c;
      }
      if (v == label) target = c;
    }
    const C row_max = block_reduce(thread_max, FMax{}, negative_infinity<C>());
    const C row_shift = shift_of(row_max);
    // thread_max - row_shift: -inf for a thread that saw only -inf (its sum 0, or NaN, times 0 stays that);
    // +inf only when row_max is, and then the thread's sum is +inf or NaN already.
    const C row_lse = row_shift + log_c(block_sum(thread_sum * exp_c(thread_max - row_shift)));
    sum_c = block_sum(sum_c);
    target = block_sum(target);
    if (class_weight) weight_sum = block_sum(weight_sum);
    const C label_weight = class_weight && in_range && !ignored ? class_weight[label] : C(1);
    if (threadIdx.x == 0) {
      lse[row] = row_lse;
      C value;
      if (class_weight) {
        value = (C(1) - smoothing) * label_weight * (row_lse - target);
        if (smoothing != C(0)) value += smoothing / C(vocab) * (weight_sum * row_lse - sum_c);
      } else {
        const C smoothed = smoothing != C(0) ? smoothing / C(vocab) * sum_c : C(0);
        value = row_lse - (C(1) - smoothing) * target - smoothed;
      }
      loss[row] = ignored ? C(0) : (in_range ? value : quiet_nan<C>());
    }
    if (grad_weights == nullptr) continue;
    const C g = ignored ? C(0) : (in_range ? grad_weights[row] : quiet_nan<C>());
    const C g_uniform = g * smoothing / C(vocab), g_target = g * (C(1) - smoothing) * label_weight;
    C p_scale = class_weight ? g * ((C(1) - smoothing) * label_weight + smoothing / C(vocab) * weight_sum) : g;
    if (z_grad_weights != nullptr && !ignored) p_scale += z_grad_weights[row] * row_lse;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      const C c = softcapped(z[v], softcap);
      const C smooth = class_weight ? g_uniform * class_weight[v] : g_uniform;
      C dz = p_scale * exp_c(c - row_lse) - smooth - (v == label ? g_target : C(0));
      if (softcap != C(0)) {
        const C t = c / softcap;
        dz *= C(1) - t * t;
      }
      z[v] = dz;
    }
  }
}

template <typename C>
void launch(void* logits, const int64_t* labels, const void* grad_weights, const void* z_grad_weights,
            const void* class_weight, void* loss, void* lse, int64_t rows, int64_t vocab, int64_t ignore_index,
            double label_smoothing, double softcap, cudaStream_t stream, int device) {
  if (rows == 0) return;
  DeviceGuard guard(device);
  const int threads = block_threads(vocab, kMaxThreads);
  flce_rows_kernel<C><<<grid_blocks(rows), threads, 0, stream>>>(
      static_cast<C*>(logits), labels, static_cast<const C*>(grad_weights),
      grad_weights ? static_cast<const C*>(z_grad_weights) : nullptr, static_cast<const C*>(class_weight),
      static_cast<C*>(loss), static_cast<C*>(lse), rows, vocab, ignore_index, C(label_smoothing), C(softcap));
  PFP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// flce_rows: the row pass above over logits [rows, vocab] (row-major, contiguous) on `device`, in place.
// dtype: kFloat32, or kFloat64 for fp64 inputs; logits, grad_weights, loss, lse all of it (logits_dtype: the same;
// the CPU's 16-bit logits storage has no CUDA path: CUDA GEMMs write fp32 logits from 16-bit operands).
// labels: int64 [rows]; a label outside [0, vocab) other than ignore_index gives that row a NaN loss and
// gradient (nothing is read out of bounds). loss, lse: [rows], written (loss 0 on ignored rows).
// grad_weights: null (logits left as they are) or [rows]: logits end as dz, zero on ignored rows.
// z_grad_weights: null (no z-loss) or [rows], read only with grad_weights. class_weight: null or [vocab].
// label_smoothing in [0, 1); softcap > 0, or 0 for none; vocab >= 1.
void flce_rows(void* logits, const int64_t* labels, const void* grad_weights, const void* z_grad_weights,
               const void* class_weight, void* loss, void* lse, int64_t rows, int64_t vocab, int dtype,
               int logits_dtype, int64_t ignore_index, double label_smoothing, double softcap, cudaStream_t stream,
               int device) {
  if (logits_dtype != dtype) {
    throw std::invalid_argument("flce: CUDA logits must be of dtype code " + std::to_string(dtype) + ", got " +
                                std::to_string(logits_dtype));
  }
  switch (dtype) {
    case kFloat32:
      return launch<float>(logits, labels, grad_weights, z_grad_weights, class_weight, loss, lse, rows, vocab,
                           ignore_index, label_smoothing, softcap, stream, device);
    case kFloat64:
      return launch<double>(logits, labels, grad_weights, z_grad_weights, class_weight, loss, lse, rows, vocab,
                            ignore_index, label_smoothing, softcap, stream, device);
  }
  throw std::invalid_argument("flce: unsupported logits dtype code " + std::to_string(dtype));
}

}  // namespace pfp_cuda
