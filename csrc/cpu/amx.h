// GEMM on AMX tiles (Intel's tile instructions), shared by the int8 and NF4 products: only the AVX-512 build has
// it (PFP_HAS_AMX), and a kernel takes it only when pfp::amx_in_use() (the CPU has AMX-TILE/INT8/BF16 and Linux
// granted the tile state).
//
// C[m, n] = sum_c A[m, c] * B[n, c] in steps of 64 bytes of c (64 int8, or 32 bf16): one tile product multiplies a
// 16 x 64-byte tile of A (16 rows) by a tile of B^T "VNNI" packed: its row r holds, for each of 16 columns j, the
// dword at bytes [4r, 4r + 4) of B's row j for that step, i.e. the transpose of a 16 x 16 matrix of B's dwords.
// A is packed once per call into tiles laid out in the order the loop reads them (PackedA); B by each thread, in
// chunks of column panels of 32 (the caller's pack_b: the int8 path transposes B's bytes, the NF4 path decodes
// nibbles first), each chunk staying in L2 while every 32-row block of A uses it. Edges are zero-padded in both
// operands, which adds nothing to a sum. On a CPU with AVX512-BF16 but no AMX (AMD Zen 4), the bf16 products run on
// the same packed operands by vdpbf16ps (blocks_dots), the chunks larger and each block's K in passes.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__x86_64__)
#define PFP_HAS_AMX 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "cpu/common.h"

namespace PFP_ISA {
namespace amx {

constexpr int64_t kTileBytes = 1024;  // 16 rows x 64 bytes
constexpr int64_t kPrefetchSteps = 2;
constexpr int64_t kChunkBytes = int64_t(1) << 20;  // B panels decoded at a time, per thread
// The dot-product blocks' chunk: every row block re-reads A once per chunk, and their passes by kDotSteps need only
// a slice of the panels in L2, so the chunk may fill a share of L3 instead.
constexpr int64_t kDotChunkBytes = int64_t(4) << 20;
constexpr int64_t kDotSteps = 16;  // steps of K per pass of blocks_dots' row groups

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes (tiles 0..3 accumulate, 4..5 hold A, 6..7 B). Per thread, before its first tile op.
__attribute__((target("amx-tile"))) inline void configure() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  // GCC's _tile_loadconfig tells the compiler it reads only the config's first 8 bytes, which lets it drop the
  // stores above as dead: this barrier makes all 64 bytes visible first.
  __asm__ __volatile__("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

__attribute__((target("amx-tile"))) inline void release() { _tile_release(); }

// dst[r][j] = src[j][r] for a 16 x 16 matrix of dwords: rows in, rows out, 64 bytes apart.
inline void transpose_dwords(const __m512i (&src)[16], int8_t* dst) {
  __m512i lo[16], u[16];
  for (int i = 0; i < 8; ++i) {
    lo[2 * i] = _mm512_unpacklo_epi32(src[2 * i], src[2 * i + 1]);
    lo[2 * i + 1] = _mm512_unpackhi_epi32(src[2 * i], src[2 * i + 1]);
  }
  // u[4g + q], 128-bit lane L: column 4L + q of rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    u[4 * g] = _mm512_unpacklo_epi64(lo[4 * g], lo[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(lo[4 * g], lo[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(lo[4 * g + 1], lo[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(lo[4 * g + 1], lo[4 * g + 3]);
  }
  // row 4L + q of the result: lane L of u[q], u[4 + q], u[8 + q], u[12 + q] (a 4 x 4 transpose of lanes)
  for (int q = 0; q < 4; ++q) {
    const __m512i y0 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x44), y1 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xEE);
    const __m512i y2 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x44);
    const __m512i y3 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xEE);
    _mm512_storeu_si512(dst + (0 + q) * 64, _mm512_shuffle_i32x4(y0, y2, 0x88));
    _mm512_storeu_si512(dst + (4 + q) * 64, _mm512_shuffle_i32x4(y0, y2, 0xDD));
    _mm512_storeu_si512(dst + (8 + q) * 64, _mm512_shuffle_i32x4(y1, y3, 0x88));
    _mm512_storeu_si512(dst + (12 + q) * 64, _mm512_shuffle_i32x4(y1, y3, 0xDD));
  }
}

