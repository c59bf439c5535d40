// RMSNorm forward and backward on CUDA: the math of csrc/cpu/rmsnorm.cpp, row by row.
//
// forward, one row:  r = 1 / sqrt(mean(x^2) + eps),  w' = offset + w   (fp32, or fp64 for fp64 x)
//   llama: y = w' * round_x(x * r)            (HF LlamaRMSNorm: normalize in fp32, cast, then scale)
//   gemma: y = x * r * w'                      (all in fp32, one cast at the store)
//   none : y = round_x(round_x(x * round_x(r)) * round_x(w'))   (every step in x's dtype)
// where round_x(v) is v stored as x's dtype and read back.
// backward, one row (the casts treated as identity):  m = dy * w'
//   dx = r * m - (r^3 / n) * dot(m, x) * x
//   dw += dy * xn,  xn = round_x(x * r) (llama, none) or x * r (gemma); one partial row per block.
//
// Mapping: one block per row (grid-stride over rows), sized to the row: a multiple of 32 threads,
// at most 512 so that several blocks share an SM and overlap each other's reductions. Thread t owns
// the packs t, t + blockDim.x, ... of V consecutive elements: V = 16 bytes of x (8 fp16/bf16, 4 fp32,
// 2 fp64) when n % V == 0 and every row pointer is aligned for it, else V = 1. A row is read twice
// (sum of squares, then the output); the second read hits L1/L2. The row sum is a warp-shuffle +
// shared-memory block reduction in the compute type. The weight, of any dtype, is read element by
// element (it stays in cache across rows).
// backward: grid = num_partials blocks (one block per row when no weight gradient is wanted); block
// b takes rows b, b + gridDim.x, ... and each thread accumulates dw for its own columns, in shared
// memory when the row fits (<= kSharedDwBytes) or else in place in the block's own row of
// dw_partial: a column is only ever touched by one thread, so there are no atomics and no races.
#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

namespace pfp_cuda {
namespace {

enum CastingMode { kLlama = 0, kGemma = 1, kNone = 2 };

constexpr int kMaxThreads = 512;
// Dynamic shared memory for the dw accumulator: the 48 KB available without opt-in, less room for
// block_sum's static array.
constexpr int64_t kSharedDwBytes = 47 * 1024;

// out[k] = offset + weight[col + k] in the compute type, whatever the weight's dtype.
template <typename C, int N>
__device__ __forceinline__ void load_weight(const void* weight, int weight_dtype, int64_t col, C offset, C (&out)[N]) {
  auto load = [&](auto* w) {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_compute<C>(w[col + k]);
  };
  switch (weight_dtype) {
    case kFloat16: load(static_cast<const __half*>(weight)); break;
    case kBFloat16: load(static_cast<const __nv_bfloat16*>(weight)); break;
    case kFloat64: load(static_cast<const double*>(weight)); break;
    default: load(static_cast<const float*>(weight)); break;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = offset + out[k];
}

template <typename Tx>
__device__ __forceinline__ compute_t<Tx> scale(compute_t<Tx> x, compute_t<Tx> r, compute_t<Tx> r_x, compute_t<Tx> w,
                                               int mode) {
  if (mode == kLlama) return w * round_to<Tx>(x * r);
  if (mode == kGemma) return x * r * w;
  return round_to<Tx>(round_to<Tx>(x * r_x) * round_to<Tx>(w));
}

template <typename Tx, typename Ty, int V>
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_forward_kernel(const Tx* __restrict__ x, const void* __restrict__ weight, int weight_dtype,
                           Ty* __restrict__ y, compute_t<Tx>* __restrict__ rstd, int64_t rows, int64_t n,
                           compute_t<Tx> eps, compute_t<Tx> offset, int mode) {
  using C = compute_t<Tx>;
  const int64_t packs = n / V;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const Tx* x_row = x + row * n;
    Ty* y_row = y + row * n;
    C sum_sq = 0;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      C xv[V];
      load_vec(x_row + p * V, xv);
#pragma unroll
      for (int k = 0; k < V; ++k) sum_sq += xv[k] * xv[k];
    }
    const C r = C(1) / sqrt_c(block_sum(sum_sq) / C(n) + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    const C r_x = round_to<Tx>(r);
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      C xv[V], wv[V];
      load_vec(x_row + p * V, xv);
      load_weight(weight, weight_dtype, p * V, offset, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) xv[k] = scale<Tx>(xv[k], r, r_x, wv[k], mode);
      store_vec(y_row + p * V, xv);
    }
  }
}

template <typename Tx, typename Tdy, int V>
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_backward_kernel(const Tdy* __restrict__ dy, const Tx* __restrict__ x, const void* __restrict__ weight,
                            int weight_dtype, const compute_t<Tx>* __restrict__ rstd, Tx* __restrict__ dx,
                            compute_t<Tx>* __restrict__ dw_partial, int64_t rows, int64_t n, compute_t<Tx> offset,
                            int mode, bool dw_in_shared) {
  using C = compute_t<Tx>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t packs = n / V;
  // This block's dw accumulator; every loop below gives a thread the same columns.
  C* dw = nullptr;
  if (dw_partial) {
    dw = dw_in_shared ? reinterpret_cast<C*>(shared_bytes) : dw_partial + int64_t(blockIdx.x) * n;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x)
#pragma unroll
      for (int k = 0; k < V; ++k) dw[p * V + k] = C(0);
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const Tdy* dy_row = dy + row * n;
    const Tx* x_row = x + row * n;
    Tx* dx_row = dx + row * n;
    const C r = rstd[row];
    C dot = 0;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      C g[V], xv[V], wv[V];
      load_vec(dy_row + p * V, g);
      load_vec(x_row + p * V, xv);
      load_weight(weight, weight_dtype, p * V, offset, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) dot += g[k] * wv[k] * xv[k];
    }
    const C coef = r * r * r * block_sum(dot) / C(n);
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      C g[V], xv[V], wv[V];
      load_vec(dy_row + p * V, g);
      load_vec(x_row + p * V, xv);
      load_weight(weight, weight_dtype, p * V, offset, wv);
      if (dw) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const C xn = mode == kGemma ? xv[k] * r : round_to<Tx>(xv[k] * r);
          dw[p * V + k] += g[k] * xn;
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) g[k] = r * g[k] * wv[k] - coef * xv[k];
      store_vec(dx_row + p * V, g);
    }
  }
  if (dw && dw_in_shared) {
    C* dw_row = dw_partial + int64_t(blockIdx.x) * n;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x)
