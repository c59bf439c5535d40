// Scaled dot-product attention on the CPU (pyfastpeft/ops/attention.py; pyfastpeft/reference/attention.py is the
// oracle): out = softmax(scale q k^T, causal or not) v and its backward, with grouped-query attention (query head h
// reads key/value head h / (heads / kv_heads)), in blocks of kBlock queries by kBlock keys, never holding a whole
// score matrix.
//
// Forward (the flash-attention recurrence): for each block of queries, walk the key blocks it sees, keeping per row
// the running maximum m and sum l of exp(scale s - m), rescaling the output accumulator by exp(m_old - m_new) as m
// grows; out = acc / l and lse = m + log l, which the backward takes to recompute P = exp(scale s - lse) exactly.
// Backward: with delta_i = sum_d dout_id out_id (out as stored) and dS = scale P o (dout v^T - delta),
//   dv = P^T dout,  dq = dS k,  dk = dS^T q,
// block by block again; dk and dv sum over the query heads of their group.
//
// Compute in fp32 (fp64 for fp64 data), inputs widened once per block or per key/value head, one rounding at each
// store. Products are block GEMMs: the AVX-512 build runs them on fp32 in tiles of 6 rows by up to 64 columns held
// in registers; plain loops elsewhere (the scalar and AVX2 builds, and fp64).
#include "cpu/common.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace PFP_ISA {
namespace {

using pfp::bf16;
using pfp::half;

constexpr int64_t kBlock = 64;  // queries and keys per block: a 64 x 64 fp32 score block is 16 KiB, in L1

// out[m][n] (+)= sum_k A[m * a_row + k * a_col] B[k * ldb + n] for m < M, n < N, k < K; zero: out starts at 0.
// A is read through strides (a transposed block is a_row = 1), B and out by rows.
template <typename C>
void block_gemm(int64_t M, int64_t N, int64_t K, const C* A, int64_t a_row, int64_t a_col, const C* B, int64_t ldb,
                C* out, int64_t ldc, bool zero) {
  for (int64_t m = 0; m < M; ++m) {
    C* row = out + m * ldc;
    if (zero)
      for (int64_t n = 0; n < N; ++n) row[n] = C(0);
    for (int64_t k = 0; k < K; ++k) {
      const C a = A[m * a_row + k * a_col];
      const C* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) row[n] += a * b[n];
    }
  }
}

#if defined(__AVX512F__)
// R rows by V vectors of 16 columns, all in registers across the whole K loop (R V accumulators, V loads of B and R
// broadcasts of A per step); `last` masks the columns of the last vector.
template <int R, int V>
inline void tile(int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B, int64_t ldb, float* out,
                 int64_t ldc, __mmask16 last, bool zero) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      acc[r][v] = zero ? _mm512_setzero_ps()
                       : _mm512_maskz_loadu_ps(v == V - 1 ? last : __mmask16(0xFFFF), out + r * ldc + 16 * v);
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      b[v] = _mm512_maskz_loadu_ps(v == V - 1 ? last : __mmask16(0xFFFF), B + k * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * a_row + k * a_col]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(out + r * ldc + 16 * v, v == V - 1 ? last : __mmask16(0xFFFF), acc[r][v]);
}

template <int R>
inline void tile_row(int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B, int64_t ldb,
                     float* out, int64_t ldc, bool zero) {
  for (int64_t n = 0; n < N; n += 64) {
    const int64_t left = N - n, vectors = left >= 64 ? 4 : (left + 15) / 16;
    const __mmask16 last = pfp::lanes16(left - 16 * (vectors - 1));
    switch (vectors) {
      case 4: tile<R, 4>(K, A, a_row, a_col, B + n, ldb, out + n, ldc, last, zero); break;
      case 3: tile<R, 3>(K, A, a_row, a_col, B + n, ldb, out + n, ldc, last, zero); break;
      case 2: tile<R, 2>(K, A, a_row, a_col, B + n, ldb, out + n, ldc, last, zero); break;
      default: tile<R, 1>(K, A, a_row, a_col, B + n, ldb, out + n, ldc, last, zero); break;
    }
  }
}

void block_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                int64_t ldb, float* out, int64_t ldc, bool zero) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) tile_row<6>(N, K, A + m * a_row, a_row, a_col, B, ldb, out + m * ldc, ldc, zero);
  const float* a = A + m * a_row;
  float* o = out + m * ldc;
  switch (M - m) {
    case 5: tile_row<5>(N, K, a, a_row, a_col, B, ldb, o, ldc, zero); break;
    case 4: tile_row<4>(N, K, a, a_row, a_col, B, ldb, o, ldc, zero); break;
    case 3: tile_row<3>(N, K, a, a_row, a_col, B, ldb, o, ldc, zero); break;
    case 2: tile_row<2>(N, K, a, a_row, a_col, B, ldb, o, ldc, zero); break;
    case 1: tile_row<1>(N, K, a, a_row, a_col, B, ldb, o, ldc, zero); break;
    default: break;
  }
}
#endif

