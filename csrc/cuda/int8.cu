// LLM.int8 on CUDA: vector-wise quantization with outlier columns, the int32 -> float matmul epilogue, a fused
// int8 GEMV for decode (one warp per output row, __dp4a on 16-byte loads), and weight dequantization.
// The int8 GEMM itself is torch._int_mm (cuBLASLt) from Python: the toolkit on build machines has no cuBLAS.
//
// Math (pyfastpeft/reference/int8.py is the oracle; fp32, in this order; the same as csrc/cpu/int8.cpp):
//   row-wise     row_stats[r] = max |x[r, c]| over !(|x[r, c]| >= t)     (every element when threshold <= 0)
//                q[r, c] = rne(x[r, c] * ((1 / row_stats[r]) * 127)), 0 in outlier columns
//   column-wise  col_stats[c] = the same max down column c;  q[r, c] = rne((x[r, c] * 127) / col_stats[c]),
//                0 at outlier elements
//   non-finite scaled values code as 0; a NaN makes its stat NaN.  outlier column c <=> some |x[r, c]| >= t
//   epilogue     out[r, j] = float(C[r, j]) * (row_stats[r] * col_stats[j]) * fp32(1/127^2) (+ addend) (+ bias[j])
//   dequant      out[r, c] = (float(q[r, c]) * stats[r]) * fp32(1/127)
// Every multiply and add below uses the __fmul_rn / __fadd_rn intrinsics where the reference rounds after each
// step, so nvcc cannot contract them into a fused multiply-add that would move ties.
#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

#include <type_traits>

namespace pfp_cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kMmDequantScale = 1.0f / 16129.0f;
constexpr float kDequantScale = 7.874015718698502e-3f;

__device__ __forceinline__ int8_t to_code(float s) {
  if (!isfinite(s)) return 0;
  float r = rintf(s);  // round half to even
  return int8_t(fminf(fmaxf(r, -127.0f), 127.0f));
}

// max that propagates NaN (fmaxf would drop it).
struct NanMax {
  __device__ __forceinline__ float operator()(float a, float b) const { return (a != a || b != b) ? NAN : fmaxf(a, b); }
};

// One block per row: the row's stat, and flags[c] = 1 for its outlier elements' columns (flags zeroed by the
// caller; concurrent writers store the same 1).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const T* __restrict__ x, float* __restrict__ stats, int* __restrict__ flags, int64_t k, float t,
                     bool has_threshold) {
  const int64_t row = blockIdx.x;
  const T* src = x + row * k;
  float best = 0.0f;
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) {
    const float a = fabsf(Scalar<T>::load(src[c]));
    if (has_threshold && a >= t) {
      flags[c] = 1;
    } else {
      best = NanMax{}(best, a);
    }
  }
  best = block_reduce(best, NanMax{}, 0.0f);
  if (threadIdx.x == 0) stats[row] = best;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_codes_kernel(const T* __restrict__ x, const float* __restrict__ stats, const int* __restrict__ flags,
                     int8_t* __restrict__ q, int64_t k, bool has_flags) {
  const int64_t row = blockIdx.x;
  const float stat = stats[row];
  const float scale = stat == 0.0f ? 0.0f : __fmul_rn(__frcp_rn(stat), 127.0f);
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) {
    const int8_t code = to_code(__fmul_rn(Scalar<T>::load(x[row * k + c]), scale));
    q[row * k + c] = (has_flags && flags[c]) ? int8_t(0) : code;
  }
}

