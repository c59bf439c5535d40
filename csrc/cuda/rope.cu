// Rotary position embedding (RoPE) on CUDA: the math of csrc/cpu/rope.cpp, q and k in one launch.
//
// One head row x[0:D] with cos/sin rows c, s of width R (R <= D, even): channels [0, R) rotate,
// [R, D) pass through. Each rotation acts on a pair (lo, hi): lo = i, hi = i + R/2 (HF rotate_half)
// or lo = 2j, hi = 2j + 1 (GPT-J interleaved), for i, j < R/2:
//   forward : y[lo] = x[lo]*c[lo] - x[hi]*s[lo]      y[hi] = x[hi]*c[hi] + x[lo]*s[hi]
//   backward: y[lo] = x[lo]*c[lo] + x[hi]*s[hi]      y[hi] = x[hi]*c[hi] - x[lo]*s[lo]
// (backward is the transpose of the forward's 2x2 rotations), written as
// y[lo] = x[lo]*c[lo] + x[hi]*p_lo, y[hi] = x[hi]*c[hi] + x[lo]*p_hi with p from s and the direction, each
// product and the sum rounded once (products_sum, no fused multiply-add): transformers' q * cos + rotate_half(q) * sin
// and autograd's two gradient terms round so, and fp32 then gives their bits, as the CPU kernels do.
//
// Mapping: one block per (batch, position) pair (grid-stride); threadIdx.x walks the work of one
// head row (R/2 pairs, then the D - R pass-through channels), threadIdx.y the q_heads + k_heads
// rows, so a thread loads its cos/sin once and reuses them for every head it visits. Compute in
// fp32 (fp64 for fp64); pass-through channels are copied unchanged.
#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

#include <type_traits>

namespace pfp_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxThreadsX = 128;

struct Strides {  // in elements
  int64_t batch, head, pos;
};