inline float exp_of(float x) { return pfp::exp_approx(x); }
inline double exp_of(double x) { return std::exp(x); }

// One row of a score block in the forward: row[0, width) holds q . k for the block's keys, of which the first
// `visible` are seen (the causal mask hides the rest). Updates the row's running max m and sum l (in units of the
// scaled score) and replaces row[c] by p_c = exp(scale row[c] - m_new), 0 where hidden; returns exp(m_old - m_new),
// the factor the row's output accumulator takes.
template <typename C>
C softmax_update(C* row, int64_t visible, int64_t width, C scale, C& m, C& l) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<C, float>) {
    __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t c = 0; c < visible; c += 16) {
      const __mmask16 valid = pfp::lanes16(visible - c);
      best = _mm512_mask_max_ps(best, valid, best, _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, row + c), s));
    }
    const float m_new = std::max(m, _mm512_reduce_max_ps(best));
    const float alpha = exp_of(m - m_new);
    const __m512 shift = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < width; c += 16) {
      const __mmask16 in_row = pfp::lanes16(width - c), seen = pfp::lanes16(visible - c);
      const __m512 p =
          _mm512_maskz_mov_ps(seen, pfp::exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(seen, row + c), s, shift)));
      _mm512_mask_storeu_ps(row + c, in_row, p);
      sum = _mm512_add_ps(sum, p);
    }
    l = l * alpha + _mm512_reduce_add_ps(sum);
    m = m_new;
    return alpha;
  }
#endif
  C best = -std::numeric_limits<C>::infinity();
  for (int64_t c = 0; c < visible; ++c) best = std::max(best, scale * row[c]);
  const C m_new = std::max(m, best);
  const C alpha = exp_of(m - m_new);
  C sum = C(0);
  for (int64_t c = 0; c < width; ++c) {
    const C p = c < visible ? exp_of(scale * row[c] - m_new) : C(0);
    row[c] = p;
    sum += p;
  }
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

// The backward's rows of a block: p = exp(scale s - lse) where seen (0 elsewhere) into s, and
// ds = scale p (dp - delta) into dp.
template <typename C>
void gradient_row(C* s, C* dp, int64_t visible, int64_t width, C scale, C lse, C delta) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<C, float>) {
    const __m512 vs = _mm512_set1_ps(scale), vl = _mm512_set1_ps(lse), vd = _mm512_set1_ps(delta);
    for (int64_t c = 0; c < width; c += 16) {
      const __mmask16 in_row = pfp::lanes16(width - c), seen = pfp::lanes16(visible - c);
      const __m512 p =
          _mm512_maskz_mov_ps(seen, pfp::exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(seen, s + c), vs, vl)));
      _mm512_mask_storeu_ps(s + c, in_row, p);
      const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(in_row, dp + c), vd);
      _mm512_mask_storeu_ps(dp + c, in_row, _mm512_mul_ps(_mm512_mul_ps(p, vs), d));
    }
    return;
  }
#endif
  for (int64_t c = 0; c < width; ++c) {
    const C p = c < visible ? exp_of(scale * s[c] - lse) : C(0);
    s[c] = p;
    dp[c] = scale * p * (dp[c] - delta);
  }
}

// Keys seen by query i of a block whose keys start at j0: all `width` without the mask, else those with j <= i.
inline int64_t seen_keys(bool causal, int64_t i, int64_t j0, int64_t width) {
  if (!causal) return width;
  const int64_t seen = i - j0 + 1;
  return seen < 0 ? 0 : seen > width ? width : seen;
}
// The keys a block of queries ending before i_end sees: [0, kv_len), or [0, min(kv_len, i_end)) with the mask.
inline int64_t key_end(bool causal, int64_t i_end, int64_t kv_len) { return causal ? std::min(kv_len, i_end) : kv_len; }

// Runs body(begin, end, tid) over contiguous ranges of tasks [0, n) of about equal total cost(t) (a causal
// query block's cost grows with its position), one range per thread.
// The threads parallel_by_cost runs n tasks on: body's tid is below this.
inline int team_size(int64_t n, int nthreads) {
  return int(std::max<int64_t>(1, std::min<int64_t>(nthreads < 1 ? 1 : nthreads, n)));
}