// Column tiles of kColTile consecutive columns (a warp's worth: coalesced reads), kRowLanes row lanes per tile,
// lane ty walking rows ty, ty + kRowLanes, ...; the lanes' partial maxima and outlier flags of a column meet in
// shared memory. NanMax is commutative and associative, so the split gives the serial walk's stat exactly.
// (One thread per column walking all m rows left 16 blocks for k = 4096: a few SMs busy.)
constexpr int kColTile = 32;
constexpr int kRowLanes = kThreads / kColTile;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    col_stats_kernel(const T* __restrict__ x, float* __restrict__ stats, int* __restrict__ flags, int64_t m, int64_t k,
                     float t, bool has_threshold) {
  __shared__ float lane_best[kRowLanes][kColTile];
  __shared__ int lane_outlier[kRowLanes][kColTile];
  const int tx = threadIdx.x % kColTile, ty = threadIdx.x / kColTile;
  const int64_t c = int64_t(blockIdx.x) * kColTile + tx;
  float best = 0.0f;
  int outlier = 0;
  if (c < k) {
    for (int64_t r = ty; r < m; r += kRowLanes) {
      const float a = fabsf(Scalar<T>::load(x[r * k + c]));
      if (has_threshold && a >= t) {
        outlier = 1;
      } else {
        best = NanMax{}(best, a);
      }
    }
  }
  lane_best[ty][tx] = best;
  lane_outlier[ty][tx] = outlier;
  __syncthreads();
  if (ty == 0 && c < k) {
#pragma unroll
    for (int lane = 1; lane < kRowLanes; ++lane) {
      best = NanMax{}(best, lane_best[lane][tx]);
      outlier |= lane_outlier[lane][tx];
    }
    stats[c] = best;
    flags[c] = outlier;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    col_codes_kernel(const T* __restrict__ x, const float* __restrict__ stats, int8_t* __restrict__ q, int64_t m,
                     int64_t k, float t, bool has_threshold) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < m * k; i += stride) {
    const float v = Scalar<T>::load(x[i]);
    const int8_t code = to_code(__fdiv_rn(__fmul_rn(v, 127.0f), stats[i % k]));
    q[i] = (has_threshold && fabsf(v) >= t) ? int8_t(0) : code;
  }
}

template <typename T>
__device__ __forceinline__ T epilogue(int32_t acc, float row_stat, float col_stat, const float* addend, const T* bias,
                                      int64_t index, int64_t column) {
  float v = __fmul_rn(__fmul_rn(float(acc), __fmul_rn(row_stat, col_stat)), kMmDequantScale);
  if (addend) v = __fadd_rn(v, addend[index]);
  if (bias) v = __fadd_rn(v, Scalar<T>::load(bias[column]));
  return Scalar<T>::store(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    mm_dequant_kernel(const int32_t* __restrict__ c, const float* __restrict__ row_stats,
                      const float* __restrict__ col_stats, const T* __restrict__ bias, const float* __restrict__ addend,
                      T* __restrict__ out, int64_t m, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < m * n; i += stride) {
    const int64_t r = i / n, j = i % n;
    out[i] = epilogue(c[i], row_stats[r], col_stats[j], addend, bias, i, j);
  }
}

// One warp per output column j: the warp walks W[j, :] in 16-byte chunks (VEC) or bytes, each lane
// dotting its chunk with the m rows of q by __dp4a, then a shuffle reduction; lane 0 writes the epilogue.
template <typename T, int M, bool VEC>
__global__ void __launch_bounds__(kThreads)
    gemv_kernel(const int8_t* __restrict__ q, const float* __restrict__ row_stats, const int8_t* __restrict__ w,
                const float* __restrict__ col_stats, const T* __restrict__ bias, const float* __restrict__ addend,
                T* __restrict__ out, int64_t n, int64_t k) {
  const int lane = threadIdx.x % 32;
  const int64_t j = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (j >= n) return;
  int32_t acc[M];
#pragma unroll
  for (int r = 0; r < M; ++r) acc[r] = 0;
  const int8_t* wrow = w + j * k;
  if (VEC) {  // k % 16 == 0 and every row 16-byte aligned
    for (int64_t c = int64_t(lane) * 16; c < k; c += 32 * 16) {
      const int4 wv = *reinterpret_cast<const int4*>(wrow + c);
#pragma unroll
      for (int r = 0; r < M; ++r) {
        const int4 xv = *reinterpret_cast<const int4*>(q + r * k + c);
        acc[r] = __dp4a(xv.x, wv.x, acc[r]);
        acc[r] = __dp4a(xv.y, wv.y, acc[r]);
        acc[r] = __dp4a(xv.z, wv.z, acc[r]);
        acc[r] = __dp4a(xv.w, wv.w, acc[r]);
      }
    }
  } else {
    for (int64_t c = lane; c < k; c += 32) {
      const int32_t wv = wrow[c];
#pragma unroll
      for (int r = 0; r < M; ++r) acc[r] += int32_t(q[r * k + c]) * wv;
    }
  }
#pragma unroll
  for (int r = 0; r < M; ++r) {
    int32_t v = acc[r];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) out[r * n + j] = epilogue(v, row_stats[r], col_stats[j], addend, bias, r * n + j, j);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_rows_kernel(const int8_t* __restrict__ q, const float* __restrict__ stats, T* __restrict__ out,
                           int64_t rows, int64_t k) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * k; i += stride)
    out[i] = Scalar<T>::store(__fmul_rn(__fmul_rn(float(q[i]), stats[i / k]), kDequantScale));
}