#pragma unroll
      for (int k = 0; k < V; ++k) dw_row[p * V + k] = dw[p * V + k];
  }
}

template <typename Tx, typename Ty>
void launch_forward(const void* x, const void* weight, int weight_dtype, void* y, void* rstd, int64_t rows, int64_t n,
                    double eps, double offset, int mode, cudaStream_t stream, int device) {
  if (rows == 0) return;
  DeviceGuard guard(device);
  using C = compute_t<Tx>;
  constexpr int kVec = 16 / sizeof(Tx);
  const bool vectorize = n % kVec == 0 && is_aligned(x, 16) && is_aligned(y, kVec * sizeof(Ty));
  const unsigned grid = grid_blocks(rows);
  const int threads = block_threads(vectorize ? n / kVec : n, kMaxThreads);
  auto kernel = vectorize ? rmsnorm_forward_kernel<Tx, Ty, kVec> : rmsnorm_forward_kernel<Tx, Ty, 1>;
  kernel<<<grid, threads, 0, stream>>>(static_cast<const Tx*>(x), weight, weight_dtype, static_cast<Ty*>(y),
                                       static_cast<C*>(rstd), rows, n, C(eps), C(offset), mode);
  PFP_CUDA_CHECK(cudaGetLastError());
}

template <typename Tx, typename Tdy>
void launch_backward(const void* dy, const void* x, const void* weight, int weight_dtype, const void* rstd, void* dx,
                     void* dw_partial, int64_t rows, int64_t n, double offset, int mode, int64_t num_partials,
                     cudaStream_t stream, int device) {
  if (dw_partial && (num_partials < 1 || num_partials > kMaxGridX))
    throw std::invalid_argument("rmsnorm_backward: num_partials must be in [1, 2^31 - 1], got " +
                                std::to_string(num_partials));
  if (n == 0 || (rows == 0 && !dw_partial)) return;  // with rows == 0 the partials are still zeroed
  DeviceGuard guard(device);
  using C = compute_t<Tx>;
  constexpr int kVec = 16 / sizeof(Tx);
  const bool vectorize = n % kVec == 0 && is_aligned(x, 16) && is_aligned(dx, 16) && is_aligned(dy, kVec * sizeof(Tdy));
  const bool dw_in_shared = dw_partial && n * int64_t(sizeof(C)) <= kSharedDwBytes;
  const size_t shared_bytes = dw_in_shared ? size_t(n) * sizeof(C) : 0;
  const unsigned grid = dw_partial ? unsigned(num_partials) : grid_blocks(rows);
  const int threads = block_threads(vectorize ? n / kVec : n, kMaxThreads);
  auto kernel = vectorize ? rmsnorm_backward_kernel<Tx, Tdy, kVec> : rmsnorm_backward_kernel<Tx, Tdy, 1>;
  kernel<<<grid, threads, shared_bytes, stream>>>(static_cast<const Tdy*>(dy), static_cast<const Tx*>(x), weight,
                                                  weight_dtype, static_cast<const C*>(rstd), static_cast<Tx*>(dx),
                                                  static_cast<C*>(dw_partial), rows, n, C(offset), mode, dw_in_shared);
  PFP_CUDA_CHECK(cudaGetLastError());
}