template <typename Cost, typename Body>
void parallel_by_cost(int64_t n, int nthreads, Cost cost, Body body) {
  std::vector<int64_t> before(size_t(n) + 1, 0);  // before[t]: the cost of tasks [0, t)
  for (int64_t t = 0; t < n; ++t) before[size_t(t) + 1] = before[size_t(t)] + cost(t);
  const int64_t total = before[size_t(n)];
  const int team = team_size(n, nthreads);
  if (team <= 1 || total == 0) {
    body(int64_t(0), n, 0);
    return;
  }
  // Task t goes to the thread whose share of [0, total) holds before[t]: thread k takes those with
  // k total <= before[t] team < (k + 1) total.
  auto first_at = [&](int64_t k) {
    return int64_t(std::lower_bound(before.begin(), before.end() - 1, k,
                                    [&](int64_t b, int64_t kk) { return b * team < kk * total; }) -
                   before.begin());
  };
#pragma omp parallel num_threads(team)
  {
    const int tid = omp_get_thread_num(), threads = omp_get_num_threads();
    if (threads == team) {
      body(first_at(tid), first_at(tid + 1), tid);
    } else if (tid == 0) {  // fewer threads than asked for: one does it all
      body(int64_t(0), n, 0);
    }
  }
}

// A (batch, head) of a [B, H, S, D] tensor through its strides; rows of D contiguous elements.
template <typename T>
inline const T* head_of(const T* base, const pfp::Strides3& s, int64_t b, int64_t h) {
  return base + b * s[0] + h * s[1];
}

// Key/value head (b, g) widened: kt (keys transposed, the B of q k^T), kr [kv_len][D] (the B of dS k) and vt (values
// transposed, the backward's dout v^T) or vr [kv_len][D] (the forward's p v); null pointers are skipped. The
// transposed ones go by key blocks, [kv_len / kBlock][D][kBlock] (transposed_block), so that a block's rows lie
// together: in one [D][kv_len] array they sit kv_len apart, and at kv_len = 1024 every row of a block fell into the
// same few L1 sets (4 KiB apart) and thrashed them.
// Where key j's element d sits in a transposed key/value array, and the block of keys from j0 (a multiple of kBlock):
// rows of kBlock, one per element of the head, the block's width of them valid.
inline int64_t transposed_at(int64_t j, int64_t d, int64_t head_dim) {
  return (j / kBlock) * head_dim * kBlock + d * kBlock + j % kBlock;
}
template <typename C>
inline const C* transposed_block(const std::vector<C>& t, int64_t j0, int64_t head_dim) {
  return t.data() + (j0 / kBlock) * head_dim * kBlock;
}
inline size_t transposed_size(int64_t kv_len, int64_t head_dim) {
  return static_cast<size_t>((kv_len + kBlock - 1) / kBlock * kBlock * head_dim);
}

template <typename T, typename C>
void widen_kv(const T* k, const T* v, const pfp::Strides3& ks, const pfp::Strides3& vs, int64_t b, int64_t g,
              int64_t kv_len, int64_t head_dim, C* kt, C* kr, C* vt, C* vr, C* row) {
  const T* kh = head_of(k, ks, b, g);
  const T* vh = head_of(v, vs, b, g);
  for (int64_t j = 0; j < kv_len; ++j) {
    pfp::load_row(kh + j * ks[2], row, head_dim);
    if (kr != nullptr) std::copy(row, row + head_dim, kr + j * head_dim);
    if (kt != nullptr)
      for (int64_t d = 0; d < head_dim; ++d) kt[transposed_at(j, d, head_dim)] = row[d];
    if (vr != nullptr) pfp::load_row(vh + j * vs[2], vr + j * head_dim, head_dim);
    if (vt != nullptr) {
      pfp::load_row(vh + j * vs[2], row, head_dim);
      for (int64_t d = 0; d < head_dim; ++d) vt[transposed_at(j, d, head_dim)] = row[d];
    }
  }
}