unsigned elementwise_grid(int64_t items, int device) {
  int sms = 0;
  PFP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return grid_blocks(std::max<int64_t>(1, std::min<int64_t>(div_up(items, kThreads), int64_t(sms) * 8)));
}

template <typename F>
void with_float_type(int dtype, const char* what, F&& body) {
  switch (dtype) {
    case kFloat32: body(static_cast<float*>(nullptr)); return;
    case kFloat16: body(static_cast<__half*>(nullptr)); return;
    case kBFloat16: body(static_cast<__nv_bfloat16*>(nullptr)); return;
  }
  throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(dtype));
}

template <typename T, int M>
void launch_gemv(const int8_t* q, const float* row_stats, const int8_t* w, const float* col_stats, const T* bias,
                 const float* addend, T* out, int64_t n, int64_t k, cudaStream_t stream) {
  const bool vec = k % 16 == 0 && is_aligned(q, 16) && is_aligned(w, 16);
  const unsigned blocks = grid_blocks(div_up(n, kThreads / 32));
  auto kernel = vec ? gemv_kernel<T, M, true> : gemv_kernel<T, M, false>;
  kernel<<<blocks, kThreads, 0, stream>>>(q, row_stats, w, col_stats, bias, addend, out, n, k);
}

}  // namespace

// int8_quantize: x [m, k] (row-major, dtype x_dtype: fp32/fp16/bf16) -> q int8 [m, k], stats fp32 ([m] for
// axis 0, [k] for axis 1), flags int32 [k] (1 = outlier column; zeroed by the caller for axis 0). threshold <= 0:
// no outliers. m <= 2^31 - 1 rows for axis 0 (one block per row).
void int8_quantize(const void* x, int x_dtype, int8_t* q, float* stats, int* flags, int64_t m, int64_t k, int axis,
                   double threshold, cudaStream_t stream, int device) {
  if (m == 0 || k == 0) return;
  DeviceGuard guard(device);
  const bool has_threshold = threshold > 0;
  const float t = float(threshold);
  with_float_type(x_dtype, "int8_quantize", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* src = static_cast<const T*>(x);
    if (axis == 0) {
      row_stats_kernel<T><<<unsigned(m), kThreads, 0, stream>>>(src, stats, flags, k, t, has_threshold);
      PFP_CUDA_CHECK(cudaGetLastError());
      row_codes_kernel<T><<<unsigned(m), kThreads, 0, stream>>>(src, stats, flags, q, k, has_threshold);
    } else {
      col_stats_kernel<T>
          <<<grid_blocks(div_up(k, kColTile)), kThreads, 0, stream>>>(src, stats, flags, m, k, t, has_threshold);
      PFP_CUDA_CHECK(cudaGetLastError());
      col_codes_kernel<T>
          <<<elementwise_grid(m * k, device), kThreads, 0, stream>>>(src, stats, q, m, k, t, has_threshold);
    }
    PFP_CUDA_CHECK(cudaGetLastError());
  });
}

// The CUDA epilogue reads a bias in the output dtype only (the caller casts it); bias_dtype keeps the signature
// the CPU module's.
static void check_bias_dtype(const void* bias, int bias_dtype, int out_dtype, const char* what) {
  if (bias != nullptr && bias_dtype != out_dtype)
    throw std::invalid_argument(std::string(what) + ": the bias must have the output dtype on CUDA");
}

