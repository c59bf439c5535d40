// Rotary position embedding (RoPE) on the CPU: q and k in one pass over the (batch, position) pairs.
//
// One head row x[0:D] with cos/sin rows c, s of width R (R <= D, even): channels [0, R) rotate,
// [R, D) pass through. With h = R/2 (HF rotate_half layout):
//   forward : y[i]   = x[i]*c[i]     - x[i+h]*s[i]         y[i+h] = x[i+h]*c[i+h] + x[i]*s[i+h]
//   backward: dx[i]  = dy[i]*c[i]    + dy[i+h]*s[i+h]      dx[i+h] = dy[i+h]*c[i+h] - dy[i]*s[i]
// (backward is the transpose of the forward's 2x2 rotations). GPT-J interleaved layout pairs
// (2j, 2j+1) the same way. Both are written as y[i] = x[i]*c[i] + x[partner(i)]*p[i] with p built
// once per (batch, position) from s and the direction.
#include "cpu/common.h"
#include "cpu/kernels.h"

#include <stdexcept>
#include <vector>

namespace PFP_ISA {
namespace {

using pfp::bf16;
using pfp::half;

template <typename T>
void rope_impl(const T* q, const T* k, T* q_out, T* k_out, const T* cos, const T* sin, const int64_t* qs,
               const int64_t* ks, const int64_t* qos, const int64_t* kos, int64_t cos_batch_stride,
               int64_t cos_seq_stride, int64_t batch, int64_t seq, int64_t q_heads, int64_t k_heads,
               int64_t head_dim, int64_t rot_dim, bool interleaved, bool backward, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  const int64_t half_rot = rot_dim / 2;
  pfp::parallel_for(batch * seq, (q_heads + k_heads) * head_dim * 2, nthreads, [&](int64_t begin, int64_t end, int) {
    std::vector<C> cbuf(rot_dim), sbuf(rot_dim), pbuf(rot_dim), xbuf(head_dim), ybuf(head_dim);
    C* c = cbuf.data();
    C* p = pbuf.data();
    C* xb = xbuf.data();
    C* yb = ybuf.data();
    auto rotate_row = [&](const T* src, T* dst) {
      pfp::load_row(src, xb, head_dim);
      if (interleaved) {
        for (int64_t j = 0; j < half_rot; ++j) {
          yb[2 * j] = xb[2 * j] * c[2 * j] + xb[2 * j + 1] * p[2 * j];
          yb[2 * j + 1] = xb[2 * j + 1] * c[2 * j + 1] + xb[2 * j] * p[2 * j + 1];
        }
      } else {
        for (int64_t i = 0; i < half_rot; ++i) yb[i] = xb[i] * c[i] + xb[i + half_rot] * p[i];
        for (int64_t i = 0; i < half_rot; ++i)
          yb[i + half_rot] = xb[i + half_rot] * c[i + half_rot] + xb[i] * p[i + half_rot];
      }
      for (int64_t i = rot_dim; i < head_dim; ++i) yb[i] = xb[i];
      pfp::store_row(yb, dst, head_dim);
    };
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / seq, s_pos = item % seq;
      const int64_t cs_off = b * cos_batch_stride + s_pos * cos_seq_stride;
      pfp::load_row(cos + cs_off, c, rot_dim);
      pfp::load_row(sin + cs_off, sbuf.data(), rot_dim);
      const C* sn = sbuf.data();
      if (interleaved) {
        for (int64_t j = 0; j < half_rot; ++j) {
          p[2 * j] = backward ? sn[2 * j + 1] : -sn[2 * j];
          p[2 * j + 1] = backward ? -sn[2 * j] : sn[2 * j + 1];
        }
      } else {
        for (int64_t i = 0; i < half_rot; ++i) {
          p[i] = backward ? sn[i + half_rot] : -sn[i];
          p[i + half_rot] = backward ? -sn[i] : sn[i + half_rot];
        }
      }
      for (int64_t h = 0; h < q_heads; ++h)
        rotate_row(q + b * qs[0] + h * qs[1] + s_pos * qs[2], q_out + b * qos[0] + h * qos[1] + s_pos * qos[2]);
      for (int64_t h = 0; h < k_heads; ++h)
        rotate_row(k + b * ks[0] + h * ks[1] + s_pos * ks[2], k_out + b * kos[0] + h * kos[1] + s_pos * kos[2]);
    }
  });
}

}  // namespace

// rope: q_out = rope(q), k_out = rope(k) (backward=true applies the transpose, for gradients).
// q: [batch, q_heads, seq, head_dim] at element strides q_strides[0..2] (batch, head, position),
// last dim contiguous; k likewise with k_heads (k_heads may differ: GQA); outputs have their own
// strides and may not alias the inputs. cos, sin: [*, seq, rot_dim], same strides, row at
// b * cos_batch_stride + s * cos_seq_stride (cos_batch_stride 0 broadcasts one table over the batch),
// last dim contiguous; rot_dim even and <= head_dim. All tensors one dtype (pfp::DType).
void rope(const void* q, const void* k, void* q_out, void* k_out, const void* cos, const void* sin,
          const int64_t* q_strides, const int64_t* k_strides, const int64_t* q_out_strides,
          const int64_t* k_out_strides, int64_t cos_batch_stride, int64_t cos_seq_stride, int64_t batch,
          int64_t seq, int64_t q_heads, int64_t k_heads, int64_t head_dim, int64_t rot_dim, int dtype,
          bool interleaved, bool backward, int nthreads) {
#define PFP_ROPE(T)                                                                                   \
  return rope_impl(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<T*>(q_out),        \
                   static_cast<T*>(k_out), static_cast<const T*>(cos), static_cast<const T*>(sin),     \
                   q_strides, k_strides, q_out_strides, k_out_strides, cos_batch_stride, cos_seq_stride, \
                   batch, seq, q_heads, k_heads, head_dim, rot_dim, interleaved, backward, nthreads)
  switch (dtype) {
    case pfp::kFloat32: PFP_ROPE(float);
    case pfp::kFloat16: PFP_ROPE(half);
    case pfp::kBFloat16: PFP_ROPE(bf16);
    case pfp::kFloat64: PFP_ROPE(double);
  }
#undef PFP_ROPE
  throw std::invalid_argument("rope: unsupported dtype code");
}

}  // namespace PFP_ISA