// ---- bf16 pairs --------------------------------------------------------------------------------------------------
// q k^T and the backward's dout v^T multiply two stored tensors: for bf16 data they take vdpbf16ps (AVX512-BF16), which
// multiplies bf16 pairs exactly and adds both products into fp32 lanes, twice the multiply-adds of an fp32 FMA per
// instruction, where pfp::avx512_bf16_in_use(). The sums are those of fp32 FMAs over the same values in another order,
// but for a subnormal bf16 input or result, which the instruction reads and writes as 0. (The products with P and dS,
// computed values, stay fp32: rounding them to bf16 would change what the op computes.) Operands are packed as pairs
// along the head dim (a uint32 holds elements 2p and 2p + 1, the second 0 past an odd head_dim): a block of queries or
// douts as [rows][pairs], keys and values as [key block][pairs][kBlock] (transposed_pairs_at).
inline int64_t pair_count(int64_t head_dim) { return (head_dim + 1) / 2; }
inline int64_t transposed_pairs_at(int64_t j, int64_t p, int64_t pairs) {
  return (j / kBlock) * pairs * kBlock + p * kBlock + j % kBlock;
}
inline size_t transposed_pairs_size(int64_t kv_len, int64_t head_dim) {
  return static_cast<size_t>((kv_len + kBlock - 1) / kBlock * kBlock * pair_count(head_dim));
}
// Row of head_dim bf16 as pairs (pair p = elements 2p, 2p + 1; a 0 after an odd head_dim). Only bf16 data takes the
// pairs (use_pairs): for other types this is never called, and compiles to nothing.
template <typename T>
void pack_pairs(const T* row, int64_t head_dim, uint32_t* pairs) {
  if constexpr (std::is_same_v<T, bf16>) {
    for (int64_t p = 0; 2 * p < head_dim; ++p) {
      const uint32_t hi = 2 * p + 1 < head_dim ? row[2 * p + 1].bits : 0u;
      pairs[p] = uint32_t(row[2 * p].bits) | hi << 16;
    }
  }
}

#if defined(__AVX512F__)
template <int R, int V>
__attribute__((target("avx512bf16"), always_inline)) inline void pair_tile(int64_t pairs, const uint32_t* A,
                                                                           int64_t lda, const uint32_t* B, float* out,
                                                                           int64_t ldc, __mmask16 last) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      b[v] = _mm512_maskz_loadu_epi32(v == V - 1 ? last : __mmask16(0xFFFF), B + p * kBlock + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi32(int(A[r * lda + p]));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b[v]));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(out + r * ldc + 16 * v, v == V - 1 ? last : __mmask16(0xFFFF), acc[r][v]);
}

template <int R>
__attribute__((target("avx512bf16"), always_inline)) inline void pair_tile_row(int64_t width, int64_t pairs,
                                                                               const uint32_t* A, int64_t lda,
                                                                               const uint32_t* B, float* out,
                                                                               int64_t ldc) {
  const int64_t vectors = (width + 15) / 16;
  const __mmask16 last = pfp::lanes16(width - 16 * (vectors - 1));
  switch (vectors) {
    case 4: pair_tile<R, 4>(pairs, A, lda, B, out, ldc, last); break;
    case 3: pair_tile<R, 3>(pairs, A, lda, B, out, ldc, last); break;
    case 2: pair_tile<R, 2>(pairs, A, lda, B, out, ldc, last); break;
    default: pair_tile<R, 1>(pairs, A, lda, B, out, ldc, last); break;
  }
}

// out[m][n] = sum_p A[m][p] . B[p][n] (pair dot products) for m < M, n < width <= kBlock: B one key block's pairs.
__attribute__((target("avx512bf16"))) void pair_gemm(int64_t M, int64_t width, int64_t pairs, const uint32_t* A,
                                                     const uint32_t* B, float* out, int64_t ldc) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) pair_tile_row<6>(width, pairs, A + m * pairs, pairs, B, out + m * ldc, ldc);
  const uint32_t* a = A + m * pairs;
  float* o = out + m * ldc;
  switch (M - m) {
    case 5: pair_tile_row<5>(width, pairs, a, pairs, B, o, ldc); break;
    case 4: pair_tile_row<4>(width, pairs, a, pairs, B, o, ldc); break;
    case 3: pair_tile_row<3>(width, pairs, a, pairs, B, o, ldc); break;
    case 2: pair_tile_row<2>(width, pairs, a, pairs, B, o, ldc); break;
    case 1: pair_tile_row<1>(width, pairs, a, pairs, B, o, ldc); break;
    default: break;
  }
}
#endif

// Whether q k^T and dout v^T of data T take the pairs (bf16 data, an AVX-512 build, AVX512-BF16 in use).
template <typename T>
bool use_pairs() {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, bf16>) return pfp::avx512_bf16_in_use();
#endif
  return false;
}

// Key/value head (b, g) as transposed pairs (see above); only for bf16 data.
template <typename T>
void pack_kv_pairs(const T* k, const T* v, const pfp::Strides3& ks, const pfp::Strides3& vs, int64_t b, int64_t g,
                   int64_t kv_len, int64_t head_dim, uint32_t* kp, uint32_t* vp, uint32_t* row) {
  const int64_t pairs = pair_count(head_dim);
  for (int64_t j = 0; j < kv_len; ++j) {
    pack_pairs(head_of(k, ks, b, g) + j * ks[2], head_dim, row);
    for (int64_t p = 0; p < pairs; ++p) kp[transposed_pairs_at(j, p, pairs)] = row[p];
    if (vp != nullptr) {
      pack_pairs(head_of(v, vs, b, g) + j * vs[2], head_dim, row);
      for (int64_t p = 0; p < pairs; ++p) vp[transposed_pairs_at(j, p, pairs)] = row[p];
    }
  }
}

