// The MoE-LoRA forward of one layer on the CPU (AVX-512 + AVX512-BF16, and AMX tiles where the
// CPU has them): one op, one parallel region, four phases with a barrier after each (plus a pack
// phase before them when AMX runs, and a LoRA expand of down before the sum in large batches).
//
// Shape legend: T = tokens, k = experts per token, E = experts, H = hidden, I = intermediate,
// Q = routed pairs kept (ids in [0, E)), grouped by expert and, within an expert, by adapter
// slot; r1 = rg + ru, r2 = rd (per slot).
//
// The math is moe.py's reference_moe:
//   1. rows:    gu[q] = W_gu[e] · x[t]              shrink:  sx[q] = A_gu[s][e] · x[t]
//   2. act:     h[q]  = silu(g + sx[:rg]·Bgᵀ) * (u + sx[rg:]·Buᵀ)
//   3. rows:    d[q]  = W_d[e] · h[q]               shrink:  sh[q] = A_d[s][e] · h[q]
//   4. sum:     y[t]  = Σ_j w[t, j] · (d[q] + sh[q]·Bdᵀ)
// Phases 1 and 3 stream each expert's weight rows once for all of its tokens. LoRA B is
// stored transposed ([E, r, out]) so its expand is a vector FMA over output columns. A pair
// without an adapter never touches LoRA, so its bits equal a run with no adapters loaded.
//
// Methods: fp32 weights run with fp32 activations (FMA); bf16 / int8 / int4 weights are turned
// into bf16 in registers and run with bf16 activations (vdpbf16ps, fp32 accumulation). Experts
// with at least amx_from tokens run phases 1 and 3 on AMX tiles instead (the AMX section).
#include <ATen/ATen.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include "amx.h"

#include <algorithm>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTile = 6;       // tokens per register tile
constexpr int64_t kRowBlock = 16;  // weight rows per task
constexpr int64_t kColBlock = 64;  // output columns per task in phase 4b
constexpr int64_t kTaskBytes = 32768;  // weight bytes per row task (at least kRowBlock rows)
constexpr int64_t kPrefetch = 1024;    // bytes ahead of the next tile's rows (a task's rows are contiguous)

// Software prefetch helps the short rows of int8 / int4 (measured 12-30% on the AMD dev box).
// bf16 / fp32 rows get it in tiles of several tokens (bf16 1.11x at 512 tokens there), not at
// one token, where it cost bf16 5-15%: the hardware prefetcher streams those rows well enough.
template <class W, int M>
inline void prefetch(const void* p) {
  if constexpr (W::kBits < 16 || M > 1) _mm_prefetch((const char*)p, _MM_HINT_T0);
}

// ---- weight stacks [E, N, K]: row(e, n) and 32 (bf16 path) or 16 (fp32 path) values a step

struct F32W {
  static constexpr int64_t kBits = 32;  // fp32 weights, fp32 activations
  using Act = float;
  static constexpr int64_t kStep = 16;
  static constexpr bool kGrouped = false;
  const float* d; int64_t N, K;
  struct Row { const float* p; };
  Row row(int64_t e, int64_t n) const { return {d + (e * N + n) * K}; }
  const void* at(const Row& r, int64_t k) const { return r.p + k; }
  float scale(const Row&, int64_t) const { return 1.f; }
};

struct BF16W {
  static constexpr int64_t kBits = 16;
  using Act = uint16_t;
  static constexpr int64_t kStep = 32;
  static constexpr bool kGrouped = false;
  static constexpr int64_t group = 0;  // ungrouped: one scale per row
  const uint16_t* d; int64_t N, K;
  struct Row { const uint16_t* p; };
  Row row(int64_t e, int64_t n) const { return {d + (e * N + n) * K}; }
  const void* at(const Row& r, int64_t k) const { return r.p + k; }
  __m512bh chunk(const Row& r, int64_t k) const { return (__m512bh)_mm512_loadu_si512(r.p + k); }
  float scale(const Row&, int64_t) const { return 1.f; }
};

struct I8W {
  static constexpr int64_t kBits = 8;  // symmetric per row: w = q * scale[row]
  using Act = uint16_t;
  static constexpr int64_t kStep = 32;
  static constexpr bool kGrouped = false;
  static constexpr int64_t group = 0;
  const int8_t* d; const float* s; int64_t N, K;
  struct Row { const int8_t* p; float scale; };
  Row row(int64_t e, int64_t n) const { return {d + (e * N + n) * K, s[e * N + n]}; }
  const void* at(const Row& r, int64_t k) const { return r.p + k; }
  __m512bh chunk(const Row& r, int64_t k) const {  // int8 values are exact in bf16
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r.p + k))));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r.p + k + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);
  }
  float scale(const Row& r, int64_t) const { return r.scale; }
};

inline constexpr uint16_t bf16_of_small_int(int v) {  // exact for |v| <= 256
  if (v == 0) return 0;
  uint16_t sign = v < 0 ? 0x8000 : 0;
  int a = v < 0 ? -v : v, exp = 0;
  while ((a >> exp) > 1) ++exp;
  uint16_t mant = (uint16_t)(((a << 7) >> exp) & 0x7F);
  return sign | (uint16_t)((127 + exp) << 7) | mant;
}

