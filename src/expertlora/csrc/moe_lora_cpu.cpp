// The MoE-LoRA forward of one layer on the CPU (AVX-512 + AVX512-BF16): one op, one parallel
// region, four phases with a barrier after each.
//
// Shape legend: T = tokens, k = experts per token, E = experts, H = hidden, I = intermediate,
// Q = routed pairs kept (ids in [0, E)), grouped by expert; r1 = rg + ru, r2 = rd (per slot).
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
// into bf16 in registers and run with bf16 activations (vdpbf16ps, fp32 accumulation).
#include <ATen/ATen.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTile = 4;       // tokens per register tile
constexpr int64_t kRowBlock = 16;  // weight rows per task
constexpr int64_t kColBlock = 64;  // output columns per task in phases 2 and 4
constexpr int64_t kTaskBytes = 32768;  // weight bytes per row task (at least kRowBlock rows)
constexpr int64_t kPrefetch = 1024;    // bytes ahead: the rows of a task are contiguous

// Software prefetch helps the short rows of int8 / int4 (measured 12-30% on the AMD dev box)
// and cost bf16 about 5% there, whose rows the hardware prefetcher already streams well.
template <class W>
inline void prefetch(const void* p) {
  if constexpr (W::kBits < 16) _mm_prefetch((const char*)p + kPrefetch, _MM_HINT_T0);
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
  I4W(const uint8_t* d_, const float* s_, int64_t N_, int64_t K_, int64_t g_) : d(d_), s(s_), N(N_), K(K_), group(g_) {
    alignas(64) uint16_t table[32];
    for (int i = 0; i < 32; ++i) table[i] = bf16_of_small_int((i & 15) - 8);
    lut = _mm512_load_si512(table);
  }
  Row row(int64_t e, int64_t n) const { return {d + (e * N + n) * (K / 2), s + (e * N + n) * (K / group)}; }
  const void* at(const Row& r, int64_t k) const { return r.p + k / 2; }
  __m512bh chunk(const Row& r, int64_t k) const {
    // 16 bytes hold elements k..k+31, 2j in the low nibble: dword j = lo | hi << 16 is the pair.
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r.p + k / 2)));
    __m512i pair = _mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)),
                                   _mm512_slli_epi32(_mm512_srli_epi32(b, 4), 16));
    return (__m512bh)_mm512_permutexvar_epi16(pair, lut);
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
        for (int r = 0; r < R; ++r) prefetch<W>(w.at(rows[r], k)), wv[r] = w.chunk(rows[r], k);
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

// out[m * stride + (n - n0)] = W[e, n] · x[m] for rows n in [n0, n1) and n tokens.
template <class W>
void rows_times_tokens(const W& w, int64_t e, int64_t n0, int64_t n1, const typename W::Act* const* x,
                       int64_t n_tok, int64_t K, float* out, int64_t stride) {
  for (int64_t n = n0; n < n1; n += 2) {
    typename W::Row rows[2] = {w.row(e, n), w.row(e, std::min(n + 1, n1 - 1))};
    const bool two = n + 1 < n1;
    for (int64_t m0 = 0; m0 < n_tok; m0 += kTile) {
      const int64_t M = std::min(kTile, n_tok - m0);
      float* o = out + m0 * stride + (n - n0);
      const typename W::Act* const* xm = x + m0;
#define EXPERTLORA_DOT(MM)                              \
  if (two) dot_store<2, MM>(w, rows, xm, K, o, stride); \
  else dot_store<1, MM>(w, rows, xm, K, o, stride);
      switch (M) {
        case 4: EXPERTLORA_DOT(4) break;
        case 3: EXPERTLORA_DOT(3) break;
        case 2: EXPERTLORA_DOT(2) break;
        default: EXPERTLORA_DOT(1) break;
      }
#undef EXPERTLORA_DOT
    }
  }
}

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

// ---- the op

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
                   at::TensorList bt_d, int64_t num_threads) {
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

  // Group the routed pairs by expert (counting sort, stable in pair order).
  const int64_t* ids = topk_ids.data_ptr<int64_t>();
  const int64_t* tslot = token_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK_VALUE(tslot[t] >= -1 && tslot[t] < (int64_t)slots.size(), "token_slots: slot ", tslot[t],
                      " holds no adapter (", slots.size(), " slots)");
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t p = 0; p < T * k; ++p)
    if (ids[p] >= 0 && ids[p] < E) ++count[ids[p] + 1];
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  const int64_t Q = count[E];
  std::vector<int64_t> next(count.begin(), count.end() - 1), q_of(T * k, -1), q_exp(Q), q_slot(Q), lora_q;
  std::vector<const Act*> q_x(Q), q_h(Q);
  const Act* xp = (const Act*)x.data_ptr();
  for (int64_t p = 0; p < T * k; ++p) {
    if (ids[p] < 0 || ids[p] >= E) continue;
    const int64_t q = next[ids[p]]++, t = p / k;
    q_of[p] = q, q_exp[q] = ids[p], q_slot[q] = tslot[t], q_x[q] = xp + t * H;
  }
  std::vector<int64_t> active;  // experts with tokens
  for (int64_t e = 0; e < E; ++e)
    if (count[e + 1] > count[e]) active.push_back(e);
  for (int64_t q = 0; q < Q; ++q)
    if (q_slot[q] >= 0) lora_q.push_back(q);

  auto f32 = x.options().dtype(at::kFloat);
  auto gu_out = at::empty({Q, 2 * I}, f32), d_out = at::empty({Q, H}, f32);
  auto h = at::empty({Q, I}, x.options());
  auto sx = at::empty({Q, r1}, f32), sh = at::empty({Q, r2}, f32);
  auto y = at::empty({T, H}, f32);
  float *gup = gu_out.data_ptr<float>(), *dp = d_out.data_ptr<float>(), *sxp = sx.data_ptr<float>(),
        *shp = sh.data_ptr<float>(), *yp = y.data_ptr<float>();
  Act* hp = (Act*)h.data_ptr();
  for (int64_t q = 0; q < Q; ++q) q_h[q] = hp + q * I;
  const float* wts = topk_weights.data_ptr<float>();

  const int64_t n_active = active.size(), n_lora = lora_q.size();
  // Rows per task: about kTaskBytes of weights, so short quantized rows still stream well.
  const int64_t gu_rows = rows_per_task(H * W::kBits / 8), d_rows = rows_per_task(I * W::kBits / 8);
  const int64_t gu_blocks = (2 * I + gu_rows - 1) / gu_rows, d_blocks = (H + d_rows - 1) / d_rows;
  const int64_t i_cols = (I + kColBlock - 1) / kColBlock, h_cols = (H + kColBlock - 1) / kColBlock;