// out[m][n] = A rows . key block's columns for m < rows, n < width: q k^T (or dout v^T) of one block pair, by pairs
// (ap, bp: the packed operands) or by block_gemm over the fp32 ones (a [rows][D], bt the transposed key block).
template <typename C>
void scores(bool pairs, int64_t rows, int64_t width, int64_t head_dim, const uint32_t* ap, const uint32_t* bp,
            const C* a, const C* bt, C* out) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<C, float>) {
    if (pairs) return pair_gemm(rows, width, pair_count(head_dim), ap, bp, out, kBlock);
  }
#endif
  (void)pairs, (void)ap, (void)bp;
  block_gemm(rows, width, head_dim, a, head_dim, 1, bt, kBlock, out, kBlock, true);
}

// One thread's buffers (those of the forward, or of the backward), made before the threads start: a failed
// allocation then reaches Python as a MemoryError rather than ending the process inside the parallel region.
template <typename C>
struct Buffers {
  std::vector<C> kt, kr, vt, vr, row, own, qb, dob, dqb, acc, s, dp;
  std::vector<uint32_t> kp, vp, qp, dop, pair_row;
};

struct Shape {
  int64_t batch, heads, kv_heads, q_len, kv_len, head_dim;
  int64_t group() const { return heads / kv_heads; }
  int64_t q_blocks() const { return (q_len + kBlock - 1) / kBlock; }
  int64_t k_blocks(bool causal, int64_t qb) const {
    const int64_t end = key_end(causal, std::min(q_len, (qb + 1) * kBlock), kv_len);
    return (end + kBlock - 1) / kBlock;
  }
};

template <typename T, typename C>
void forward_impl(const T* q, const T* k, const T* v, T* out, C* lse, const pfp::Strides3& qs, const pfp::Strides3& ks,
                  const pfp::Strides3& vs, const pfp::Strides3& os, const Shape& sh, C scale, bool causal,
                  int nthreads) {
  const int64_t D = sh.head_dim, Sk = sh.kv_len, qblocks = sh.q_blocks();
  // Tasks (b, h, query block), h within its key/value head's group, in the order (b, g, h, block): a thread meets
  // each key/value head in one run of tasks and widens it once.
  const int64_t tasks = sh.batch * sh.heads * qblocks;
  const bool pairs = use_pairs<T>();
  const int64_t P = pair_count(D);
  std::vector<Buffers<C>> buffers(static_cast<size_t>(team_size(tasks, nthreads)));
  for (Buffers<C>& buf : buffers) {
    buf.kt.resize(pairs ? size_t(0) : transposed_size(Sk, D));
    buf.vr.resize(static_cast<size_t>(Sk * D));
    buf.row.resize(static_cast<size_t>(D));
    buf.kp.resize(pairs ? transposed_pairs_size(Sk, D) : size_t(0));
    buf.qp.resize(pairs ? static_cast<size_t>(kBlock * P) : size_t(0));
    buf.pair_row.resize(static_cast<size_t>(P));
    buf.qb.resize(static_cast<size_t>(kBlock * D));
    buf.acc.resize(static_cast<size_t>(kBlock * D));
    buf.s.resize(static_cast<size_t>(kBlock * kBlock));
  }
  parallel_by_cost(
      tasks, nthreads, [&](int64_t t) { return 1 + sh.k_blocks(causal, t % qblocks); },
      [&](int64_t begin, int64_t end, int tid) {
        Buffers<C>& buf = buffers[static_cast<size_t>(tid)];
        std::vector<C>&kt = buf.kt, &vr = buf.vr, &row = buf.row, &qb = buf.qb, &acc = buf.acc, &s = buf.s;
        std::vector<uint32_t>&kp = buf.kp, &qp = buf.qp, &pair_row = buf.pair_row;
        C m[kBlock], l[kBlock];
        int64_t widened = -1;  // the (b, g) in kt and vr
        for (int64_t t = begin; t < end; ++t) {
          const int64_t block = t % qblocks, bh = t / qblocks, b = bh / sh.heads, h = bh % sh.heads;
          const int64_t g = h / sh.group();
          if (b * sh.kv_heads + g != widened) {
            widen_kv<T, C>(k, v, ks, vs, b, g, Sk, D, pairs ? nullptr : kt.data(), nullptr, nullptr, vr.data(),
                           row.data());
            if (pairs) pack_kv_pairs(k, v, ks, vs, b, g, Sk, D, kp.data(), nullptr, pair_row.data());
            widened = b * sh.kv_heads + g;
          }
          const int64_t i0 = block * kBlock, rows = std::min(kBlock, sh.q_len - i0);
          const T* qh = head_of(q, qs, b, h);
          for (int64_t r = 0; r < rows; ++r) {
            if (pairs)
              pack_pairs(qh + (i0 + r) * qs[2], D, qp.data() + r * P);
            else
              pfp::load_row(qh + (i0 + r) * qs[2], qb.data() + r * D, D);
          }
          std::fill(acc.begin(), acc.begin() + rows * D, C(0));
          for (int64_t r = 0; r < rows; ++r) {
            m[r] = -std::numeric_limits<C>::infinity();
            l[r] = C(0);
          }
          const int64_t keys = key_end(causal, i0 + rows, Sk);
          for (int64_t j0 = 0; j0 < keys; j0 += kBlock) {
            const int64_t width = std::min(kBlock, keys - j0);
            scores(pairs, rows, width, D, qp.data(), kp.data() + (j0 / kBlock) * P * kBlock, qb.data(),
                   pairs ? nullptr : transposed_block(kt, j0, D), s.data());
            // Every row sees one key of each block it visits at least (blocks start at multiples of kBlock, so
            // j0 <= i0 for a block below key_end): m is finite from the first block on.
            for (int64_t r = 0; r < rows; ++r) {
              C* srow = s.data() + r * kBlock;
              const C alpha = softmax_update(srow, seen_keys(causal, i0 + r, j0, width), width, scale, m[r], l[r]);
              C* arow = acc.data() + r * D;
              for (int64_t d = 0; d < D; ++d) arow[d] *= alpha;
            }
            block_gemm(rows, D, width, s.data(), kBlock, 1, vr.data() + j0 * D, D, acc.data(), D, false);
          }
          T* oh = out + b * os[0] + h * os[1];
          C* lh = lse + (b * sh.heads + h) * sh.q_len;
          for (int64_t r = 0; r < rows; ++r) {
            C* arow = acc.data() + r * D;
            const C inv = C(1) / l[r];
            for (int64_t d = 0; d < D; ++d) arow[d] *= inv;
            pfp::store_row(arow, oh + (i0 + r) * os[2], D);
            lh[i0 + r] = m[r] + std::log(l[r]);
          }
        }
      });
}