struct I4W {
  static constexpr int64_t kBits = 4;  // symmetric per group: w = (nibble - 8) * scale[row, group]
  using Act = uint16_t;
  static constexpr int64_t kStep = 32;
  static constexpr bool kGrouped = true;
  const uint8_t* d; const float* s; int64_t N, K, group;
  __m512i lut;
  struct Row { const uint8_t* p; const float* scales; };
  __m512 values;  // (i & 15) - 8 in fp32, lane i
  I4W(const uint8_t* d_, const float* s_, int64_t N_, int64_t K_, int64_t g_) : d(d_), s(s_), N(N_), K(K_), group(g_) {
    alignas(64) uint16_t table[32];
    alignas(64) float f[16];
    for (int i = 0; i < 32; ++i) table[i] = bf16_of_small_int((i & 15) - 8);
    for (int i = 0; i < 16; ++i) f[i] = float(i - 8);
    lut = _mm512_load_si512(table);
    values = _mm512_load_ps(f);
  }
  Row row(int64_t e, int64_t n) const { return {d + (e * N + n) * (K / 2), s + (e * N + n) * (K / group)}; }
  const void* at(const Row& r, int64_t k) const { return r.p + k / 2; }
  __m512bh chunk(const Row& r, int64_t k) const { return chunk(r, k, lut); }
  // 32 values through a 16-entry bf16 table (only its first 16 words are read).
  __m512bh chunk(const Row& r, int64_t k, __m512i table) const {
    // 16 bytes hold elements k..k+31, 2j in the low nibble: dword j = lo | hi << 16 is the pair.
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r.p + k / 2)));
    __m512i pair = _mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)),
                                   _mm512_slli_epi32(_mm512_srli_epi32(b, 4), 16));
    return (__m512bh)_mm512_permutexvar_epi16(pair, table);
  }
  // The table of bf16((nibble - 8) * scale[row, g]): the AMX path's dequantized weights, the
  // same values gpu_prefill.dequantize_into gives (the fp32 product rounded once to bf16).
  __m512i scaled_table(const Row& r, int64_t g) const {
    __m512 v = _mm512_mul_ps(values, _mm512_set1_ps(r.scales[g]));
    return (__m512i)_mm512_cvtne2ps_pbh(v, v);
  }
  float scale(const Row& r, int64_t g) const { return r.scales[g]; }
};

// ---- dot products of R weight rows with M activation rows