template <typename T>
struct RopeArgs {
  const T* q;
  const T* k;
  T* q_out;
  T* k_out;
  const T* cos;
  const T* sin;
  Strides q_strides, k_strides, q_out_strides, k_out_strides;
  int64_t cos_batch_stride, cos_seq_stride, batch, seq, q_heads, k_heads, head_dim, rot_dim;
  bool interleaved, backward;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kernel(const RopeArgs<T> a) {
  using C = compute_t<T>;
  const int64_t half_rot = a.rot_dim / 2;
  const int64_t per_head = half_rot + (a.head_dim - a.rot_dim);
  const int64_t heads = a.q_heads + a.k_heads;
  for (int64_t item = blockIdx.x; item < a.batch * a.seq; item += gridDim.x) {
    const int64_t b = item / a.seq, s = item % a.seq;
    // The row of head h at this (batch, position): q for h < q_heads, then k.
    auto row = [&](auto* base_q, auto* base_k, const Strides& qs, const Strides& ks, int64_t h) {
      return h < a.q_heads ? base_q + b * qs.batch + h * qs.head + s * qs.pos
                           : base_k + b * ks.batch + (h - a.q_heads) * ks.head + s * ks.pos;
    };
    const int64_t cs_off = b * a.cos_batch_stride + s * a.cos_seq_stride;
    for (int64_t j = threadIdx.x; j < per_head; j += blockDim.x) {
      if (j < half_rot) {
        const int64_t lo = a.interleaved ? 2 * j : j, hi = a.interleaved ? 2 * j + 1 : j + half_rot;
        const C c_lo = to_compute<C>(a.cos[cs_off + lo]), c_hi = to_compute<C>(a.cos[cs_off + hi]);
        const C s_lo = to_compute<C>(a.sin[cs_off + lo]), s_hi = to_compute<C>(a.sin[cs_off + hi]);
        const C p_lo = a.backward ? s_hi : -s_lo, p_hi = a.backward ? -s_lo : s_hi;
        for (int64_t h = threadIdx.y; h < heads; h += blockDim.y) {
          const T* src = row(a.q, a.k, a.q_strides, a.k_strides, h);
          T* dst = row(a.q_out, a.k_out, a.q_out_strides, a.k_out_strides, h);
          const C x_lo = to_compute<C>(src[lo]), x_hi = to_compute<C>(src[hi]);
          dst[lo] = from_compute<T>(products_sum(x_lo, c_lo, x_hi, p_lo));
          dst[hi] = from_compute<T>(products_sum(x_hi, c_hi, x_lo, p_hi));
        }
      } else {
        const int64_t i = a.rot_dim + (j - half_rot);
        for (int64_t h = threadIdx.y; h < heads; h += blockDim.y)
          row(a.q_out, a.k_out, a.q_out_strides, a.k_out_strides, h)[i] = row(a.q, a.k, a.q_strides, a.k_strides, h)[i];
      }
    }
  }
}

template <typename T>
void launch(const void* q, const void* k, void* q_out, void* k_out, const void* cos, const void* sin,
            const int64_t* q_strides, const int64_t* k_strides, const int64_t* q_out_strides,
            const int64_t* k_out_strides, int64_t cos_batch_stride, int64_t cos_seq_stride, int64_t batch, int64_t seq,
            int64_t q_heads, int64_t k_heads, int64_t head_dim, int64_t rot_dim, bool interleaved, bool backward,
            cudaStream_t stream, int device) {
  const int64_t positions = batch * seq, heads = q_heads + k_heads;
  const int64_t per_head = rot_dim / 2 + (head_dim - rot_dim);
  if (positions == 0 || heads == 0 || per_head == 0) return;
  DeviceGuard guard(device);
  auto strides = [](const int64_t* st) { return Strides{st[0], st[1], st[2]}; };
  const RopeArgs<T> args{static_cast<const T*>(q),
                         static_cast<const T*>(k),
                         static_cast<T*>(q_out),
                         static_cast<T*>(k_out),
                         static_cast<const T*>(cos),
                         static_cast<const T*>(sin),
                         strides(q_strides),
                         strides(k_strides),
                         strides(q_out_strides),
                         strides(k_out_strides),
                         cos_batch_stride,
                         cos_seq_stride,
                         batch,
                         seq,
                         q_heads,
                         k_heads,
                         head_dim,
                         rot_dim,
                         interleaved,
                         backward};
  const int threads_x = block_threads(per_head, kMaxThreadsX);
  const int threads_y = int(std::min<int64_t>(kThreads / threads_x, heads));
  rope_kernel<T><<<grid_blocks(positions), dim3(threads_x, threads_y), 0, stream>>>(args);
  PFP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// rope: q_out = rope(q), k_out = rope(k) (backward=true applies the transpose, for gradients).
// q: [batch, q_heads, seq, head_dim] at element strides q_strides[0..2] (batch, head, position),
// last dim contiguous; k likewise with k_heads (k_heads may differ: GQA); outputs have their own
// strides and may not alias the inputs. cos, sin: [*, seq, rot_dim], same strides, row at
// b * cos_batch_stride + s * cos_seq_stride (cos_batch_stride 0 broadcasts one table over the batch),
// last dim contiguous; rot_dim even and <= head_dim. All tensors one dtype (pfp_cuda::DType), on `device`.
void rope(const void* q, const void* k, void* q_out, void* k_out, const void* cos, const void* sin,
          pfp::Strides3 q_strides, pfp::Strides3 k_strides, pfp::Strides3 q_out_strides, pfp::Strides3 k_out_strides,
          int64_t cos_batch_stride, int64_t cos_seq_stride, int64_t batch, int64_t seq, int64_t q_heads,
          int64_t k_heads, int64_t head_dim, int64_t rot_dim, int dtype, bool interleaved, bool backward,
          cudaStream_t stream, int device) {
  dispatch_float(dtype, "rope", [&](auto* tag) {
    launch<std::remove_pointer_t<decltype(tag)>>(q, k, q_out, k_out, cos, sin, q_strides.data(), k_strides.data(),
                                                 q_out_strides.data(), k_out_strides.data(), cos_batch_stride,
                                                 cos_seq_stride, batch, seq, q_heads, k_heads, head_dim, rot_dim,
                                                 interleaved, backward, stream, device);
  });
}

}  // namespace pfp_cuda
