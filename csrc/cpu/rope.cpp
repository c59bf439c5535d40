// Rotary position embedding (RoPE) on the CPU: q and k in one parallel pass over blocks of positions.
//
// One head row x[0:D] with cos/sin rows c, s of width R (R <= D, even): channels [0, R) rotate,
// [R, D) pass through. With h = R/2 (HF rotate_half layout):
//   forward : y[i]   = x[i]*c[i]     - x[i+h]*s[i]         y[i+h] = x[i+h]*c[i+h] + x[i]*s[i+h]
//   backward: dx[i]  = dy[i]*c[i]    + dy[i+h]*s[i+h]      dx[i+h] = dy[i+h]*c[i+h] - dy[i]*s[i]
// (backward is the transpose of the forward's 2x2 rotations). GPT-J interleaved layout pairs
// (2j, 2j+1) the same way. Both are written as y[i] = x[i]*c[i] + x[partner(i)]*p[i] with p built
// once per (batch, position) from s and the direction.
#include "cpu/common.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace PFP_ISA {
namespace {

using pfp::bf16;
using pfp::half;

// Positions per work item, between these bounds: their cos/sin rows are converted once for every
// head, and in a [B, H, S, D] layout each head's rows for the item are one contiguous run, while
// enough items remain to share among the threads.
constexpr int64_t kMinPositionBlock = 16, kMaxPositionBlock = 256;
constexpr int64_t kTransposeTile = 8;

// y = x*c + x[partner]*p over one head row of storage type T (p built per position from sin and the
// direction); channels [rot_dim, head_dim) copied. Loads, math and stores in one vectorized pass.
template <typename T, typename C>
inline void rotate_row(const T* __restrict x, T* __restrict y, const C* __restrict c, const C* __restrict p,
                       int64_t head_dim, int64_t rot_dim, bool interleaved) {
  const int64_t half_rot = rot_dim / 2;
  if (interleaved) {
    for (int64_t j = 0; j < half_rot; ++j) {
      const C x0 = pfp::to_compute<C>(x[2 * j]), x1 = pfp::to_compute<C>(x[2 * j + 1]);
      y[2 * j] = pfp::from_compute<T>(x0 * c[2 * j] + x1 * p[2 * j]);
      y[2 * j + 1] = pfp::from_compute<T>(x1 * c[2 * j + 1] + x0 * p[2 * j + 1]);
    }
  } else {
    for (int64_t i = 0; i < half_rot; ++i) {
      const C x0 = pfp::to_compute<C>(x[i]), x1 = pfp::to_compute<C>(x[i + half_rot]);
      y[i] = pfp::from_compute<T>(x0 * c[i] + x1 * p[i]);
      y[i + half_rot] = pfp::from_compute<T>(x1 * c[i + half_rot] + x0 * p[i + half_rot]);
    }
  }
  for (int64_t i = rot_dim; i < head_dim; ++i) y[i] = x[i];
}

#if defined(__AVX512F__)
// rotate_row in 16-lane vectors for fp32, bf16 and fp16 rows with fp32 compute: the same products and sum, in the
// same order, as the scalar loop (no fused multiply-add), so the same bits; bf16 stores by vcvtneps2bf16 where
// kBf16Ins, one instruction in place of bf16_high16's seven.
// x*c + partner*p for 16 lanes: two products, then their sum, each rounded (as the scalar loop).
inline __m512 rotate16(__m512 x, __m512 c, __m512 partner, __m512 p) {
  return _mm512_add_ps(_mm512_mul_ps(x, c), _mm512_mul_ps(partner, p));
}

// Whole vectors unmasked, 32 elements a step while a half (or, interleaved, the row) holds them, then one masked
// tail (every masked lane reads 0 and is not stored). stream: outputs past the caches (common.h's streaming stores).
template <bool kBf16Ins, typename T>
inline void rotate_row16(const T* __restrict x, T* __restrict y, const float* __restrict c, const float* __restrict p,
                         int64_t head_dim, int64_t rot_dim, bool interleaved, bool stream) {
  if (interleaved) {
    // The partner of lane 2j is 2j+1 and back: one in-lane swap of each pair (rot_dim is even, so the tail never
    // splits a pair).
    auto rotated = [&](int64_t i, __m512 x0) __attribute__((always_inline)) {
      return rotate16(x0, _mm512_loadu_ps(c + i), _mm512_permute_ps(x0, 0xB1), _mm512_loadu_ps(p + i));
    };
    int64_t i = 0;
    for (; i + 32 <= rot_dim; i += 32)
      pfp::put16x2_if<kBf16Ins>(y + i, rotated(i, pfp::load16(x + i)), rotated(i + 16, pfp::load16(x + i + 16)),
                                stream);
    for (; i + 16 <= rot_dim; i += 16) pfp::put16_if<kBf16Ins>(y + i, rotated(i, pfp::load16(x + i)), stream);
    if (i < rot_dim) {
      const __mmask16 valid = pfp::lanes16(rot_dim - i);
      const __m512 x0 = pfp::load16(x + i, valid);
      pfp::store16_if<kBf16Ins>(y + i, valid,
                                rotate16(x0, _mm512_maskz_loadu_ps(valid, c + i), _mm512_permute_ps(x0, 0xB1),
                                         _mm512_maskz_loadu_ps(valid, p + i)));
    }
  } else {
    const int64_t half_rot = rot_dim / 2;
    // y[i] from x[i] and its partner x[i + half_rot], and y[i + half_rot] from the same two (16 lanes each)
    auto first = [&](int64_t i, __m512 x0, __m512 x1) __attribute__((always_inline)) {
      return rotate16(x0, _mm512_loadu_ps(c + i), x1, _mm512_loadu_ps(p + i));
    };
    auto second = [&](int64_t i, __m512 x0, __m512 x1) __attribute__((always_inline)) {
      return rotate16(x1, _mm512_loadu_ps(c + i + half_rot), x0, _mm512_loadu_ps(p + i + half_rot));
    };
    int64_t i = 0;
    for (; i + 32 <= half_rot; i += 32) {
      const __m512 x0 = pfp::load16(x + i), x1 = pfp::load16(x + i + half_rot);
      const __m512 x0n = pfp::load16(x + i + 16), x1n = pfp::load16(x + i + 16 + half_rot);
      pfp::put16x2_if<kBf16Ins>(y + i, first(i, x0, x1), first(i + 16, x0n, x1n), stream);
      pfp::put16x2_if<kBf16Ins>(y + i + half_rot, second(i, x0, x1), second(i + 16, x0n, x1n), stream);
    }
    for (; i + 16 <= half_rot; i += 16) {
      const __m512 x0 = pfp::load16(x + i), x1 = pfp::load16(x + i + half_rot);
      pfp::put16_if<kBf16Ins>(y + i, first(i, x0, x1), stream);
      pfp::put16_if<kBf16Ins>(y + i + half_rot, second(i, x0, x1), stream);
    }
    if (i < half_rot) {
      const __mmask16 valid = pfp::lanes16(half_rot - i);
      const __m512 x0 = pfp::load16(x + i, valid), x1 = pfp::load16(x + i + half_rot, valid);
      pfp::store16_if<kBf16Ins>(
          y + i, valid, rotate16(x0, _mm512_maskz_loadu_ps(valid, c + i), x1, _mm512_maskz_loadu_ps(valid, p + i)));
      pfp::store16_if<kBf16Ins>(y + i + half_rot, valid,
                                rotate16(x1, _mm512_maskz_loadu_ps(valid, c + i + half_rot), x0,
                                         _mm512_maskz_loadu_ps(valid, p + i + half_rot)));
    }
  }
  if (head_dim > rot_dim) std::memcpy(y + rot_dim, x + rot_dim, size_t(head_dim - rot_dim) * sizeof(T));
}

__attribute__((target("avx512bf16"), flatten)) void rotate_row16_bf16ins(const bf16* x, bf16* y, const float* c,
                                                                         const float* p, int64_t head_dim,
                                                                         int64_t rot_dim, bool interleaved,
                                                                         bool stream) {
  rotate_row16<true>(x, y, c, p, head_dim, rot_dim, interleaved, stream);
}

template <typename T>
constexpr bool kVector16 = !std::is_same_v<T, double>;
#else
template <typename T>
constexpr bool kVector16 = false;
#endif

template <typename T>
void rope_impl(const T* q, const T* k, T* q_out, T* k_out, const T* cos, const T* sin, const int64_t* qs,
               const int64_t* ks, const int64_t* qos, const int64_t* kos, int64_t cos_batch_stride,
               int64_t cos_seq_stride, int64_t batch, int64_t seq, int64_t q_heads, int64_t k_heads, int64_t head_dim,
               int64_t rot_dim, bool interleaved, bool backward, int nthreads) {
  using C = typename pfp::Compute<T>::type;
  const int64_t half_rot = rot_dim / 2;
  const int64_t per_thread = batch * seq / (4 * int64_t(nthreads < 1 ? 1 : nthreads));
  const int64_t block = std::min(std::max(per_thread, kMinPositionBlock), kMaxPositionBlock);
  const int64_t blocks_per_batch = (seq + block - 1) / block;
  [[maybe_unused]] const bool bf16ins = pfp::avx512_bf16_in_use();
#if defined(__AVX512F__)
  const bool stream = pfp::streams(batch * seq * (q_heads + k_heads) * head_dim * int64_t(sizeof(T)));
#endif
  // Work item: `block` positions of one batch entry, all q heads then all k heads.
  pfp::parallel_for(
      batch * blocks_per_batch, (q_heads + k_heads) * head_dim * block * 2, nthreads,
      [&](int64_t begin, int64_t end, int) {
        std::vector<C> cbuf(block * rot_dim), pbuf(block * rot_dim), sbuf(rot_dim), xbuf(head_dim), ybuf(head_dim);
        C* sn = sbuf.data();
        C* xb = xbuf.data();
        C* yb = ybuf.data();
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / blocks_per_batch, s0 = (item % blocks_per_batch) * block;
          const int64_t positions = std::min(seq - s0, block);
          for (int64_t j = 0; j < positions; ++j) {
            const int64_t cs_off = b * cos_batch_stride + (s0 + j) * cos_seq_stride;
            C* c = cbuf.data() + j * rot_dim;
            C* p = pbuf.data() + j * rot_dim;
            pfp::load_row(cos + cs_off, c, rot_dim);
            pfp::load_row(sin + cs_off, sn, rot_dim);
            if (interleaved) {
              for (int64_t i = 0; i < half_rot; ++i) {
                p[2 * i] = backward ? sn[2 * i + 1] : -sn[2 * i];
                p[2 * i + 1] = backward ? -sn[2 * i] : sn[2 * i + 1];
              }
            } else {
              for (int64_t i = 0; i < half_rot; ++i) {
                p[i] = backward ? sn[i + half_rot] : -sn[i];
                p[i + half_rot] = backward ? -sn[i] : sn[i + half_rot];
              }
            }
          }
          // Rows in memory order: positions innermost for [B, H, S, D] layouts, heads innermost for
          // HF's transposed views of [B, S, H, D]. Where the input and the output disagree (the backward
          // of HF's views: contiguous grads in, the projections' layout out), tiles of kTransposeTile
          // positions, all heads for each: either plain order makes one side step a whole row of heads
          // (8 KiB in bf16 for 32 heads) per row for up to 256 positions before the next head, which cost
          // bf16's backward about 15% of its time on Zen 4.
          auto rotate_tensor = [&](const T* x, T* out, const int64_t* xs, const int64_t* os, int64_t heads) {
            auto one = [&](int64_t h, int64_t j) {
              const T* src = x + b * xs[0] + h * xs[1] + (s0 + j) * xs[2];
              T* dst = out + b * os[0] + h * os[1] + (s0 + j) * os[2];
              const C* c = cbuf.data() + j * rot_dim;
              const C* p = pbuf.data() + j * rot_dim;
#if defined(__AVX512F__)
              if constexpr (kVector16<T>) {
                if constexpr (std::is_same_v<T, bf16>) {
                  if (bf16ins) return rotate_row16_bf16ins(src, dst, c, p, head_dim, rot_dim, interleaved, stream);
                }
                return rotate_row16<false>(src, dst, c, p, head_dim, rot_dim, interleaved, stream);
              }
#endif
              if constexpr (std::is_same<T, half>::value) {  // F16C conversions vectorize in load/store_row only
                pfp::load_row(src, xb, head_dim);
                rotate_row(xb, yb, c, p, head_dim, rot_dim, interleaved);
                pfp::store_row(yb, dst, head_dim);
              } else {
                rotate_row(src, dst, c, p, head_dim, rot_dim, interleaved);
              }
            };
            const bool x_heads_outer = xs[2] < xs[1], out_heads_outer = os[2] < os[1];
            if (x_heads_outer != out_heads_outer) {
              for (int64_t j0 = 0; j0 < positions; j0 += kTransposeTile)
                for (int64_t h = 0; h < heads; ++h)
                  for (int64_t j = j0; j < std::min(positions, j0 + kTransposeTile); ++j) one(h, j);
            } else if (x_heads_outer) {
              for (int64_t h = 0; h < heads; ++h)
                for (int64_t j = 0; j < positions; ++j) one(h, j);
            } else {
              for (int64_t j = 0; j < positions; ++j)
                for (int64_t h = 0; h < heads; ++h) one(h, j);
            }
          };
          rotate_tensor(q, q_out, qs, qos, q_heads);
          rotate_tensor(k, k_out, ks, kos, k_heads);
        }
#if defined(__AVX512F__)
        if (stream) pfp::stream_fence();
#endif
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
          pfp::Strides3 q_strides, pfp::Strides3 k_strides, pfp::Strides3 q_out_strides, pfp::Strides3 k_out_strides,
          int64_t cos_batch_stride, int64_t cos_seq_stride, int64_t batch, int64_t seq, int64_t q_heads,
          int64_t k_heads, int64_t head_dim, int64_t rot_dim, int dtype, bool interleaved, bool backward,
          int nthreads) {
  pfp::dispatch_float(dtype, "rope", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rope_impl(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<T*>(q_out), static_cast<T*>(k_out),
              static_cast<const T*>(cos), static_cast<const T*>(sin), q_strides.data(), k_strides.data(),
              q_out_strides.data(), k_out_strides.data(), cos_batch_stride, cos_seq_stride, batch, seq, q_heads,
              k_heads, head_dim, rot_dim, interleaved, backward, nthreads);
  });
}

}  // namespace PFP_ISA