template <int R, int M, class W>
inline void dot(const W& w, const typename W::Row* rows, const typename W::Act* const* x, int64_t K,
                float out[R][M]) {
  __m512 tot[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) tot[r][m] = _mm512_setzero_ps();
  if constexpr (std::is_same_v<W, F32W>) {
    for (int64_t k = 0; k < K; k += 16) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(rows[r].p + k);
      for (int m = 0; m < M; ++m) {
        __m512 xv = _mm512_loadu_ps(x[m] + k);
        for (int r = 0; r < R; ++r) tot[r][m] = _mm512_fmadd_ps(wv[r], xv, tot[r][m]);
      }
    }
  } else {
    const int64_t G = W::kGrouped ? w.group : K;
    for (int64_t g0 = 0; g0 < K; g0 += G) {
      __m512 acc[R][M];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = W::kGrouped ? _mm512_setzero_ps() : tot[r][m];
      for (int64_t k = g0; k < g0 + G; k += 32) {
        __m512bh wv[R];
        // ahead of the rows R on (the next tile's): a tile reads its rows side by side, so a
        // distance from each row's own place mostly lands on rows already being read (int4
        // decode 1.2-1.3x, int8 1.1-1.2x on the dev box)
        for (int r = 0; r < R; ++r)
          prefetch<W, M>((const char*)w.at(rows[r], k) + R * K * W::kBits / 8 + kPrefetch), wv[r] = w.chunk(rows[r], k);
        for (int m = 0; m < M; ++m) {
          __m512bh xv = (__m512bh)_mm512_loadu_si512(x[m] + k);
          for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
        }
      }
      for (int r = 0; r < R; ++r) {
        __m512 s = _mm512_set1_ps(w.scale(rows[r], g0 / G));
        for (int m = 0; m < M; ++m)
          tot[r][m] = W::kGrouped ? _mm512_fmadd_ps(acc[r][m], s, tot[r][m]) : acc[r][m];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = W::kGrouped ? 1.f : w.scale(rows[r], 0);
    for (int m = 0; m < M; ++m) out[r][m] = _mm512_reduce_add_ps(tot[r][m]) * s;
  }
}

template <int R, int M, class W>
inline void dot_store(const W& w, const typename W::Row* rows, const typename W::Act* const* x, int64_t K,
                      float* out, int64_t stride) {  // out[m * stride + r]
  float res[R][M];
  dot<R, M>(w, rows, x, K, res);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[m * stride + r] = res[r][m];
}

// Register tiles of dot: up to kTileRows weight rows x kTile tokens, each weight chunk loaded once
// for the tile's tokens and each token chunk once for its rows (int4's second set of accumulators,
// for its group sums, then lives partly in memory: still 1.04x faster at 512 tokens and 1.1x at
// one than 2-row tiles on the dev box).
constexpr int kTileRows = 4;

template <int R, class W>
void row_group_times_tokens(const W& w, const typename W::Row* rows, const typename W::Act* const* x, int64_t n_tok,
                            int64_t K, float* out, int64_t stride) {
  for (int64_t m0 = 0; m0 < n_tok; m0 += kTile) {
    const typename W::Act* const* xm = x + m0;
    float* o = out + m0 * stride;
    switch (std::min(kTile, n_tok - m0)) {
      case 6: dot_store<R, 6>(w, rows, xm, K, o, stride); break;
      case 5: dot_store<R, 5>(w, rows, xm, K, o, stride); break;
      case 4: dot_store<R, 4>(w, rows, xm, K, o, stride); break;
      case 3: dot_store<R, 3>(w, rows, xm, K, o, stride); break;
      case 2: dot_store<R, 2>(w, rows, xm, K, o, stride); break;
      default: dot_store<R, 1>(w, rows, xm, K, o, stride); break;
    }
  }
}

// out[m * stride + (n - n0)] = W[e, n] · x[m] for rows n in [n0, n1) and n_tok tokens.
template <class W>
void rows_times_tokens(const W& w, int64_t e, int64_t n0, int64_t n1, const typename W::Act* const* x,
                       int64_t n_tok, int64_t K, float* out, int64_t stride) {
  constexpr int kR = kTileRows;
  for (int64_t n = n0; n < n1;) {
    const int64_t R = n1 - n >= kR ? kR : n1 - n >= 2 ? 2 : 1;
    typename W::Row rows[kR];
    for (int64_t r = 0; r < R; ++r) rows[r] = w.row(e, n + r);
    float* o = out + (n - n0);
    if (R == kR) row_group_times_tokens<kR>(w, rows, x, n_tok, K, o, stride);
    else if (R == 2) row_group_times_tokens<2>(w, rows, x, n_tok, K, o, stride);
    else row_group_times_tokens<1>(w, rows, x, n_tok, K, o, stride);
    n += R;
  }
}

// ---- AMX tiles (amx.h): 32 weight rows x 32 tokens a step, for experts with many tokens
//
// A tiles are weight rows (16 rows x 32 bf16 of K), B tiles an expert's tokens in VNNI layout,
// C tiles 16 rows x 16 tokens in fp32. The tokens are packed once per expert and phase (not per
// row task): per block of 16 tokens and chunk of 32 values of K, 16 rows of 16 dwords, dword
// [kk][m] = the pair (x[m][32c + 2kk], x[m][32c + 2kk + 1]), a dword transpose of the tokens.
// A block's unused token columns are zero (a C column depends on its own B column only).
// bf16 rows are tile-loaded straight from the [E, N, K] storage (or, with EXPERTLORA_AMX_COPY=1,
// from a copy of the task's 32 rows, for comparison); int8 rows are turned
// into exact bf16 and their scale applied to the C rows, as the AVX-512 path does; int4 rows are
// dequantized with their group scales into bf16 (gpu_prefill's dequantization), so a C tile
// needs no per-group rescaling.

constexpr int64_t kAmxRows = 32;       // two A tiles
constexpr int64_t kBlockVals = 16 * 32;  // bf16 values in one B tile

// Pack n <= 16 token rows x (K values each) into one block of the packed layout.
inline void pack_block(const uint16_t* const* x, int64_t n, int64_t K, uint16_t* block) {
  uint32_t* d = (uint32_t*)block;
  for (int64_t c = 0; c < K / 32; ++c, d += 256)
    for (int64_t m = 0; m < 16; ++m) {
      const uint32_t* s = m < n ? (const uint32_t*)x[m] + c * 16 : nullptr;
      for (int64_t kk = 0; kk < 16; ++kk) d[kk * 16 + m] = s ? s[kk] : 0;
    }
}

// Write 16 bf16 values of token m (the m-th of its block), columns c .. c + 15 (c % 16 == 0), into
// the packed block.
inline void pack16(const uint16_t* v, int64_t m, int64_t c, uint16_t* block) {
  uint32_t* d = (uint32_t*)block + (c / 32) * 256 + ((c % 32) / 2) * 16 + m;
  const uint32_t* s = (const uint32_t*)v;
  for (int i = 0; i < 8; ++i) d[i * 16] = s[i];
}

// bf16 rows n .. n + rows - 1 of expert e (K values each) into dst, for the A tiles.
template <class W>
inline void bf16_rows(const W& w, int64_t e, int64_t n, int64_t rows, int64_t K, uint16_t* dst) {
  if constexpr (std::is_same_v<W, BF16W>) {
    std::memcpy(dst, w.row(e, n).p, rows * K * sizeof(uint16_t));
  } else if constexpr (std::is_same_v<W, I8W>) {
    for (int64_t r = 0; r < rows; ++r) {
      const auto row = w.row(e, n + r);
      for (int64_t k = 0; k < K; k += 32) _mm512_storeu_si512(dst + r * K + k, (__m512i)w.chunk(row, k));
    }
  } else if constexpr (std::is_same_v<W, I4W>) {
    for (int64_t r = 0; r < rows; ++r) {
      const auto row = w.row(e, n + r);
      for (int64_t g = 0; g < K / w.group; ++g) {
        const __m512i table = w.scaled_table(row, g);
        for (int64_t k = g * w.group; k < (g + 1) * w.group; k += 32)
          _mm512_storeu_si512(dst + r * K + k, (__m512i)w.chunk(row, k, table));
      }
    }
  }
}

// What rows_times_tokens computes, on tiles: out[m * stride + (n - n0)] = W[e, n] · x[m] for rows
// [n0, n1) (a multiple of 16 of them) and the expert's tokens m in [m_lo, m_hi), packed from
// `packed` (the expert's first block). The thread's tile configuration is amx::full_tiles().
// direct: bf16 A tiles straight from the weights, else from scratch (32 * K bf16).
template <class W>
EXPERTLORA_AMX_TARGET void rows_times_tokens_amx(const W& w, int64_t e, int64_t n0, int64_t n1, const uint16_t* packed,
                                                 int64_t m_lo, int64_t m_hi, int64_t K, float* out, int64_t stride,
                                                 bool direct, uint16_t* scratch) {
  alignas(64) float c[4][16][16];
  const int64_t b_end = (m_hi + 15) / 16, chunks = K / 32, lda = K * sizeof(uint16_t);
  for (int64_t n = n0; n < n1; n += kAmxRows) {
    const bool full = n1 - n >= kAmxRows;  // else 16 rows: one A tile
    const uint16_t* a = scratch;
    if constexpr (std::is_same_v<W, BF16W>) {
      if (direct) a = w.row(e, n).p;
      else bf16_rows(w, e, n, full ? 32 : 16, K, scratch);
    } else {
      bf16_rows(w, e, n, full ? 32 : 16, K, scratch);
    }
    EXPERTLORA_COMPILER_FENCE();  // the scratch rows are in memory before the tile loads
    for (int64_t b = m_lo / 16; b < b_end; b += 2) {
      const bool two = b + 1 < b_end;
      const uint16_t* b0 = packed + b * 16 * K;
      const uint16_t* b1 = b0 + 16 * K;
      EXPERTLORA_TILE_ZERO(0);
      EXPERTLORA_TILE_ZERO(1);
      EXPERTLORA_TILE_ZERO(2);
      EXPERTLORA_TILE_ZERO(3);
      if (full)
        for (int64_t ch = 0; ch < chunks; ++ch) {
          EXPERTLORA_TILE_LOAD(4, a + ch * 32, lda);
          EXPERTLORA_TILE_LOAD(5, a + 16 * K + ch * 32, lda);
          EXPERTLORA_TILE_LOAD(6, b0 + ch * kBlockVals, 64);
          EXPERTLORA_TILE_DP(0, 4, 6);
          EXPERTLORA_TILE_DP(1, 5, 6);
          if (two) {
            EXPERTLORA_TILE_LOAD(7, b1 + ch * kBlockVals, 64);
            EXPERTLORA_TILE_DP(2, 4, 7);
            EXPERTLORA_TILE_DP(3, 5, 7);
          }
        }
      else
        for (int64_t ch = 0; ch < chunks; ++ch) {
          EXPERTLORA_TILE_LOAD(4, a + ch * 32, lda);
          EXPERTLORA_TILE_LOAD(6, b0 + ch * kBlockVals, 64);
          EXPERTLORA_TILE_DP(0, 4, 6);
          if (two) {
            EXPERTLORA_TILE_LOAD(7, b1 + ch * kBlockVals, 64);
            EXPERTLORA_TILE_DP(2, 4, 7);
          }
        }
      EXPERTLORA_TILE_STORE(0, c[0], 64);
      EXPERTLORA_TILE_STORE(1, c[1], 64);
      EXPERTLORA_TILE_STORE(2, c[2], 64);
      EXPERTLORA_TILE_STORE(3, c[3], 64);
      // c[i][r][j]: row n + 16 (i % 2) + r, token 16 (b + i / 2) + j
      for (int i = 0; i < (two ? 4 : 2); ++i) {
        if (i % 2 && !full) continue;
        const int64_t m0 = 16 * (b + i / 2), r0 = 16 * (i % 2);
        float s[16];
        for (int r = 0; r < 16; ++r) s[r] = std::is_same_v<W, I8W> ? w.scale(w.row(e, n + r0 + r), 0) : 1.f;
        for (int64_t m = std::max(m0, m_lo); m < std::min(m0 + 16, m_hi); ++m) {
          float* o = out + m * stride + (n - n0) + r0;
          for (int r = 0; r < 16; ++r) o[r] = c[i][r][m - m0] * s[r];
        }
      }
    }
  }
}

EXPERTLORA_AMX_TARGET inline void tiles_on() {
  static const amx::Config cfg = amx::full_tiles();
  amx::load_config(&cfg);
}
EXPERTLORA_AMX_TARGET inline void tiles_off() { amx::release(); }

// ---- element-wise helpers

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }

