// NF4 / FP4 (QLoRA 4-bit) on CUDA: blockwise quantization, dequantization, fused dequant-GEMV.
//
// Format (bitsandbytes'; pyfastpeft/reference/nf4.py is the oracle, csrc/cpu/nf4.cpp the CPU twin): W flattened
// row-major, n elements, blocks of `blocksize` consecutive elements (a block may span rows; the last one may be
// partial):
//   absmax[b] = max |w| over block b                                  fp32 [ceil(n / blocksize)]
//   q[i]      = index of the code nearest w[i] / absmax[b]            4 bits, code = fp32 table [16]
//   packed[j] = q[2j] << 4 | q[2j+1]                                  uint8 [(n + 1) / 2]
//   w_hat[i]  = code[q[i]] * absmax[i / blocksize]                    fp32, rounded once to the output
// Quantization rounds exactly as the reference:
//   full block:    s = w * (1 / max(absmax, 1e-38));  partial last block: s = w / max(absmax, 1e-38), and the
//                  partial block stores the clamped absmax;  then s = clamp(s, -1, 1) (NaN stays NaN)
//   nearest code:  order[#{p : !(midpoints[p] >= s)}] over the fp32 midpoints of the code sorted ascending (a tie
//                  takes the lower code, NaN counts above every midpoint); absmax is NaN when its block holds a
//                  NaN (torch's amax)
//   odd n:         the missing last element quantizes as 0.0.
// The divisions are IEEE (nvcc's default -prec-div=true; this file must not be built with --use_fast_math, which
// would also flush the subnormal 1e-38 to zero).
//
// Mapping (256-thread blocks, grid-stride loops, int64 indexing):
//   quantize    one warp per block of W; lane l takes the element pairs (2j, 2j + 1), j = l, l + 32, ..., so each
//               lane writes whole bytes; the block's absmax by warp shuffles, its NaN flag by __any_sync.
//   dequantize  a thread decodes 4 packed bytes (one 32-bit load) into 8 outputs stored as one pack (16 bytes for
//               fp16/bf16) when packed is 4-byte and out 8-element aligned; the 8 elements from an 8-aligned start
//               share one block (blocksize a power of two >= 8), so one absmax load. Leftovers one by one.
//   gemv        out[r, j] = sum_c x[r, c] * w_hat[j*k + c] (+ bias[j]) for m <= 8 rows: one warp per output
//               feature j, fp32 sums per lane for all m rows, then a warp-shuffle reduction. Fast path when row j's
//               bytes are 16-byte aligned (k % 32 == 0, packed 16-byte aligned), blocksize >= 32 and x is aligned
//               for packs of 8: lane l loads the 16 bytes (32 weights, all in one block since their flat start is
//               a multiple of 32) at columns 32 * (l + 32 i), and x in packs of 8. Otherwise (odd k: rows that
//               start mid-byte; blocks straddling rows; unaligned pointers) lane l takes columns l, l + 32, ...,
//               each weight found by its flat index j*k + c.
#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

namespace pfp_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kBlocksPerSm = 8;
constexpr int kCodes = 16;
constexpr int kMaxGemvRows = 8;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float clamp_unit(float s) { return s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s); }

__device__ __forceinline__ uint32_t nearest_code(float s, const float* midpoints, const int32_t* order) {
  int position = 0;
#pragma unroll
  for (int p = 0; p + 1 < kCodes; ++p) position += !(midpoints[p] >= s);
  return uint32_t(order[position]);
}

// The code table into shared memory; every thread of the block calls it before any lookup.
__device__ __forceinline__ void load_table(const float* code, float* table) {
  if (threadIdx.x < kCodes) table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
}

// w_hat[e] in fp32, found by its flat index.
__device__ __forceinline__ float weight_at(const uint8_t* packed, const float* absmax, const float* table, int64_t e,
                                           int blocksize_log2) {
  const uint32_t byte = packed[e >> 1];
  const uint32_t nibble = (e & 1) ? (byte & 15u) : (byte >> 4);
  return table[nibble] * absmax[e >> blocksize_log2];
}