// B tiles of a matrix M [rows, cols <= 32], element (i, j) at m[i * row_stride + j * col_stride], for products over
// its rows, 32 rows a step: tile (s, t) at tiles + (2 s + t) * 1024 has in dword q of row p M[32 s + 2 p][16 t + q]
// low and M[32 s + 2 p + 1][16 t + q] high; zero past rows and cols.
inline void pack_pair_tiles(const pfp::bf16* m, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                            int8_t* tiles) {
  for (int64_t s = 0; s < (rows + 31) / 32; ++s)
    for (int64_t t = 0; t < 2; ++t) {
      uint32_t* tile = reinterpret_cast<uint32_t*>(tiles + (2 * s + t) * kTileBytes);
      for (int64_t p = 0; p < 16; ++p)
        for (int64_t q = 0; q < 16; ++q) {
          const int64_t i = 32 * s + 2 * p, j = 16 * t + q;
          const uint32_t even = i < rows && j < cols ? m[i * row_stride + j * col_stride].bits : 0;
          const uint32_t odd = i + 1 < rows && j < cols ? m[(i + 1) * row_stride + j * col_stride].bits : 0;
          tile[p * 16 + q] = even | odd << 16;
        }
    }
}

// ---- bf16 rounding on AMX hosts, in one instruction ------------------------------------------------------------
// Every CPU with AMX has AVX512-BF16 (pfp::amx_supported checks), whose vcvtne2ps2bf16 rounds 32 fp32 lanes to bf16
// as to_bf16 does (nearest even, a NaN kept quiet), but for a subnormal input, which it takes as zero. The functions
// that call these carry the target themselves: GCC inlines a target function only into one with that target.

// 32 lanes, a's 16 first: for operands of tile products only, which take a subnormal bf16 as zero anyway.
__attribute__((target("avx512bf16"))) inline __m512i tile_bf16(__m512 a, __m512 b) {
  return _mm512_castps_si512(reinterpret_cast<__m512>(_mm512_cvtne2ps_pbh(b, a)));
}

// 32 lanes, a's 16 first, exactly as to_bf16 rounds them: a pair of vectors that holds a subnormal (|v| < 2^-126,
// rare) takes bf16_high16's seven operations a vector.
__attribute__((target("avx512bf16"))) inline __m512i round32_bf16(__m512 a, __m512 b) {
  constexpr int kSubnormal = 0x20;  // vfpclassps: denormal, either sign
  if ((_mm512_fpclass_ps_mask(a, kSubnormal) | _mm512_fpclass_ps_mask(b, kSubnormal)) == 0) return tile_bf16(a, b);
  const __m256i low = _mm512_cvtepi32_epi16(_mm512_srli_epi32(pfp::bf16_high16(a), 16));
  const __m256i high = _mm512_cvtepi32_epi16(_mm512_srli_epi32(pfp::bf16_high16(b), 16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}

// Bytes [c0, c0 + 64) of row `row` of x [rows, row_bytes]: zeros past the row's end or past the last row (masked
// loads read nothing outside the mask).
inline __m512i load_step(const void* x, int64_t rows, int64_t row_bytes, int64_t row, int64_t c0) {
  if (row >= rows || c0 >= row_bytes) return _mm512_setzero_si512();
  const int64_t valid = row_bytes - c0;
  const __mmask64 mask = valid >= 64 ? ~__mmask64(0) : (__mmask64(1) << valid) - 1;
  return _mm512_maskz_loadu_epi8(mask, static_cast<const int8_t*>(x) + row * row_bytes + c0);
}

// 64-byte aligned scratch, left uninitialized: every byte a tile reads is written first (a zero-filled vector cost
// one more pass over a copy of the activations per call).
struct Aligned {
  std::unique_ptr<int8_t[]> storage;
  int8_t* data;
  explicit Aligned(int64_t bytes) : storage(new int8_t[size_t(bytes) + 64]) {
    data = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(storage.get()) + 63) & ~uintptr_t(63));
  }
};

// A [m, row_bytes] as tiles: block(rb) + (2 s + h) * 1024 is the tile of rows [32 rb + 16 h, + 16) and bytes
// [64 s, + 64).
struct PackedA {
  int64_t steps;
  Aligned tiles;
  PackedA(const void* a, int64_t m, int64_t row_bytes, int64_t steps_, int nthreads)
      : steps(steps_), tiles((m + 31) / 32 * 2 * steps_ * kTileBytes) {
    pfp::parallel_for((m + 31) / 32, 32 * row_bytes, nthreads, [&](int64_t begin, int64_t end, int) {
      for (int64_t rb = begin; rb < end; ++rb)
        for (int64_t s = 0; s < steps; ++s)
          for (int i = 0; i < 32; ++i)
            _mm512_store_si512(block(rb) + (2 * s + i / 16) * kTileBytes + (i % 16) * 64,
                               load_step(a, m, row_bytes, 32 * rb + i, 64 * s));
    });
  }
  const int8_t* block(int64_t rb) const { return tiles.data + rb * 2 * steps * kTileBytes; }
  int8_t* block(int64_t rb) { return tiles.data + rb * 2 * steps * kTileBytes; }
};