inline __m512 exp16(__m512 x) {  // e^x = 2^n · 2^f, |f| <= 1/2, Taylor to degree 7 (rel. error < 1e-7)
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  const float c[] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, n);
}

inline __m512 silu16(__m512 g) {
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

// v += Σ_j s[j] · bt[j * ld + c .. +16]: the LoRA expand for 16 output columns.
template <class LT>
inline __m512 expand16(__m512 v, const float* s, const LT* bt, int64_t r, int64_t ld) {
  for (int64_t j = 0; j < r; ++j) v = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), load16(bt + j * ld), v);
  return v;
}

// expand16 for n pairs of one expert and adapter: v[i * vs ..] += Σ_j s[i * ss + j] · bt[j * ld ..],
// the same multiply-adds in the same order per pair (so the same bits), with B's 16 columns
// converted once per 16 ranks for all n pairs instead of once per pair.
template <class LT>
inline void expand16_pairs(float* v, int64_t vs, int64_t n, const float* s, int64_t ss, const LT* bt, int64_t r,
                           int64_t ld) {
  for (int64_t j0 = 0; j0 < r; j0 += 16) {
    __m512 b[16];
    const int64_t nj = std::min<int64_t>(16, r - j0);
    for (int64_t j = 0; j < nj; ++j) b[j] = load16(bt + (j0 + j) * ld);
    for (int64_t i = 0; i < n; ++i) {
      __m512 x = _mm512_loadu_ps(v + i * vs);
      const float* si = s + i * ss + j0;
      if (nj == 16) {
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) x = _mm512_fmadd_ps(_mm512_set1_ps(si[j]), b[j], x);
      } else {
        for (int64_t j = 0; j < nj; ++j) x = _mm512_fmadd_ps(_mm512_set1_ps(si[j]), b[j], x);
      }
      _mm512_storeu_ps(v + i * vs, x);
    }
  }
}

// ---- the op

inline bool env_is(const char* name, char value) {
  const char* v = std::getenv(name);
  return v && v[0] == value && v[1] == 0;
}