template <typename T, typename C>
void backward_impl(const T* dout, const T* q, const T* k, const T* v, const T* out, const C* lse, T* dq, T* dk, T* dv,
                   const pfp::Strides3& dos, const pfp::Strides3& qs, const pfp::Strides3& ks, const pfp::Strides3& vs,
                   const pfp::Strides3& os, const pfp::Strides3& dqs, const pfp::Strides3& dks,
                   const pfp::Strides3& dvs, const Shape& sh, C scale, bool causal, int nthreads) {
  const int64_t D = sh.head_dim, Sk = sh.kv_len, qblocks = sh.q_blocks(), group = sh.group();
  // dk and dv of each query head: summed over its group afterwards (fp32, or fp64, partials), or, without groups,
  // stored by the task itself.
  std::vector<C> partial(group > 1 ? size_t(2 * sh.batch * sh.heads * Sk * D) : size_t(0));
  int64_t per_head = 0;
  for (int64_t qb = 0; qb < qblocks; ++qb) per_head += 1 + sh.k_blocks(causal, qb);
  // Tasks: whole query heads (b, h) in the order (b, g, h), each walking its query blocks and their key blocks.
  const bool pairs = use_pairs<T>();
  const int64_t P = pair_count(D);
  std::vector<Buffers<C>> buffers(static_cast<size_t>(team_size(sh.batch * sh.heads, nthreads)));
  for (Buffers<C>& buf : buffers) {
    buf.kt.resize(pairs ? size_t(0) : transposed_size(Sk, D));
    buf.kr.resize(static_cast<size_t>(Sk * D));
    buf.vt.resize(pairs ? size_t(0) : transposed_size(Sk, D));
    buf.row.resize(static_cast<size_t>(D));
    buf.kp.resize(pairs ? transposed_pairs_size(Sk, D) : size_t(0));
    buf.vp.resize(pairs ? transposed_pairs_size(Sk, D) : size_t(0));
    buf.qp.resize(pairs ? static_cast<size_t>(kBlock * P) : size_t(0));
    buf.dop.resize(pairs ? static_cast<size_t>(kBlock * P) : size_t(0));
    buf.pair_row.resize(static_cast<size_t>(P));
    buf.own.resize(group > 1 ? size_t(0) : size_t(2 * Sk * D));
    buf.qb.resize(static_cast<size_t>(kBlock * D));
    buf.dob.resize(static_cast<size_t>(kBlock * D));
    buf.dqb.resize(static_cast<size_t>(kBlock * D));
    buf.s.resize(static_cast<size_t>(kBlock * kBlock));
    buf.dp.resize(static_cast<size_t>(kBlock * kBlock));
  }
  parallel_by_cost(
      sh.batch * sh.heads, nthreads, [&](int64_t) { return per_head; },
      [&](int64_t begin, int64_t end, int tid) {
        Buffers<C>& buf = buffers[static_cast<size_t>(tid)];
        std::vector<C>&kt = buf.kt, &kr = buf.kr, &vt = buf.vt, &row = buf.row, &own = buf.own, &qb = buf.qb,
        &dob = buf.dob, &dqb = buf.dqb, &s = buf.s, &dp = buf.dp;
        std::vector<uint32_t>&kp = buf.kp, &vp = buf.vp, &qp = buf.qp, &dop = buf.dop, &pair_row = buf.pair_row;
        C delta[kBlock];
        int64_t widened = -1;
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t b = bh / sh.heads, h = bh % sh.heads, g = h / group;
          if (b * sh.kv_heads + g != widened) {
            widen_kv<T, C>(k, v, ks, vs, b, g, Sk, D, pairs ? nullptr : kt.data(), kr.data(),
                           pairs ? nullptr : vt.data(), nullptr, row.data());
            if (pairs) pack_kv_pairs(k, v, ks, vs, b, g, Sk, D, kp.data(), vp.data(), pair_row.data());
            widened = b * sh.kv_heads + g;
          }
          C* dk_acc = group > 1 ? partial.data() + 2 * bh * Sk * D : own.data();
          C* dv_acc = dk_acc + Sk * D;
          std::fill(dk_acc, dk_acc + 2 * Sk * D, C(0));
          const T *qh = head_of(q, qs, b, h), *doh = head_of(dout, dos, b, h), *oh = head_of(out, os, b, h);
          const C* lh = lse + bh * sh.q_len;
          T* dqh = dq + b * dqs[0] + h * dqs[1];
          for (int64_t block = 0; block < qblocks; ++block) {
            const int64_t i0 = block * kBlock, rows = std::min(kBlock, sh.q_len - i0);
            for (int64_t r = 0; r < rows; ++r) {
              C* qrow = qb.data() + r * D;
              C* dorow = dob.data() + r * D;
              pfp::load_row(qh + (i0 + r) * qs[2], qrow, D);
              pfp::load_row(doh + (i0 + r) * dos[2], dorow, D);
              pfp::load_row(oh + (i0 + r) * os[2], row.data(), D);  // out as stored
              C sum = C(0);
              for (int64_t d = 0; d < D; ++d) sum += dorow[d] * row[d];
              delta[r] = sum;
              if (pairs) {
                pack_pairs(qh + (i0 + r) * qs[2], D, qp.data() + r * P);
                pack_pairs(doh + (i0 + r) * dos[2], D, dop.data() + r * P);
              }
            }
            std::fill(dqb.begin(), dqb.begin() + rows * D, C(0));
            const int64_t keys = key_end(causal, i0 + rows, Sk);
            for (int64_t j0 = 0; j0 < keys; j0 += kBlock) {
              const int64_t width = std::min(kBlock, keys - j0);
              const int64_t at = (j0 / kBlock) * P * kBlock;
              scores(pairs, rows, width, D, qp.data(), kp.data() + at, qb.data(),
                     pairs ? nullptr : transposed_block(kt, j0, D), s.data());
              scores(pairs, rows, width, D, dop.data(), vp.data() + at, dob.data(),
                     pairs ? nullptr : transposed_block(vt, j0, D), dp.data());
              for (int64_t r = 0; r < rows; ++r)
                gradient_row(s.data() + r * kBlock, dp.data() + r * kBlock, seen_keys(causal, i0 + r, j0, width), width,
                             scale, lh[i0 + r], delta[r]);
              // s now holds P, dp holds dS (rows: queries, columns: keys).
              block_gemm(width, D, rows, s.data(), 1, kBlock, dob.data(), D, dv_acc + j0 * D, D, false);
              block_gemm(width, D, rows, dp.data(), 1, kBlock, qb.data(), D, dk_acc + j0 * D, D, false);
              block_gemm(rows, D, width, dp.data(), kBlock, 1, kr.data() + j0 * D, D, dqb.data(), D, false);
            }
            for (int64_t r = 0; r < rows; ++r) pfp::store_row(dqb.data() + r * D, dqh + (i0 + r) * dqs[2], D);
          }
          if (group == 1) {
            T* dkh = dk + b * dks[0] + h * dks[1];
            T* dvh = dv + b * dvs[0] + h * dvs[1];
            for (int64_t j = 0; j < Sk; ++j) {
              pfp::store_row(dk_acc + j * D, dkh + j * dks[2], D);
              pfp::store_row(dv_acc + j * D, dvh + j * dvs[2], D);
            }
          }
        }
      });
  if (group == 1) return;
  // dk, dv of key/value head (b, g), position j: the sum of its group's partials, in head order.
  std::vector<C> sums(static_cast<size_t>(std::max(nthreads, 1) * 2 * D));  // a thread's sums of one position
  pfp::parallel_for(sh.batch * sh.kv_heads * Sk, group * D * 4, nthreads, [&](int64_t begin, int64_t end, int tid) {
    C* sum_k = sums.data() + tid * 2 * D;
    C* sum_v = sum_k + D;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t % Sk, bg = t / Sk, b = bg / sh.kv_heads, g = bg % sh.kv_heads;
      std::fill(sum_k, sum_k + 2 * D, C(0));
      for (int64_t i = 0; i < group; ++i) {
        const C* pk = partial.data() + 2 * (b * sh.heads + g * group + i) * Sk * D + j * D;
        const C* pv = pk + Sk * D;
        for (int64_t d = 0; d < D; ++d) {
          sum_k[d] += pk[d];
          sum_v[d] += pv[d];
        }
      }
      pfp::store_row(sum_k, dk + b * dks[0] + g * dks[1] + j * dks[2], D);
      pfp::store_row(sum_v, dv + b * dvs[0] + g * dvs[1] + j * dvs[2], D);
    }
  });
}

}  // namespace