// out[32, 32] (row stride ldc elements) = a's row block @ a panel of 32 columns of B (tiles of group 0 at b, of group 1
// at b + steps * 1024). kBf16: TDPBF16PS (bf16 pairs, fp32 sums), else TDPBSSD (int8 quads, int32 sums). Tile registers
// are not renamed: the next step's loads wait for this step's products, so the step after next is prefetched into L1
// (both operands stream from L2 otherwise, at about the rate the products need them).
template <bool kBf16, typename T>
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) inline void block_32x32(const int8_t* a, const int8_t* b,
                                                                              int64_t steps, T* out, int64_t ldc) {
  const int8_t* b1 = b + steps * kTileBytes;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    if (s + kPrefetchSteps < steps) {
      const char* a_next = reinterpret_cast<const char*>(a + 2 * (s + kPrefetchSteps) * kTileBytes);
      const char* b_next = reinterpret_cast<const char*>(b + (s + kPrefetchSteps) * kTileBytes);
      const char* b1_next = reinterpret_cast<const char*>(b1 + (s + kPrefetchSteps) * kTileBytes);
      for (int line = 0; line < 32; ++line) _mm_prefetch(a_next + 64 * line, _MM_HINT_T0);
      for (int line = 0; line < 16; ++line) {
        _mm_prefetch(b_next + 64 * line, _MM_HINT_T0);
        _mm_prefetch(b1_next + 64 * line, _MM_HINT_T0);
      }
    }
    _tile_loadd(4, a + 2 * s * kTileBytes, 64);
    _tile_loadd(5, a + (2 * s + 1) * kTileBytes, 64);
    _tile_loadd(6, b + s * kTileBytes, 64);
    _tile_loadd(7, b1 + s * kTileBytes, 64);
    if constexpr (kBf16) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    } else {
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  const int64_t stride = ldc * int64_t(sizeof(T));
  _tile_stored(0, out, stride);
  _tile_stored(1, out + 16, stride);
  _tile_stored(2, out + 16 * ldc, stride);
  _tile_stored(3, out + 16 * ldc + 16, stride);
}

// Rows [r0, r0 + R) of a 32-row block by the columns of kPanels (1 or 2) 32-column B panels, panel_bytes apart (2
// panels R <= 6: 4 R accumulators), over steps [s0, s1): the sums of panel q's columns to out[q] (row stride 32),
// added to what out holds unless s0 is 0.
template <int R, int kPanels>
__attribute__((target("avx512bf16"))) inline void rows_dots(const int8_t* a, const int8_t* b, int64_t steps, int64_t s0,
                                                            int64_t s1, int64_t panel_bytes, int r0,
                                                            float* const* out) {
  constexpr int V = 2 * kPanels;
  __m512 acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v)
      acc[i][v] = s0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(out[v / 2] + (r0 + i) * 32 + 16 * (v % 2));
  for (int64_t s = s0; s < s1; ++s) {
    const int8_t* a_step = a + 2 * s * kTileBytes;
    const int8_t* b_tiles[V];
    for (int v = 0; v < V; ++v) b_tiles[v] = b + (v / 2) * panel_bytes + ((v % 2) * steps + s) * kTileBytes;
    for (int p = 0; p < 16; ++p) {
      __m512bh columns[V];
      for (int v = 0; v < V; ++v) columns[v] = reinterpret_cast<__m512bh>(_mm512_load_si512(b_tiles[v] + 64 * p));
      for (int i = 0; i < R; ++i) {
        // row r0 + i: tile half (r0 + i) / 16 of the step, its row (r0 + i) % 16
        const int row = r0 + i;
        int32_t pair;
        std::memcpy(&pair, a_step + (row / 16) * kTileBytes + (row % 16) * 64 + 4 * p, 4);
        const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], x, columns[v]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out[v / 2] + (r0 + i) * 32 + 16 * (v % 2), acc[i][v]);
}

