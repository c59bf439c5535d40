// Rotary position embedding (RoPE) on the CPU: q and k rows in one parallel pass, in memory order.
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

// One tensor's rows in memory order: positions innermost when they are adjacent in memory
// ([B, H, S, D] contiguous), heads innermost when HF hands a transposed view of [B, S, H, D].
struct RowOrder {
  int64_t heads, seq;
  bool seq_inner;
  void decompose(int64_t row, int64_t& b, int64_t& h, int64_t& s) const {
    if (seq_inner) { b = row / (heads * seq); h = (row / seq) % heads; s = row % seq; }
    else { b = row / (seq * heads); s = (row / heads) % seq; h = row % heads; }
  }
};

template <typename T>
void rope_impl(const T* q, const T* k, T* q_out, T* k_out, const T* cos, const T* sin, const int64_t* qs,
               const int64_t* ks, const int64_t* qos, const int64_t* kos, int64_t cos_batch_stride,
               int64_t cos_seq_stride, int64_t batch, int64_t seq, int64_t q_heads, int64_t k_heads,
               int64_t head_dim, int64_t rot_dim, bool interleaved, bool backward, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  const int64_t half_rot = rot_dim / 2;
  const int64_t q_rows = batch * q_heads * seq, k_rows = batch * k_heads * seq;
  const RowOrder q_order{q_heads, seq, qs[2] < qs[1]}, k_order{k_heads, seq, ks[2] < ks[1]};
  // q rows then k rows, one parallel pass over both.
  pfp::parallel_for(q_rows + k_rows, head_dim * 2, nthreads, [&](int64_t begin, int64_t end, int) {
    std::vector<C> cbuf(rot_dim), sbuf(rot_dim), pbuf(rot_dim), xbuf(head_dim), ybuf(head_dim);
    C* c = cbuf.data();
    C* sn = sbuf.data();
    C* p = pbuf.data();
    C* xb = xbuf.data();
    C* yb = ybuf.data();
    int64_t table_b = -1, table_s = -1;  // the (batch, position) whose cos/sin rows are loaded
    for (int64_t row = begin; row < end; ++row) {
      const bool is_q = row < q_rows;
      int64_t b, h, s_pos;
      (is_q ? q_order : k_order).decompose(is_q ? row : row - q_rows, b, h, s_pos);
      if (b != table_b || s_pos != table_s) {
        const int64_t cs_off = b * cos_batch_stride + s_pos * cos_seq_stride;
        pfp::load_row(cos + cs_off, c, rot_dim);
        pfp::load_row(sin + cs_off, sn, rot_dim);
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
        table_b = b;
        table_s = s_pos;
      }
      const int64_t* xs = is_q ? qs : ks;
      const int64_t* os = is_q ? qos : kos;
      pfp::load_row((is_q ? q : k) + b * xs[0] + h * xs[1] + s_pos * xs[2], xb, head_dim);
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
      pfp::store_row(yb, (is_q ? q_out : k_out) + b * os[0] + h * os[1] + s_pos * os[2], head_dim);
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