// int8_mm_dequant: out [m, n] (out_dtype) = epilogue of c int32 [m, n]; bias [n] of out_dtype (bias_dtype) or
// null; addend fp32 [m, n] or null. Row-major, contiguous.
void int8_mm_dequant(const int32_t* c, const float* row_stats, const float* col_stats, const void* bias, int bias_dtype,
                     const float* addend, void* out, int out_dtype, int64_t m, int64_t n, cudaStream_t stream,
                     int device) {
  check_bias_dtype(bias, bias_dtype, out_dtype, "int8_mm_dequant");
  if (m == 0 || n == 0) return;
  DeviceGuard guard(device);
  with_float_type(out_dtype, "int8_mm_dequant", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mm_dequant_kernel<T><<<elementwise_grid(m * n, device), kThreads, 0, stream>>>(
        c, row_stats, col_stats, static_cast<const T*>(bias), addend, static_cast<T*>(out), m, n);
    PFP_CUDA_CHECK(cudaGetLastError());
  });
}

// int8_gemv: out [m, n] = epilogue(q [m, k] int8 @ w [n, k]^T), 1 <= m <= 8; bias [n] of out_dtype (bias_dtype)
// or null, addend fp32 [m, n] or null. Row-major, contiguous. outlier_count must be 0 (the CPU kernel's fused
// outlier columns; here the caller passes their product as the addend).
void int8_gemv(const int8_t* q, const float* row_stats, const int8_t* w, const float* col_stats, const void* bias,
               int bias_dtype, const float* addend, void* out, int out_dtype, int64_t m, int64_t n, int64_t k,
               const int64_t* outlier_cols, int64_t outlier_count, const float* outlier_x, bool outlier_bf16,
               cudaStream_t stream, int device) {
  check_bias_dtype(bias, bias_dtype, out_dtype, "int8_gemv");
  // The CPU kernel's signature; on the GPU the outlier product comes as the addend, computed before.
  (void)outlier_cols, (void)outlier_x, (void)outlier_bf16;
  if (outlier_count != 0) throw std::invalid_argument("int8_gemv: outlier columns go in the addend on CUDA");
  if (m == 0 || n == 0) return;
  if (m > 8) throw std::invalid_argument("int8_gemv: at most 8 rows");
  DeviceGuard guard(device);
  with_float_type(out_dtype, "int8_gemv", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* b = static_cast<const T*>(bias);
    T* o = static_cast<T*>(out);
    switch (m) {
      case 1: launch_gemv<T, 1>(q, row_stats, w, col_stats, b, addend, o, n, k, stream); break;
      case 2: launch_gemv<T, 2>(q, row_stats, w, col_stats, b, addend, o, n, k, stream); break;
      case 3: launch_gemv<T, 3>(q, row_stats, w, col_stats, b, addend, o, n, k, stream); break;
      case 4: launch_gemv<T, 4>(q, row_stats, w, col_stats, b, addend, o, n, k, stream); break;
      case 5: launch_gemv<T, 5>(q, row_stats, w, col_stats, b, addend, o, n, k, stream); break;
      case 6: launch_gemv<T, 6>(q, row_stats, w, col_stats, b, addend, o, n, k, stream); break;
      case 7: launch_gemv<T, 7>(q, row_stats, w, col_stats, b, addend, o, n, k, stream); break;
      default: launch_gemv<T, 8>(q, row_stats, w, col_stats, b, addend, o, n, k, stream); break;
    }
    PFP_CUDA_CHECK(cudaGetLastError());
  });
}

// int8_dequantize_rows: out [rows, k] (out_dtype) = (float(q) * stats[r]) / 127. Row-major, contiguous.
void int8_dequantize_rows(const int8_t* q, const float* stats, void* out, int out_dtype, int64_t rows, int64_t k,
                          cudaStream_t stream, int device) {
  if (rows == 0 || k == 0) return;
  DeviceGuard guard(device);
  with_float_type(out_dtype, "int8_dequantize_rows", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_rows_kernel<T>
        <<<elementwise_grid(rows * k, device), kThreads, 0, stream>>>(q, stats, static_cast<T*>(out), rows, k);
    PFP_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace pfp_cuda