#pragma omp parallel num_threads(num_threads)
  {
    // 1. LoRA shrink of x (first, so it is not the tail); gate/up rows of every active expert
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_lora + n_active * gu_blocks; ++task) {
      if (task < n_lora) {
        const int64_t q = lora_q[task];
        const auto& l = slots[q_slot[q]];
        rows_times_tokens(l.a_gu, q_exp[q], 0, l.rg + l.ru, &q_x[q], 1, H, sxp + q * r1, r1);
      } else {
        const int64_t b = task - n_lora, e = active[b / gu_blocks], n0 = (b % gu_blocks) * gu_rows;
        const int64_t q0 = count[e], n = count[e + 1] - q0;
        rows_times_tokens(gu, e, n0, std::min(n0 + gu_rows, 2 * I), &q_x[q0], n, H, gup + q0 * 2 * I + n0, 2 * I);
      }
    }
    // 2. LoRA expand of gate and up, activation
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < Q * i_cols; ++task) {
      const int64_t q = task / i_cols, c0 = (task % i_cols) * kColBlock, e = q_exp[q];
      const float* g_row = gup + q * 2 * I;
      for (int64_t c = c0; c < std::min(c0 + kColBlock, I); c += 16) {
        __m512 g = load16(g_row + c), u = load16(g_row + I + c);
        if (q_slot[q] >= 0) {
          const auto& l = slots[q_slot[q]];
          g = expand16(g, sxp + q * r1, l.bt_g + e * l.rg * I + c, l.rg, I);
          u = expand16(u, sxp + q * r1 + l.rg, l.bt_u + e * l.ru * I + c, l.ru, I);
        }
        store16(hp + q * I + c, _mm512_mul_ps(silu16(g), u));
      }
    }
    // 3. LoRA shrink of h; down rows of every active expert
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_lora + n_active * d_blocks; ++task) {
      if (task < n_lora) {
        const int64_t q = lora_q[task];
        const auto& l = slots[q_slot[q]];
        rows_times_tokens(l.a_d, q_exp[q], 0, l.rd, &q_h[q], 1, I, shp + q * r2, r2);
      } else {
        const int64_t b = task - n_lora, e = active[b / d_blocks], n0 = (b % d_blocks) * d_rows;
        const int64_t q0 = count[e], n = count[e + 1] - q0;
        rows_times_tokens(dn, e, n0, std::min(n0 + d_rows, H), &q_h[q0], n, I, dp + q0 * H + n0, H);
      }
    }
    // 4. LoRA expand of down and the routing-weight sum, in the order of the token's k choices
#pragma omp for schedule(static)
    for (int64_t task = 0; task < T * h_cols; ++task) {
      const int64_t t = task / h_cols, c0 = (task % h_cols) * kColBlock;
      for (int64_t c = c0; c < std::min(c0 + kColBlock, H); c += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < k; ++j) {
          const int64_t q = q_of[t * k + j];
          if (q < 0) continue;
          __m512 d = load16(dp + q * H + c);
          if (q_slot[q] >= 0) {
            const auto& l = slots[q_slot[q]];
            d = expand16(d, shp + q * r2, l.bt_d + q_exp[q] * l.rd * H + c, l.rd, H);
          }
          acc = _mm512_fmadd_ps(_mm512_set1_ps(wts[t * k + j]), d, acc);
        }
        _mm512_storeu_ps(yp + t * H + c, acc);
      }
    }
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
                    at::TensorList a_d, at::TensorList bt_d, int64_t threads) {
#define EXPERTLORA_FORWARD(W) \
  forward<W>(x, topk_ids, topk_weights, token_slots, w_gu, s_gu, w_d, s_d, group_gu, group_d, a_gu, bt_g, bt_u, a_d, bt_d, threads)
  switch (method) {
    case 0: return EXPERTLORA_FORWARD(F32W);
    case 1: return EXPERTLORA_FORWARD(BF16W);
    case 2: return EXPERTLORA_FORWARD(I8W);
    default: return EXPERTLORA_FORWARD(I4W);
  }
#undef EXPERTLORA_FORWARD
}

}  // namespace

TORCH_LIBRARY(expertlora_cpu, m) {
  m.def(
      "moe_lora(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor token_slots, Tensor w_gu, "
      "Tensor s_gu, Tensor w_d, Tensor s_d, int method, int group_gu, int group_d, Tensor[] a_gu, "
      "Tensor[] bt_g, Tensor[] bt_u, Tensor[] a_d, Tensor[] bt_d, int threads) -> Tensor");
  m.impl("moe_lora", c10::DispatchKey::CPU, TORCH_FN(moe_lora));
}