// q [B, H, Sq, D], k and v [B, Hkv, Sk, D] (H a multiple of Hkv), each through its element strides of (batch, head,
// position) with the last dim contiguous; out [B, H, Sq, D] likewise (its own strides, a layout without overlap);
// lse [B, H, Sq] contiguous, fp64 for fp64 data and fp32 otherwise. q, k, v, out share `dtype`. causal: query i sees
// the keys j <= i (torch's is_causal, aligned at the top left). All sizes >= 1.
void attention_forward(const void* q, const void* k, const void* v, void* out, void* lse, pfp::Strides3 q_strides,
                       pfp::Strides3 k_strides, pfp::Strides3 v_strides, pfp::Strides3 out_strides, int64_t batch,
                       int64_t heads, int64_t kv_heads, int64_t q_len, int64_t kv_len, int64_t head_dim, int dtype,
                       double scale, bool causal, int nthreads) {
  const Shape shape{batch, heads, kv_heads, q_len, kv_len, head_dim};
  pfp::dispatch_float(dtype, "attention_forward", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using C = typename pfp::Compute<T>::type;
    forward_impl<T, C>(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                       static_cast<T*>(out), static_cast<C*>(lse), q_strides, k_strides, v_strides, out_strides, shape,
                       C(scale), causal, nthreads);
  });
}