// The op's intermediates (gate/up and down outputs, h, LoRA shrinks, packed tokens: about 90 MB
// for 512 Qwen3-30B-A3B tokens), kept from call to call: allocations this large come fresh from
// the kernel each call (malloc's mmap / trim thresholds) and fault their pages in again, which
// measured ~20,000 page faults a call at 512 tokens. One is kept per process, grow-only up to
// kKeepBytes (a call that needs more, or finds it in use by another thread, takes its own). It
// grows with a quarter of headroom: the AMX path's padded token blocks make the size vary a
// little with the routing, and growing by exactly that much reallocated (and faulted in) the
// whole buffer in 3 of 6 calls at 2048 tokens on the device.
class Workspace {
 public:
  static constexpr size_t kKeepBytes = size_t(512) << 20;
  static size_t rounded(size_t bytes) { return (bytes + 63) / 64 * 64; }
  // One 64-byte-aligned region per size, in one buffer (reused when large enough).
  std::vector<char*> regions(const std::vector<size_t>& bytes) {
    size_t need = 64;
    for (size_t b : bytes) need += rounded(b);
    if (need > size_) {
      need = rounded(need + need / 4);
      buf_.reset(static_cast<char*>(std::aligned_alloc(64, need)));
      TORCH_CHECK(buf_, "expertlora: could not allocate ", need, " bytes of kernel workspace");
      size_ = need;
    }
    std::vector<char*> out;
    char* p = buf_.get();
    for (size_t b : bytes) out.push_back(p), p += rounded(b);
    return out;
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> buf_;
  size_t size_ = 0;
};

inline int64_t rows_per_task(int64_t row_bytes) {
  return std::max(kRowBlock, (kTaskBytes / std::max<int64_t>(row_bytes, 1)) & ~int64_t(1));
}

template <class W>
W make_stack(const at::Tensor& w, const at::Tensor& s, int64_t K, int64_t group) {
  const int64_t N = w.size(1);
  if constexpr (std::is_same_v<W, F32W>) return {w.data_ptr<float>(), N, K};
  else if constexpr (std::is_same_v<W, BF16W>) return {(const uint16_t*)w.data_ptr<at::BFloat16>(), N, K};
  else if constexpr (std::is_same_v<W, I8W>) return {w.data_ptr<int8_t>(), s.data_ptr<float>(), N, K};
  else return I4W(w.data_ptr<uint8_t>(), s.data_ptr<float>(), N, K, group);
}

// LoRA tensors share the activation dtype: fp32 with F32W, bf16 otherwise.
template <class W>
using LoRAStack = std::conditional_t<std::is_same_v<W, F32W>, F32W, BF16W>;

template <class W>
struct Slot {
  LoRAStack<W> a_gu, a_d;                // [E, rg + ru, H], [E, rd, I]
  const typename W::Act *bt_g, *bt_u, *bt_d;  // [E, rg, I], [E, ru, I], [E, rd, H]  (scaled)
  int64_t rg, ru, rd;
};

template <class W>
at::Tensor forward(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                   const at::Tensor& token_slots, const at::Tensor& w_gu, const at::Tensor& s_gu,
                   const at::Tensor& w_d, const at::Tensor& s_d, int64_t group_gu, int64_t group_d,
                   at::TensorList a_gu, at::TensorList bt_g, at::TensorList bt_u, at::TensorList a_d,
                   at::TensorList bt_d, int64_t num_threads, int64_t amx_from) {
  using Act = typename W::Act;
  const int64_t T = x.size(0), H = x.size(1), k = topk_ids.size(1), E = w_gu.size(0), I = w_gu.size(1) / 2;
  if constexpr (W::kGrouped) {  // each group is whole steps of 32 and the groups tile the row
    TORCH_CHECK_VALUE(group_gu > 0 && group_gu % 32 == 0 && H % group_gu == 0, "int4 gate_up group ", group_gu,
                      ": expected a multiple of 32 dividing H = ", H);
    TORCH_CHECK_VALUE(group_d > 0 && group_d % 32 == 0 && I % group_d == 0, "int4 down group ", group_d,
                      ": expected a multiple of 32 dividing I = ", I);
  }
  const W gu = make_stack<W>(w_gu, s_gu, H, group_gu);
  const W dn = make_stack<W>(w_d, s_d, I, group_d);
  using LW = LoRAStack<W>;

  std::vector<Slot<W>> slots;
  int64_t r1 = 0, r2 = 0;
  for (size_t s = 0; s < a_gu.size(); ++s) {
    Slot<W> l{make_stack<LW>(a_gu[s], a_gu[s], H, 0), make_stack<LW>(a_d[s], a_d[s], I, 0),
              (const Act*)bt_g[s].data_ptr(), (const Act*)bt_u[s].data_ptr(), (const Act*)bt_d[s].data_ptr(),
              bt_g[s].size(1), bt_u[s].size(1), bt_d[s].size(1)};
    r1 = std::max(r1, l.rg + l.ru);
    r2 = std::max(r2, l.rd);
    slots.push_back(l);
  }

  // Group the routed pairs by (expert, slot): a counting sort, stable in pair order, so each
  // expert's tokens of one adapter are consecutive and their LoRA shrink is one call.
  const int64_t* ids = topk_ids.data_ptr<int64_t>();
  const int64_t* tslot = token_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK_VALUE(tslot[t] >= -1 && tslot[t] < (int64_t)slots.size(), "token_slots: slot ", tslot[t],
                      " holds no adapter (", slots.size(), " slots)");
  const int64_t S1 = (int64_t)slots.size() + 1;  // slot -1 .. S - 1
  std::vector<int64_t> key_start(E * S1 + 1, 0);
  for (int64_t p = 0; p < T * k; ++p)
    if (ids[p] >= 0 && ids[p] < E) ++key_start[ids[p] * S1 + tslot[p / k] + 2];
  for (int64_t i = 0; i < E * S1; ++i) key_start[i + 1] += key_start[i];
  std::vector<int64_t> count(E + 1);  // expert e's pairs: [count[e], count[e + 1])
  for (int64_t e = 0; e <= E; ++e) count[e] = key_start[e * S1];
  const int64_t Q = count[E];
  std::vector<int64_t> next(key_start.begin(), key_start.end() - 1), q_of(T * k, -1), q_exp(Q), q_slot(Q);
  std::vector<const Act*> q_x(Q), q_h(Q);
  const Act* xp = (const Act*)x.data_ptr();
  for (int64_t p = 0; p < T * k; ++p) {
    if (ids[p] < 0 || ids[p] >= E) continue;
    const int64_t t = p / k, q = next[ids[p] * S1 + tslot[t] + 1]++;
    q_of[p] = q, q_exp[q] = ids[p], q_slot[q] = tslot[t], q_x[q] = xp + t * H;
  }
  std::vector<int64_t> active;  // experts with tokens
  for (int64_t e = 0; e < E; ++e)
    if (count[e + 1] > count[e]) active.push_back(e);
  // AMX: experts with at least amx_from pairs run their rows on tiles (fp32 weights never do).
  std::vector<int64_t> pad_off(E + 1, 0);  // expert e's packed tokens start at pad_off[e] (16 a block)
  std::vector<std::pair<int64_t, int64_t>> pack_tasks;  // (expert, block)
  if constexpr (!std::is_same_v<W, F32W>) {
    if (amx_from > 0 && amx::enable())
      for (int64_t e = 0; e < E; ++e) {
        const int64_t n = count[e + 1] - count[e], blocks = n >= amx_from ? (n + 15) / 16 : 0;
        for (int64_t b = 0; b < blocks; ++b) pack_tasks.push_back({e, b});
        pad_off[e + 1] = pad_off[e] + 16 * blocks;
      }
  }
  const bool use_amx = !pack_tasks.empty();
  // bf16 A tiles straight from the weights; EXPERTLORA_AMX_COPY=1 (a measurement switch) loads
  // them from a copy of the task's rows, which measured 5-20% slower on the device at 64-512 tokens
  const bool direct = !env_is("EXPERTLORA_AMX_COPY", '1');
  auto is_amx = [&](int64_t e) { return pad_off[e + 1] > pad_off[e]; };
  auto amx_rows = [](int64_t rows) { return rows > 0 && rows % 16 == 0; };  // LoRA shrinks on tiles
  // the end of the run of pairs of q's expert and adapter that starts at q, within [q, q_end)
  auto run_end = [&](int64_t q, int64_t q_end) {
    int64_t end = q + 1;
    while (end < q_end && q_exp[end] == q_exp[q] && q_slot[end] == q_slot[q]) ++end;
    return end;
  };

  // LoRA tasks: runs of one expert and adapter, at most kLoRATokens pairs each on AVX-512, whole
  // on AMX (tiles cost the same for 1 and 16 tokens; a block two runs share is computed twice)
  constexpr int64_t kLoRATokens = 16;
  std::vector<std::pair<int64_t, int64_t>> lora_runs;
  for (int64_t i = 0; i < E * S1; ++i)
    if (i % S1 > 0)
      for (int64_t q = key_start[i], step = is_amx(i / S1) ? Q : kLoRATokens; q < key_start[i + 1]; q += step)
        lora_runs.push_back({q, std::min(q + step, key_start[i + 1])});

  // The intermediates, from the kept workspace (Workspace says why)
  const std::vector<size_t> sizes = {size_t(Q * 2 * I) * 4, size_t(Q * H) * 4, size_t(Q * r1) * 4, size_t(Q * r2) * 4,
                                     size_t(Q * I) * sizeof(Act), size_t(pad_off[E] * H) * 2, size_t(pad_off[E] * I) * 2};
  size_t total = 0;
  for (size_t b : sizes) total += Workspace::rounded(b);
  static std::mutex ws_mutex;
  static Workspace kept;
  std::unique_lock<std::mutex> ws_lock(ws_mutex, std::defer_lock);
  if (total <= Workspace::kKeepBytes) ws_lock.try_lock();
  Workspace fresh;
  const auto reg = (ws_lock.owns_lock() ? kept : fresh).regions(sizes);
  float *gup = (float*)reg[0], *dp = (float*)reg[1], *sxp = (float*)reg[2], *shp = (float*)reg[3];
  Act* hp = (Act*)reg[4];
  uint16_t *xpk = (uint16_t*)reg[5], *hpk = (uint16_t*)reg[6];
  auto y = at::empty({T, H}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const bool profile = env_is("EXPERTLORA_PROFILE", '1');
  double stamp[6] = {omp_get_wtime(), 0, 0, 0, 0, 0};
  for (int64_t q = 0; q < Q; ++q) q_h[q] = hp + q * I;
  const float* wts = topk_weights.data_ptr<float>();

  const int64_t n_active = active.size(), n_lora = lora_runs.size(), n_pack = pack_tasks.size();
  // Rows per task: about kTaskBytes of weights, so short quantized rows still stream well;
  // whole pairs of A tiles where any expert runs on AMX.
  auto task_rows = [&](int64_t row_bytes) {
    const int64_t r = rows_per_task(row_bytes);
    return use_amx ? (r + kAmxRows - 1) / kAmxRows * kAmxRows : r;
  };
  const int64_t gu_rows = task_rows(H * W::kBits / 8), d_rows = task_rows(I * W::kBits / 8);
  const int64_t gu_blocks = (2 * I + gu_rows - 1) / gu_rows, d_blocks = (H + d_rows - 1) / d_rows;
  const int64_t h_cols = (H + kColBlock - 1) / kColBlock;
  constexpr int64_t kPairChunk = 8;  // pairs per task in phases 2 and 4a of large batches
  const bool by_chunks = Q >= 4 * kPairChunk * num_threads;  // at least 4 chunks a thread
  const int64_t pair_chunk = by_chunks ? kPairChunk : 1, pair_tasks = (Q + pair_chunk - 1) / pair_chunk;
  const int64_t i_block = by_chunks ? I : kColBlock, i_blocks = (I + i_block - 1) / i_block;

#pragma omp parallel num_threads(num_threads)
  {
    static thread_local std::vector<uint16_t> scratch;  // a row task's 32 bf16 rows (AMX path)
    if (use_amx) {
      if (scratch.size() < (size_t)(kAmxRows * std::max(H, I))) scratch.resize(kAmxRows * std::max(H, I));
      tiles_on();
    }
    uint16_t* scr = scratch.data();
    // 0. pack the tokens of AMX experts (zero columns past the last token, in x and h alike)
    if (use_amx) {
#pragma omp for schedule(dynamic, 4)
      for (int64_t task = 0; task < n_pack; ++task) {
        const auto [e, b] = pack_tasks[task];
        const int64_t q0 = count[e] + 16 * b, n = std::min<int64_t>(16, count[e + 1] - q0);
        pack_block((const uint16_t* const*)&q_x[q0], n, H, xpk + (pad_off[e] + 16 * b) * H);
        if (n < 16) pack_block((const uint16_t* const*)&q_x[q0], 0, I, hpk + (pad_off[e] + 16 * b) * I);
      }
    }
#pragma omp master
    stamp[1] = omp_get_wtime();
    // 1. LoRA shrink of x (first, so it is not the tail); gate/up rows of every active expert
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_lora + n_active * gu_blocks; ++task) {
      if (task < n_lora) {
        const auto [q0, q1] = lora_runs[task];
        const auto& l = slots[q_slot[q0]];
        const int64_t e = q_exp[q0], rows = l.rg + l.ru;
        if constexpr (!std::is_same_v<W, F32W>)
          if (is_amx(e) && amx_rows(rows)) {
            rows_times_tokens_amx(l.a_gu, e, 0, rows, xpk + pad_off[e] * H, q0 - count[e], q1 - count[e], H,
                                  sxp + count[e] * r1, r1, true, scr);
            continue;
          }
        rows_times_tokens(l.a_gu, e, 0, rows, &q_x[q0], q1 - q0, H, sxp + q0 * r1, r1);
      } else {
        const int64_t b = task - n_lora, e = active[b / gu_blocks], n0 = (b % gu_blocks) * gu_rows;
        const int64_t q0 = count[e], n = count[e + 1] - q0, n1 = std::min(n0 + gu_rows, 2 * I);
        if constexpr (!std::is_same_v<W, F32W>)
          if (is_amx(e)) {
            rows_times_tokens_amx(gu, e, n0, n1, xpk + pad_off[e] * H, 0, n, H, gup + q0 * 2 * I + n0, 2 * I, direct, scr);
            continue;
          }
        rows_times_tokens(gu, e, n0, n1, &q_x[q0], n, H, gup + q0 * 2 * I + n0, 2 * I);
      }
    }
#pragma omp master
    stamp[2] = omp_get_wtime();
    // 2. LoRA expand of gate and up, activation (into the packed tokens too, for AMX experts).
    // Large batches: tasks of kPairChunk consecutive pairs (mostly one expert and adapter: its
    // LoRA B columns stay in L1 from pair to pair); tasks of one pair and 64 columns spent more
    // time taking tasks than computing there (about 3.7 ms at 512 Qwen3 tokens on the device).
    // Small batches: tasks of one pair and 64 columns, so that every thread has some.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < pair_tasks * i_blocks; ++task) {
      const int64_t qa = task / i_blocks * pair_chunk, qb = std::min(qa + pair_chunk, Q);
      const int64_t ca = task % i_blocks * i_block, cb = std::min(ca + i_block, I);
      for (int64_t qs = qa, qe; qs < qb; qs = qe) {  // runs of one expert and adapter
        const int64_t e = q_exp[qs], slot = q_slot[qs], n = (qe = run_end(qs, qb)) - qs;
        for (int64_t c = ca; c < cb; c += 16) {
          alignas(64) float g[kPairChunk][16], u[kPairChunk][16];
          for (int64_t i = 0; i < n; ++i) {
            const float* g_row = gup + (qs + i) * 2 * I;
            _mm512_store_ps(g[i], load16(g_row + c));
            _mm512_store_ps(u[i], load16(g_row + I + c));
          }
          if (slot >= 0) {
            const auto& l = slots[slot];
            expand16_pairs(g[0], 16, n, sxp + qs * r1, r1, l.bt_g + e * l.rg * I + c, l.rg, I);
            expand16_pairs(u[0], 16, n, sxp + qs * r1 + l.rg, r1, l.bt_u + e * l.ru * I + c, l.ru, I);
          }
          for (int64_t i = 0; i < n; ++i) {
            const int64_t q = qs + i;
            store16(hp + q * I + c, _mm512_mul_ps(silu16(_mm512_load_ps(g[i])), _mm512_load_ps(u[i])));
            if constexpr (!std::is_same_v<W, F32W>)
              if (is_amx(e)) {
                const int64_t m = q - count[e];
                pack16(hp + q * I + c, m % 16, c, hpk + (pad_off[e] + m / 16 * 16) * I);
              }
          }
        }
      }
    }
#pragma omp master
    stamp[3] = omp_get_wtime();
    // 3. LoRA shrink of h; down rows of every active expert
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_lora + n_active * d_blocks; ++task) {
      if (task < n_lora) {
        const auto [q0, q1] = lora_runs[task];
        const auto& l = slots[q_slot[q0]];
        const int64_t e = q_exp[q0];
        if constexpr (!std::is_same_v<W, F32W>)
          if (is_amx(e) && amx_rows(l.rd)) {
            rows_times_tokens_amx(l.a_d, e, 0, l.rd, hpk + pad_off[e] * I, q0 - count[e], q1 - count[e], I,
                                  shp + count[e] * r2, r2, true, scr);
            continue;
          }
        rows_times_tokens(l.a_d, e, 0, l.rd, &q_h[q0], q1 - q0, I, shp + q0 * r2, r2);
      } else {
        const int64_t b = task - n_lora, e = active[b / d_blocks], n0 = (b % d_blocks) * d_rows;
        const int64_t q0 = count[e], n = count[e + 1] - q0, n1 = std::min(n0 + d_rows, H);
        if constexpr (!std::is_same_v<W, F32W>)
          if (is_amx(e)) {
            rows_times_tokens_amx(dn, e, n0, n1, hpk + pad_off[e] * I, 0, n, I, dp + q0 * H + n0, H, direct, scr);
            continue;
          }
        rows_times_tokens(dn, e, n0, n1, &q_h[q0], n, I, dp + q0 * H + n0, H);
      }
    }
#pragma omp master
    stamp[4] = omp_get_wtime();
    // 4a. Large batches: LoRA expand of down, in place, by chunks of pairs as in phase 2 (per
    // token in phase 4b, each pair read its expert's B columns again: 268 MB at 512 Qwen3 tokens)
    if (by_chunks && n_lora > 0) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < pair_tasks; ++task) {
        const int64_t qa = task * kPairChunk, qb = std::min(qa + kPairChunk, Q);
        for (int64_t qs = qa, qe; qs < qb; qs = qe) {  // runs of one expert and adapter
          const int64_t e = q_exp[qs], slot = q_slot[qs];
          qe = run_end(qs, qb);
          if (slot < 0) continue;
          const auto& l = slots[slot];
          for (int64_t c = 0; c < H; c += 16)
            expand16_pairs(dp + qs * H + c, H, qe - qs, shp + qs * r2, r2, l.bt_d + e * l.rd * H + c, l.rd, H);
        }
      }
    }
    // 4b. the routing-weight sum, in the order of the token's k choices (small batches: with the
    // LoRA expand of down; the same operations as 4a's, so the same bits)