// block_32x32<true, float>'s blocks by AVX512-BF16's dot products, for hosts without AMX (AMD Zen 4), on the same
// packed operands, for `panels` (1 or 2) adjacent B panels: dword p of a B tile's row holds one column's bf16 pair
// (2p, 2p + 1) of the step, so row p of tile t is that pair for 16 columns, and dword p of an A tile's row i is row
// i's pair: vdpbf16ps of the broadcast A dword with the B row adds both products to each column's fp32 sum (a
// subnormal input counting as zero, as on the tiles). Two panels take rows 6 at a time (4 vectors of columns per
// broadcast), one panel 12 at a time.
__attribute__((target("avx512bf16"))) inline void blocks_dots(const int8_t* a, const int8_t* b, int64_t steps,
                                                              int64_t panel_bytes, int panels, float* const* out) {
  // by kDotSteps steps of K at a time, so the part of the panels the row groups share stays in L2 between them
  for (int64_t s0 = 0; s0 < steps; s0 += kDotSteps) {
    const int64_t s1 = std::min(steps, s0 + kDotSteps);
    if (panels == 2) {
      for (int r0 = 0; r0 < 24; r0 += 6) rows_dots<6, 2>(a, b, steps, s0, s1, panel_bytes, r0, out);
      rows_dots<4, 2>(a, b, steps, s0, s1, panel_bytes, 24, out);
      rows_dots<4, 2>(a, b, steps, s0, s1, panel_bytes, 28, out);
    } else {
      rows_dots<12, 1>(a, b, steps, s0, s1, panel_bytes, 0, out);
      rows_dots<12, 1>(a, b, steps, s0, s1, panel_bytes, 12, out);
      rows_dots<8, 1>(a, b, steps, s0, s1, panel_bytes, 24, out);
    }
  }
}

// Every 32 x 32 block of C = A @ B^T: pack_b(n0, groups, panel) fills panel with groups x steps tiles of B's rows
// [n0, n0 + 16 groups) (group g's tiles at panel + g * steps * 1024, rows past n zero). With c (row stride ldc), a
// block inside [m, n] is stored there directly; every other block (all of them without c) goes to
// emit(row, col, block) as 32 x 32 of T, row stride 32, whose part inside C the caller keeps. Column panels are
// split between threads (row blocks, when there are fewer panels than threads). kTiles false: bf16 only, the blocks
// of two panels at a time by blocks_dots (no tile state), for hosts without AMX.
template <bool kBf16, typename T, bool kTiles = true, typename PackB, typename Emit>
void gemm(const PackedA& a, int64_t m, int64_t n, int nthreads, PackB&& pack_b, T* c, int64_t ldc, Emit&& emit) {
  const int64_t steps = a.steps, panels = (n + 31) / 32, row_blocks = (m + 31) / 32;
  const int64_t panel_bytes = 2 * steps * kTileBytes;
  const int64_t chunk = kTiles ? std::max<int64_t>(1, std::min<int64_t>(8, kChunkBytes / panel_bytes))
                               : std::max<int64_t>(2, std::min<int64_t>(32, kDotChunkBytes / panel_bytes));
  const bool split_columns = panels >= nthreads || panels >= row_blocks;
  const int64_t work = 32 * steps * 64 * (split_columns ? m : n);
  pfp::parallel_for(split_columns ? panels : row_blocks, work, nthreads, [&](int64_t begin, int64_t end, int) {
    const int64_t p0 = split_columns ? begin : 0, p1 = split_columns ? end : panels;
    const int64_t r0 = split_columns ? 0 : begin, r1 = split_columns ? row_blocks : end;
    Aligned panel(chunk * panel_bytes);
    alignas(64) T block[2][32 * 32];
    if constexpr (kTiles) configure();
    for (int64_t pc = p0; pc < p1; pc += chunk) {
      const int64_t count = std::min(chunk, p1 - pc);
      pack_b(32 * pc, 2 * count, panel.data);
      for (int64_t rb = r0; rb < r1; ++rb) {
        const int64_t row = 32 * rb;
        if constexpr (kTiles) {
          for (int64_t p = pc; p < pc + count; ++p) {
            const int64_t col = 32 * p;
            const bool inside = c && row + 32 <= m && col + 32 <= n;
            block_32x32<kBf16>(a.block(rb), panel.data + (p - pc) * panel_bytes, steps,
                               inside ? c + row * ldc + col : block[0], inside ? ldc : 32);
            if (!inside) emit(row, col, static_cast<const T*>(block[0]));
          }
        } else {  // two panels at a time, every block through emit
          static_assert(kBf16 && std::is_same_v<T, float>, "the dot-product blocks are bf16 with fp32 sums");
          for (int64_t p = pc; p < pc + count; p += 2) {
            const int pair = p + 1 < pc + count ? 2 : 1;
            float* const out[2] = {block[0], block[1]};
            blocks_dots(a.block(rb), panel.data + (p - pc) * panel_bytes, steps, panel_bytes, pair, out);
            for (int q = 0; q < pair; ++q) emit(row, 32 * (p + q), static_cast<const T*>(block[q]));
          }
        }
      }
    }
    if constexpr (kTiles) release();
  });
}

}  // namespace amx
}  // namespace PFP_ISA
#else
#define PFP_HAS_AMX 0
#endif