void check_weight_dtype(int weight_dtype) {
  if (weight_dtype < kFloat32 || weight_dtype > kFloat64)
    throw std::invalid_argument("rmsnorm: unsupported weight dtype code " + std::to_string(weight_dtype));
}

[[noreturn]] void unsupported(const char* what) {
  throw std::invalid_argument(std::string("rmsnorm: unsupported dtype combination: ") + what);
}

}  // namespace

// rmsnorm_forward: y[rows, n] = rmsnorm(x[rows, n]) scaled by (offset + weight[n]); rstd[rows] in the
// compute type (fp32; fp64 for fp64 x).
// x, y: contiguous rows, on `device`. dtypes (pfp_cuda::DType): y_dtype == x_dtype, or y fp32 with x
// fp16/bf16 (the llama mode's promotion with an fp32 weight); weight any of the four. casting_mode
// 0 llama, 1 gemma, 2 none. n >= 1.
void rmsnorm_forward(const void* x, const void* weight, void* y, void* rstd, int64_t rows, int64_t n, int x_dtype,
                     int weight_dtype, int y_dtype, double eps, double offset, int casting_mode, cudaStream_t stream,
                     int device) {
  check_weight_dtype(weight_dtype);
#define PFP_RMS_FWD(TX, TY) \
  launch_forward<TX, TY>(x, weight, weight_dtype, y, rstd, rows, n, eps, offset, casting_mode, stream, device)
  if (x_dtype == y_dtype) {
    switch (x_dtype) {
      case kFloat32: PFP_RMS_FWD(float, float); return;
      case kFloat16: PFP_RMS_FWD(__half, __half); return;
      case kBFloat16: PFP_RMS_FWD(__nv_bfloat16, __nv_bfloat16); return;
      case kFloat64: PFP_RMS_FWD(double, double); return;
    }
  } else if (y_dtype == kFloat32) {
    switch (x_dtype) {
      case kFloat16: PFP_RMS_FWD(__half, float); return;
      case kBFloat16: PFP_RMS_FWD(__nv_bfloat16, float); return;
    }
  }
#undef PFP_RMS_FWD
  unsupported("forward");
}

// rmsnorm_backward: dx[rows, n] (x's dtype) from dy[rows, n] (dy_dtype: the forward's y dtype), x,
// weight[n], rstd[rows] (compute type) saved by the forward; all contiguous, on `device`.
// dw_partial: null (no weight gradient), or [num_partials, n] of fp32 (fp64 for fp64 x), 1 <=
// num_partials < 2^31, that the kernel overwrites entirely (zeros when rows == 0) with per-block
// sums over rows b, b + num_partials, ...; the caller adds the rows up.
void rmsnorm_backward(const void* dy, const void* x, const void* weight, const void* rstd, void* dx, void* dw_partial,
                      int64_t rows, int64_t n, int x_dtype, int weight_dtype, int dy_dtype, double offset,
                      int casting_mode, int64_t num_partials, cudaStream_t stream, int device) {
  check_weight_dtype(weight_dtype);
#define PFP_RMS_BWD(TX, TDY)                                                                                 \
  launch_backward<TX, TDY>(dy, x, weight, weight_dtype, rstd, dx, dw_partial, rows, n, offset, casting_mode, \
                           num_partials, stream, device)
  if (x_dtype == dy_dtype) {
    switch (x_dtype) {
      case kFloat32: PFP_RMS_BWD(float, float); return;
      case kFloat16: PFP_RMS_BWD(__half, __half); return;
      case kBFloat16: PFP_RMS_BWD(__nv_bfloat16, __nv_bfloat16); return;
      case kFloat64: PFP_RMS_BWD(double, double); return;
    }
  } else if (dy_dtype == kFloat32) {
    switch (x_dtype) {
      case kFloat16: PFP_RMS_BWD(__half, float); return;
      case kBFloat16: PFP_RMS_BWD(__nv_bfloat16, float); return;
    }
  }
#undef PFP_RMS_BWD
  unsupported("backward");
}

}  // namespace pfp_cuda
