// SwiGLU forward and backward on CUDA: the math of csrc/cpu/swiglu.cpp, elementwise over flat buffers.
//
// forward:   s = sigmoid(g) = 1 / (1 + exp(-g)),   y = g * s * u
// backward:  du = dy * g * s,   dg = dy * u * s * (1 + g * (1 - s))
// (the activation is recomputed from g in backward, never saved). Compute in fp32 (fp64 for fp64)
// with expf (accurate, not __expf), one rounding at the store.
//
// Mapping: grid-stride loop, 256 threads per block, at most 8 blocks per SM (2048 threads, the most
// an SM holds). A thread moves packs of V = 16 bytes (8 fp16/bf16, 4 fp32, 2 fp64) when every
// pointer is 16-byte aligned, else single elements; the numel % V leftover elements go to the first
// threads. int64 indexing throughout (numel may exceed 2^31).
#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

#include <type_traits>

namespace pfp_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;

template <typename C>
__device__ __forceinline__ C sigmoid(C g) {
  return C(1) / (C(1) + exp_c(-g));
}

template <int N, typename T>
__device__ __forceinline__ void forward_pack(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                                             int64_t i) {
  using C = compute_t<T>;
  C g[N], u[N];
  load_vec(gate + i, g);
  load_vec(up + i, u);
#pragma unroll
  for (int k = 0; k < N; ++k) g[k] = g[k] * sigmoid(g[k]) * u[k];
  store_vec(out + i, g);
}

template <int N, typename T>
__device__ __forceinline__ void backward_pack(const T* __restrict__ dy, const T* __restrict__ gate,
                                              const T* __restrict__ up, T* __restrict__ dgate, T* __restrict__ dup,
                                              int64_t i) {
  using C = compute_t<T>;
  C d[N], g[N], u[N];
  load_vec(dy + i, d);
  load_vec(gate + i, g);
  load_vec(up + i, u);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const C s = sigmoid(g[k]);
    const C dyu = d[k] * u[k];
    u[k] = d[k] * g[k] * s;                       // du
    g[k] = dyu * s * (C(1) + g[k] * (C(1) - s));  // dg
  }
  store_vec(dgate + i, g);
  store_vec(dup + i, u);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t numel) {
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t packs = numel / V;
  for (int64_t p = first; p < packs; p += stride) forward_pack<V>(gate, up, out, p * V);
  const int64_t tail = packs * V + first;
  if (tail < numel) forward_pack<1>(gate, up, out, tail);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ gate, const T* __restrict__ up,
                           T* __restrict__ dgate, T* __restrict__ dup, int64_t numel) {
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t packs = numel / V;
  for (int64_t p = first; p < packs; p += stride) backward_pack<V>(dy, gate, up, dgate, dup, p * V);
  const int64_t tail = packs * V + first;
  if (tail < numel) backward_pack<1>(dy, gate, up, dgate, dup, tail);
}

// Blocks for a grid-stride loop over `items`: enough to cover them, at most kBlocksPerSm per SM.
unsigned grid_for(int64_t items, int device) {
  int sms = 0;
  PFP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return grid_blocks(std::max<int64_t>(1, std::min<int64_t>(div_up(items, kThreads), int64_t(sms) * kBlocksPerSm)));
}

template <typename T>
void launch_forward(const void* gate, const void* up, void* out, int64_t numel, cudaStream_t stream, int device) {
  if (numel == 0) return;
  DeviceGuard guard(device);
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorize = is_aligned(gate, 16) && is_aligned(up, 16) && is_aligned(out, 16);
  auto kernel = vectorize ? swiglu_forward_kernel<T, kVec> : swiglu_forward_kernel<T, 1>;
  kernel<<<grid_for(vectorize ? numel / kVec : numel, device), kThreads, 0, stream>>>(
      static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), numel);
  PFP_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t numel,
                     cudaStream_t stream, int device) {
  if (numel == 0) return;
  DeviceGuard guard(device);
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorize =
      is_aligned(dy, 16) && is_aligned(gate, 16) && is_aligned(up, 16) && is_aligned(dgate, 16) && is_aligned(dup, 16);
  auto kernel = vectorize ? swiglu_backward_kernel<T, kVec> : swiglu_backward_kernel<T, 1>;
  kernel<<<grid_for(vectorize ? numel / kVec : numel, device), kThreads, 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(dgate),
      static_cast<T*>(dup), numel);
  PFP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// swiglu_forward: out[numel] = silu(gate) * up; gate, up, out contiguous on `device`, one dtype
// (pfp_cuda::DType); out aliases neither input.
void swiglu_forward(const void* gate, const void* up, void* out, int64_t numel, int dtype, cudaStream_t stream,
                    int device) {
  dispatch_float(dtype, "swiglu_forward", [&](auto* tag) {
    launch_forward<std::remove_pointer_t<decltype(tag)>>(gate, up, out, numel, stream, device);
  });
}

// swiglu_backward: dgate, dup [numel] from dy, gate, up [numel]; all contiguous on `device`, one
// dtype; the outputs alias no input.
void swiglu_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t numel, int dtype,
                     cudaStream_t stream, int device) {
  dispatch_float(dtype, "swiglu_backward", [&](auto* tag) {
    launch_backward<std::remove_pointer_t<decltype(tag)>>(dy, gate, up, dgate, dup, numel, stream, device);
  });
}

}  // namespace pfp_cuda