#pragma omp for schedule(static)
    for (int64_t task = 0; task < T * h_cols; ++task) {
      const int64_t t = task / h_cols, c0 = (task % h_cols) * kColBlock;
      for (int64_t c = c0; c < std::min(c0 + kColBlock, H); c += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < k; ++j) {
          const int64_t q = q_of[t * k + j];
          if (q < 0) continue;
          __m512 d = load16(dp + q * H + c);
          if (!by_chunks && q_slot[q] >= 0) {
            const auto& l = slots[q_slot[q]];
            d = expand16(d, shp + q * r2, l.bt_d + q_exp[q] * l.rd * H + c, l.rd, H);
          }
          acc = _mm512_fmadd_ps(_mm512_set1_ps(wts[t * k + j]), d, acc);
        }
        _mm512_storeu_ps(yp + t * H + c, acc);
      }
    }
    if (use_amx) tiles_off();
  }
  if (profile) {  // a measurement aid: each phase's wall time (set-up includes the pair sort)
    stamp[5] = omp_get_wtime();
    std::fprintf(stderr, "expertlora T=%lld amx=%d: pack %.2f gate/up %.2f act %.2f down %.2f sum %.2f ms\n", (long long)T,
                 (int)use_amx, 1e3 * (stamp[1] - stamp[0]), 1e3 * (stamp[2] - stamp[1]), 1e3 * (stamp[3] - stamp[2]),
                 1e3 * (stamp[4] - stamp[3]), 1e3 * (stamp[5] - stamp[4]));
  }
  return y;
}

