// Shared pieces of the CUDA kernels: dtype codes, conversions between storage and compute types,
// 16-byte packs, warp/block sums, launch-size helpers, error checking and the device guard.
// Torch-free like csrc/cpu/common.h: kernels see raw pointers, sizes and a cudaStream_t.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "native_types.h"

// Throws std::runtime_error naming the failed call (pybind11 raises it as RuntimeError); never exits.
#define PFP_CUDA_CHECK(expr)                                                                            \
  do {                                                                                                  \
    const cudaError_t pfp_status_ = (expr);                                                             \
    if (pfp_status_ != cudaSuccess) pfp_cuda::throw_cuda_error(pfp_status_, #expr, __FILE__, __LINE__); \
  } while (0)

namespace pfp_cuda {

using pfp::DType;  // csrc/native_types.h: the dtype codes of both modules
using pfp::kBFloat16;
using pfp::kFloat16;
using pfp::kFloat32;
using pfp::kFloat64;

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* expr, const char* file, int line) {
  throw std::runtime_error(std::string("pyfastpeft CUDA error: ") + cudaGetErrorString(status) + " (" + expr + " at " +
                           file + ":" + std::to_string(line) + ")");
}

// Makes `device` current for the guard's lifetime, then restores the device that was current before.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    PFP_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device_ != previous_) PFP_CUDA_CHECK(cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (device_ != previous_) (void)cudaSetDevice(previous_);  // a destructor must not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

// ---- launch sizes (host) ----------------------------------------------------------------------

constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit; kernels stride past it

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads for a block that strides over `work` items: a multiple of 32 in [32, max_threads].
inline int block_threads(int64_t work, int max_threads) {
  return int(std::min<int64_t>(std::max<int64_t>(div_up(work, 32) * 32, 32), max_threads));
}

// gridDim.x for `blocks` blocks of work (>= 1) under a grid-stride loop.
inline unsigned grid_blocks(int64_t blocks) { return unsigned(std::min(blocks, kMaxGridX)); }

inline bool is_aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0; }

// ---- storage type <-> compute type (device) ---------------------------------------------------

// Storage type T: its compute type (fp32, fp64 for fp64) and the conversions, round-to-nearest-even.
template <typename T>
struct Scalar;
template <>
struct Scalar<float> {
  using Compute = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Scalar<__half> {
  using Compute = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Scalar<__nv_bfloat16> {
  using Compute = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Scalar<double> {
  using Compute = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <typename T>
using compute_t = typename Scalar<T>::Compute;

// v in the compute type C (exact, except fp64 -> fp32, which rounds to nearest).
template <typename C, typename T>
__device__ __forceinline__ C to_compute(T v) {
  return C(Scalar<T>::load(v));
}
// v stored as T.
template <typename T>
__device__ __forceinline__ T from_compute(compute_t<T> v) {
  return Scalar<T>::store(v);
}
// The value v takes once stored as T and read back (emulates a cast to T between two fp32 steps).
template <typename T>
__device__ __forceinline__ compute_t<T> round_to(compute_t<T> v) {
  return Scalar<T>::load(Scalar<T>::store(v));
}

// Correctly rounded sqrt and accurate exp in the compute type (nvcc's default -prec-sqrt=true).
__device__ __forceinline__ float sqrt_c(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_c(double v) { return sqrt(v); }
__device__ __forceinline__ float exp_c(float v) { return expf(v); }
__device__ __forceinline__ double exp_c(double v) { return exp(v); }

// a * b + c * d with each product and the sum rounded once, as torch's eager ops round them: the _rn intrinsics are
// never contracted into a fused multiply-add, which nvcc does to plain expressions by default (-fmad=true).
__device__ __forceinline__ float products_sum(float a, float b, float c, float d) {
  return __fadd_rn(__fmul_rn(a, b), __fmul_rn(c, d));
}
__device__ __forceinline__ double products_sum(double a, double b, double c, double d) {
  return __dadd_rn(__dmul_rn(a, b), __dmul_rn(c, d));
}

// ---- packs: N consecutive elements moved as one 16- (or 32-) byte access ----------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// out[k] = p[k] for k < N, in the compute type; p must be aligned to N * sizeof(T).
template <typename T, typename C, int N>
__device__ __forceinline__ void load_vec(const T* p, C (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_compute<C>(pack.v[k]);
}

// p[k] = in[k] for k < N, rounded to T; p must be aligned to N * sizeof(T).
template <typename T, typename C, int N>
__device__ __forceinline__ void store_vec(T* p, const C (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = from_compute<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// ---- reductions (fixed order, so results are deterministic) ----------------------------------

// op(v) over the 32 lanes of a warp, returned to every lane; op is a commutative, associative functor.
template <typename C, typename Op>
__device__ __forceinline__ C warp_reduce(C v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// op(v) over a 1-D block whose size is a multiple of 32, returned to every thread (`identity` fills the
// missing warps). Every thread of the block must call it (it synchronizes); it may be called again right
// away. Each (C, Op) pair has its own static shared array of 32 partials.
template <typename C, typename Op>
__device__ __forceinline__ C block_reduce(C v, Op op, C identity) {
  __shared__ C partials[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce(v, op);
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x / 32) ? partials[lane] : identity;
  v = warp_reduce(v, op);
  __syncthreads();  // partials is free for the next call
  return v;
}

struct Plus {
  template <typename C>
  __device__ __forceinline__ C operator()(C a, C b) const {
    return a + b;
  }
};

template <typename C>
__device__ __forceinline__ C warp_sum(C v) {
  return warp_reduce(v, Plus{});
}
template <typename C>
__device__ __forceinline__ C block_sum(C v) {
  return block_reduce(v, Plus{}, C(0));
}

// dispatch_dtype over the CUDA kernels' storage types (csrc/native_types.h).
template <typename Body>
void dispatch_float(int dtype, const char* what, Body&& body) {
  pfp::dispatch_dtype<__half, __nv_bfloat16>(dtype, what, static_cast<Body&&>(body));
}

}  // namespace pfp_cuda