__device__ __forceinline__ float load_as_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kFloat64: return float(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    nf4_quantize_kernel(const T* __restrict__ w, uint8_t* __restrict__ packed, float* __restrict__ absmax,
                        const float* __restrict__ midpoints_in, const int32_t* __restrict__ order_in, int64_t numel,
                        int64_t blocksize) {
  __shared__ float midpoints[kCodes - 1];
  __shared__ int32_t order[kCodes];
  if (threadIdx.x < kCodes - 1) midpoints[threadIdx.x] = midpoints_in[threadIdx.x];
  if (threadIdx.x < kCodes) order[threadIdx.x] = order_in[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  // The loop bound depends on the warp only, so every lane takes part in the shuffles.
  for (int64_t block = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; block < nblocks;
       block += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t first = block * blocksize;
    const int64_t len = numel - first < blocksize ? numel - first : blocksize;
    float amax = 0.0f;
    bool nan_seen = false;
    for (int64_t i = lane; i < len; i += 32) {
      const float magnitude = fabsf(to_compute<float>(w[first + i]));
      amax = fmaxf(amax, magnitude);
      nan_seen |= magnitude != magnitude;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, offset));
    if (__any_sync(kFullMask, nan_seen)) amax = __int_as_float(0x7fc00000);
    const float divisor = amax < 1e-38f ? 1e-38f : amax;  // NaN stays NaN
    const bool full = len == blocksize;
    const float inverse = 1.0f / divisor;
    if (lane == 0) absmax[block] = full ? amax : divisor;
    for (int64_t pair = lane; 2 * pair < len; pair += 32) {
      uint32_t q[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = 2 * pair + h;
        float s = 0.0f;  // the padding element of an odd numel is a scaled 0.0
        if (i < len) {
          const float v = to_compute<float>(w[first + i]);
          s = clamp_unit(full ? v * inverse : v / divisor);
        }
        q[h] = nearest_code(s, midpoints, order);
      }
      packed[first / 2 + pair] = uint8_t(q[0] << 4 | q[1]);
    }
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                          const float* __restrict__ code, T* __restrict__ out, int64_t numel, int blocksize_log2) {
  __shared__ float table[kCodes];
  load_table(code, table);
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (kVector) {
    const int64_t groups = numel / 8;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
    for (int64_t g = first; g < groups; g += stride) {
      const uint32_t word = words[g];  // bytes 4g .. 4g+3, the first in the low byte
      const float scale = absmax[(8 * g) >> blocksize_log2];
      float values[8];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (word >> (8 * b)) & 0xffu;
        values[2 * b] = table[byte >> 4] * scale;
        values[2 * b + 1] = table[byte & 15u] * scale;
      }
      store_vec(out + 8 * g, values);
    }
    done = groups * 8;
  }
  for (int64_t e = done + first; e < numel; e += stride)
    out[e] = from_compute<T>(compute_t<T>(weight_at(packed, absmax, table, e, blocksize_log2)));
}

template <typename T, int M, bool kFast>
__global__ void __launch_bounds__(kThreads)
    nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                    const float* __restrict__ code, const void* __restrict__ bias, int bias_dtype, T* __restrict__ out,
                    int64_t n, int64_t k, int blocksize_log2) {
  __shared__ float table[kCodes];
  load_table(code, table);
  const int lane = threadIdx.x % 32;
  // The loop bound depends on the warp only, so every lane takes part in warp_sum.
  for (int64_t j = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; j < n;
       j += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t row_first = j * k;
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; ++r) acc[r] = 0.0f;
    if (kFast) {
      const uint4* row_bytes = reinterpret_cast<const uint4*>(packed + row_first / 2);
      const int64_t chunks = k / 32;
      for (int64_t chunk = lane; chunk < chunks; chunk += 32) {
        const uint4 raw = row_bytes[chunk];
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
        const float scale = absmax[(row_first + 32 * chunk) >> blocksize_log2];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float weights[8];
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const uint32_t byte = (words[q] >> (8 * b)) & 0xffu;
            weights[2 * b] = table[byte >> 4] * scale;
            weights[2 * b + 1] = table[byte & 15u] * scale;
          }
          const int64_t col = 32 * chunk + 8 * q;
#pragma unroll
          for (int r = 0; r < M; ++r) {
            float xv[8];
            load_vec(x + r * k + col, xv);
#pragma unroll
            for (int t = 0; t < 8; ++t) acc[r] = fmaf(weights[t], xv[t], acc[r]);
          }
        }
      }
    } else {
      for (int64_t col = lane; col < k; col += 32) {
        const float weight = weight_at(packed, absmax, table, row_first + col, blocksize_log2);
#pragma unroll
        for (int r = 0; r < M; ++r) acc[r] = fmaf(weight, to_compute<float>(x[r * k + col]), acc[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < M; ++r) acc[r] = warp_sum(acc[r]);
    if (lane == 0) {
      const float bias_j = bias ? load_as_float(bias, bias_dtype, j) : 0.0f;
#pragma unroll
      for (int r = 0; r < M; ++r) out[r * n + j] = from_compute<T>(acc[r] + bias_j);
    }
  }
}

// Blocks for a grid-stride loop over `items` (threads or warps, `per_block` of them a block): enough to cover
// them, at most kBlocksPerSm per SM.
unsigned grid_for(int64_t items, int64_t per_block, int device) {
  int sms = 0;
  PFP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return grid_blocks(std::max<int64_t>(1, std::min<int64_t>(div_up(items, per_block), int64_t(sms) * kBlocksPerSm)));
}

int log2_of(int64_t power_of_two) {
  int shift = 0;
  while ((int64_t(1) << shift) < power_of_two) ++shift;
  return shift;
}

template <typename T>
void launch_quantize(const void* w, uint8_t* packed, float* absmax, int64_t numel, int64_t blocksize,
                     const float* midpoints, const int32_t* order, cudaStream_t stream, int device) {
  DeviceGuard guard(device);
  nf4_quantize_kernel<T><<<grid_for(div_up(numel, blocksize), kWarpsPerBlock, device), kThreads, 0, stream>>>(
      static_cast<const T*>(w), packed, absmax, midpoints, order, numel, blocksize);
  PFP_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_dequantize(const uint8_t* packed, const float* absmax, const float* code, void* out, int64_t numel,
                       int64_t blocksize, cudaStream_t stream, int device) {
  DeviceGuard guard(device);
  const bool vectorize = is_aligned(packed, 4) && is_aligned(out, 8 * sizeof(T));
  auto kernel = vectorize ? nf4_dequantize_kernel<T, true> : nf4_dequantize_kernel<T, false>;
  kernel<<<grid_for(vectorize ? div_up(numel, 8) : numel, kThreads, device), kThreads, 0, stream>>>(
      packed, absmax, code, static_cast<T*>(out), numel, log2_of(blocksize));
  PFP_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int M>
void launch_gemv_rows(const T* x, const uint8_t* packed, const float* absmax, const float* code, const void* bias,
                      int bias_dtype, T* out, int64_t n, int64_t k, int64_t blocksize, cudaStream_t stream,
                      int device) {
  const bool fast = k % 32 == 0 && blocksize >= 32 && is_aligned(packed, 16) && is_aligned(x, 8 * sizeof(T));
  auto kernel = fast ? nf4_gemv_kernel<T, M, true> : nf4_gemv_kernel<T, M, false>;
  kernel<<<grid_for(n, kWarpsPerBlock, device), kThreads, 0, stream>>>(x, packed, absmax, code, bias, bias_dtype, out,
                                                                       n, k, log2_of(blocksize));
  PFP_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_gemv(const void* x, const uint8_t* packed, const float* absmax, const float* code, const void* bias,
                 int bias_dtype, void* out, int64_t m, int64_t n, int64_t k, int64_t blocksize, cudaStream_t stream,
                 int device) {
  DeviceGuard guard(device);
  const T* x_typed = static_cast<const T*>(x);
  T* out_typed = static_cast<T*>(out);
#define PFP_NF4_GEMV_ROWS(M)                                                                                           \
  case M:                                                                                                              \
    return launch_gemv_rows<T, M>(x_typed, packed, absmax, code, bias, bias_dtype, out_typed, n, k, blocksize, stream, \
                                  device)
  switch (m) {
    PFP_NF4_GEMV_ROWS(1);
    PFP_NF4_GEMV_ROWS(2);
    PFP_NF4_GEMV_ROWS(3);
    PFP_NF4_GEMV_ROWS(4);
    PFP_NF4_GEMV_ROWS(5);
    PFP_NF4_GEMV_ROWS(6);
    PFP_NF4_GEMV_ROWS(7);
    PFP_NF4_GEMV_ROWS(8);
  }
#undef PFP_NF4_GEMV_ROWS
  throw std::invalid_argument("nf4_gemv: m must be in [1, " + std::to_string(kMaxGemvRows) + "], got " +
                              std::to_string(m));
}

}  // namespace

// nf4_quantize: packed[(numel + 1) / 2] and absmax[ceil(numel / blocksize)] of w[numel] (w_dtype any of the four;
// fp64 is rounded to fp32 first), byte for byte pyfastpeft.reference.nf4.quantize_4bit. midpoints: fp32 [15], the
// midpoints of the code sorted ascending (stable); order: int32 [16], sorted position -> code index (both from
// pyfastpeft.reference.nf4.search_tables). blocksize even. All contiguous, on `device`.
void nf4_quantize(const void* w, int w_dtype, uint8_t* packed, float* absmax, int64_t numel, int64_t blocksize,
                  const float* midpoints, const int32_t* order, cudaStream_t stream, int device) {
  if (numel == 0) return;
#define PFP_NF4_QUANTIZE(T) launch_quantize<T>(w, packed, absmax, numel, blocksize, midpoints, order, stream, device)
  switch (w_dtype) {
    case kFloat32: return PFP_NF4_QUANTIZE(float);
    case kFloat16: return PFP_NF4_QUANTIZE(__half);
    case kBFloat16: return PFP_NF4_QUANTIZE(__nv_bfloat16);
    case kFloat64: return PFP_NF4_QUANTIZE(double);
  }
#undef PFP_NF4_QUANTIZE
  throw std::invalid_argument("nf4_quantize: unsupported dtype code " + std::to_string(w_dtype));
}

// nf4_dequantize: out[i] = code[q[i]] * absmax[i / blocksize] for i in [0, numel), in fp32, rounded once to
// out_dtype (any of the four). packed: uint8 [(numel + 1) / 2]; absmax: fp32 [ceil(numel / blocksize)], de-nested;
// code: fp32 [16]; blocksize a power of two >= 8. All contiguous, on `device`.
void nf4_dequantize(const uint8_t* packed, const float* absmax, const float* code, void* out, int out_dtype,
                    int64_t numel, int64_t blocksize, cudaStream_t stream, int device) {
  if (numel == 0) return;
  switch (out_dtype) {
    case kFloat32: return launch_dequantize<float>(packed, absmax, code, out, numel, blocksize, stream, device);
    case kFloat16: return launch_dequantize<__half>(packed, absmax, code, out, numel, blocksize, stream, device);
    case kBFloat16:
      return launch_dequantize<__nv_bfloat16>(packed, absmax, code, out, numel, blocksize, stream, device);
    case kFloat64: return launch_dequantize<double>(packed, absmax, code, out, numel, blocksize, stream, device);
  }
  throw std::invalid_argument("nf4_dequantize: unsupported dtype code " + std::to_string(out_dtype));
}

// nf4_gemv: out[m, n] = x[m, k] @ w_hat[n, k]^T (+ bias[n]), fp32 sums, 1 <= m <= 8.
// x, out: row-major, x_dtype fp32, fp16 or bf16 (out the same); bias: [n] of bias_dtype (any of the four) or null;
// packed: uint8 [(n*k + 1) / 2] (row j starts mid-byte when j*k is odd); absmax: fp32 [ceil(n*k / blocksize)],
// de-nested; code: fp32 [16]; blocksize a power of two >= 8. All contiguous, on `device`; n, k >= 1.
void nf4_gemv(const void* x, int x_dtype, const uint8_t* packed, const float* absmax, const float* code,
              const void* bias, int bias_dtype, void* out, int64_t m, int64_t n, int64_t k, int64_t blocksize,
              cudaStream_t stream, int device) {
  switch (x_dtype) {
    case kFloat32:
      return launch_gemv<float>(x, packed, absmax, code, bias, bias_dtype, out, m, n, k, blocksize, stream, device);
    case kFloat16:
      return launch_gemv<__half>(x, packed, absmax, code, bias, bias_dtype, out, m, n, k, blocksize, stream, device);
    case kBFloat16:
      return launch_gemv<__nv_bfloat16>(x, packed, absmax, code, bias, bias_dtype, out, m, n, k, blocksize, stream,
                                        device);
  }
  throw std::invalid_argument("nf4_gemv: unsupported x dtype code " + std::to_string(x_dtype));
}

}  // namespace pfp_cuda