// method: 0 fp32, 1 bf16, 2 int8, 3 int4 (quantize.py's storage). x is fp32 for fp32, else bf16;
// H and I are multiples of 32. int4 has a group size per projection: group_gu divides H (the
// input of gate_up), group_d divides I (the input of down); both are multiples of 32. The
// Python side checks all of this; the int4 groups are checked here too.
at::Tensor moe_lora(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                    const at::Tensor& token_slots, const at::Tensor& w_gu, const at::Tensor& s_gu,
                    const at::Tensor& w_d, const at::Tensor& s_d, int64_t method, int64_t group_gu,
                    int64_t group_d, at::TensorList a_gu, at::TensorList bt_g, at::TensorList bt_u,
                    at::TensorList a_d, at::TensorList bt_d, int64_t threads, int64_t amx_from) {
#define EXPERTLORA_FORWARD(W) \
  forward<W>(x, topk_ids, topk_weights, token_slots, w_gu, s_gu, w_d, s_d, group_gu, group_d, a_gu, bt_g, bt_u, a_d, bt_d, \
             threads, amx_from)
  switch (method) {
    case 0: return EXPERTLORA_FORWARD(F32W);
    case 1: return EXPERTLORA_FORWARD(BF16W);
    case 2: return EXPERTLORA_FORWARD(I8W);
    default: return EXPERTLORA_FORWARD(I4W);
  }
#undef EXPERTLORA_FORWARD
}