// The gradients of attention_forward: dout and out [B, H, Sq, D] (out and lse as the forward left them), q, k, v as
// there; dq, dk, dv shaped as q, k, v through their own strides (layouts without overlap), the last dim contiguous.
// All of one dtype but lse (fp64 for fp64 data, else fp32, contiguous).
void attention_backward(const void* dout, const void* q, const void* k, const void* v, const void* out, const void* lse,
                        void* dq, void* dk, void* dv, pfp::Strides3 dout_strides, pfp::Strides3 q_strides,
                        pfp::Strides3 k_strides, pfp::Strides3 v_strides, pfp::Strides3 out_strides,
                        pfp::Strides3 dq_strides, pfp::Strides3 dk_strides, pfp::Strides3 dv_strides, int64_t batch,
                        int64_t heads, int64_t kv_heads, int64_t q_len, int64_t kv_len, int64_t head_dim, int dtype,
                        double scale, bool causal, int nthreads) {
  const Shape shape{batch, heads, kv_heads, q_len, kv_len, head_dim};
  pfp::dispatch_float(dtype, "attention_backward", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using C = typename pfp::Compute<T>::type;
    backward_impl<T, C>(static_cast<const T*>(dout), static_cast<const T*>(q), static_cast<const T*>(k),
                        static_cast<const T*>(v), static_cast<const T*>(out), static_cast<const C*>(lse),
                        static_cast<T*>(dq), static_cast<T*>(dk), static_cast<T*>(dv), dout_strides, q_strides,
                        k_strides, v_strides, out_strides, dq_strides, dk_strides, dv_strides, shape, C(scale), causal,
                        nthreads);
  });
}

}  // namespace PFP_ISA