// A layer call captured in a CUDA graph, whose CPU part a host function runs in the graph
// (hybrid_graph.py, KernelHostCalls): the call's pinned buffers, the layer's weights, the
// adapters' LoRA as at the capture, and the last error. The host function calls no CUDA and
// needs no Python: the stream runs it once the buffers have landed and goes on when it returns.
struct HostCall {
  at::Tensor x, ids, weights, slots, out, w_gu, s_gu, w_d, s_d;
  int64_t method, group_gu, group_d, threads, amx_from;
  std::vector<at::Tensor> a_gu, bt_g, bt_u, a_d, bt_d;
  std::string error;  // set by a failed run, read (and cleared) by the caller after the step

  void run() noexcept {
    try {
      out.copy_(moe_lora(x, ids, weights, slots, w_gu, s_gu, w_d, s_d, method, group_gu, group_d, a_gu, bt_g, bt_u, a_d,
                         bt_d, threads, amx_from));
    } catch (const c10::Error& e) {  // TORCH_CHECK's: the message without its backtrace
      error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      error = e.what();
    } catch (...) {
      error = "unknown error";
    }
  }
};

HostCall* host_call_at(int64_t address) {
  TORCH_CHECK(address != 0, "expertlora: no host call at address 0");
  return reinterpret_cast<HostCall*>(address);
}

void run_host_call(void* call) { static_cast<HostCall*>(call)->run(); }  // cuLaunchHostFunc's signature

int64_t host_call_new(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& slots,
                      const at::Tensor& out, const at::Tensor& w_gu, const at::Tensor& s_gu, const at::Tensor& w_d,
                      const at::Tensor& s_d, int64_t method, int64_t group_gu, int64_t group_d, at::TensorList a_gu,
                      at::TensorList bt_g, at::TensorList bt_u, at::TensorList a_d, at::TensorList bt_d, int64_t threads,
                      int64_t amx_from) {
  auto* call = new HostCall{x, ids, weights, slots, out, w_gu, s_gu, w_d, s_d, method, group_gu, group_d, threads, amx_from,
                            a_gu.vec(), bt_g.vec(), bt_u.vec(), a_d.vec(), bt_d.vec()};
  return reinterpret_cast<int64_t>(call);
}

std::string host_call_take_error(int64_t address) {
  std::string error;
  std::swap(error, host_call_at(address)->error);
  return error;
}

void host_call_run(int64_t address) { host_call_at(address)->run(); }  // the host function's work, called directly (tests)

void host_call_free(int64_t address) { delete host_call_at(address); }

int64_t host_call_function() { return reinterpret_cast<int64_t>(&run_host_call); }

}  // namespace

// The emulated build (EXPERTLORA_AMX_EMULATE, for tests on CPUs without AMX) registers the same
// op under its own namespace, so both builds load in one process.
#ifdef EXPERTLORA_AMX_EMULATE
TORCH_LIBRARY(expertlora_cpu_emu, m) {
#else
TORCH_LIBRARY(expertlora_cpu, m) {
#endif
  m.def(
      "moe_lora(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor token_slots, Tensor w_gu, "
      "Tensor s_gu, Tensor w_d, Tensor s_d, int method, int group_gu, int group_d, Tensor[] a_gu, "
      "Tensor[] bt_g, Tensor[] bt_u, Tensor[] a_d, Tensor[] bt_d, int threads, int amx_from=0) -> Tensor");
  m.impl("moe_lora", c10::DispatchKey::CPU, TORCH_FN(moe_lora));
  // Host calls (HostCall above), by address: made once per captured layer call, freed with it.
  m.def("host_call_new(Tensor x, Tensor ids, Tensor weights, Tensor slots, Tensor out, Tensor w_gu, Tensor s_gu, "
        "Tensor w_d, Tensor s_d, int method, int group_gu, int group_d, Tensor[] a_gu, Tensor[] bt_g, Tensor[] bt_u, "
        "Tensor[] a_d, Tensor[] bt_d, int threads, int amx_from) -> int", &host_call_new);
  m.def("host_call_take_error(int call) -> str", &host_call_take_error);
  m.def("host_call_run(int call) -> ()", &host_call_run);
  m.def("host_call_free(int call) -> ()", &host_call_free);
  m.def("host_call_function() -> int", &host_call_function);
}
