// The MoE-LoRA forward of one layer on the CPU, AVX-512: one op, one parallel region.
//
// Shape legend: T = tokens, k = experts per token, E = experts, H = hidden, I = intermediate,
// Q = routed pairs kept (ids in [0, E)), r = LoRA rank (per slot; gate and up A stacked).
//
// The math is moe.py's reference_moe. Phases (barriers between them):
//   1. shrink x:  sx[q]  = A_gu[s][e] · x[t]                      (pairs with an adapter)
//   2. gate/up:   h[q]   = silu(Wg[e]·x + Bg·sx[:rg]) * (Wu[e]·x + Bu·sx[rg:])
//   3. shrink h:  sh[q]  = A_d[s][e] · h[q]
//   4. down:      d[q]   = Wd[e]·h[q] + Bd·sh[q]
//   5. sum:       y[t]   = Σ_j w[t, j] · d[q(t, j)]
// Phases 2 and 4 run each expert's weight rows once for all of its tokens. A pair without an
// adapter never touches LoRA, so its bits equal a run with no adapters loaded.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kTile = 4;       // tokens per register tile
constexpr int64_t kRowBlock = 16;  // weight rows per task

inline __m512 bf16x16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Row readers: 16 consecutive weights of one row, as floats (dequantized).
struct F32Row {
  const float* p;
  __m512 load(int64_t k) const { return _mm512_loadu_ps(p + k); }
  __m512 tail(int64_t k, __mmask16 m) const { return _mm512_maskz_loadu_ps(m, p + k); }
};
struct BF16Row {
  const uint16_t* p;
  __m512 load(int64_t k) const { return bf16x16(_mm256_loadu_si256((const __m256i*)(p + k))); }
  __m512 tail(int64_t k, __mmask16 m) const { return bf16x16(_mm256_maskz_loadu_epi16(m, p + k)); }
};
struct I8Row {
  const int8_t* p;
  __m512 scale;
  __m512 load(int64_t k) const {
    __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + k))));
    return _mm512_mul_ps(v, scale);
  }
  __m512 tail(int64_t k, __mmask16 m) const {
    __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p + k)));
    return _mm512_mul_ps(v, scale);
  }
};
struct I4Row {  // K is a multiple of the group size (>= 32), so there is never a tail
  const uint8_t* p;
  const float* scales;
  int64_t group;
  __m512 load(int64_t k) const {
    __m128i b = _mm_loadl_epi64((const __m128i*)(p + k / 2));
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
    return _mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps(8.f)), _mm512_set1_ps(scales[k / group]));
  }
  __m512 tail(int64_t k, __mmask16) const { return load(k); }
};

// out[m] = row · x[m] for M tokens (M <= kTile), K inputs.
template <int M, class Row>
inline void dot_tile(const Row& row, int64_t K, const float* const* x, float* out) {
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512 w0 = row.load(k), w1 = row.load(k + 16);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[m] + k), acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[m] + k + 16), acc[m][1]);
    }
  }
  for (; k < K; k += 16) {
    int64_t left = std::min<int64_t>(16, K - k);
    __mmask16 mask = left == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    __m512 w = left == 16 ? row.load(k) : row.tail(k, mask);
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, x[m] + k), acc[m][0]);
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

// out[m * stride] = row · x[m] for any number of tokens n.
template <class Row>
inline void dot_tokens(const Row& row, int64_t K, const float* const* x, int64_t n, float* out, int64_t stride) {
  float res[kTile];
  for (int64_t m0 = 0; m0 < n; m0 += kTile) {
    int64_t M = std::min(kTile, n - m0);
    switch (M) {
      case 4: dot_tile<4>(row, K, x + m0, res); break;
      case 3: dot_tile<3>(row, K, x + m0, res); break;
      case 2: dot_tile<2>(row, K, x + m0, res); break;
      default: dot_tile<1>(row, K, x + m0, res); break;
    }
    for (int64_t m = 0; m < M; ++m) out[(m0 + m) * stride] = res[m];
  }
}

// A stored weight stack [E, N, K] with its scales; row(e, n) gives a row reader.
template <class Row>
struct Stack;
template <>
struct Stack<F32Row> {
  const float* d; int64_t N, K;
  F32Row row(int64_t e, int64_t n) const { return {d + (e * N + n) * K}; }
};
template <>
struct Stack<BF16Row> {
  const uint16_t* d; int64_t N, K;
  BF16Row row(int64_t e, int64_t n) const { return {d + (e * N + n) * K}; }
};
template <>
struct Stack<I8Row> {
  const int8_t* d; const float* s; int64_t N, K;
  I8Row row(int64_t e, int64_t n) const { return {d + (e * N + n) * K, _mm512_set1_ps(s[e * N + n])}; }
};
template <>
struct Stack<I4Row> {
  const uint8_t* d; const float* s; int64_t N, K, group;
  I4Row row(int64_t e, int64_t n) const {
    return {d + (e * N + n) * (K / 2), s + (e * N + n) * (K / group), group};
  }
};

template <class Row>
Stack<Row> make_stack(const at::Tensor& w, const at::Tensor& s, int64_t K, int64_t group) {
  int64_t N = w.size(1);
  if constexpr (std::is_same_v<Row, F32Row>) return {w.data_ptr<float>(), N, K};
  else if constexpr (std::is_same_v<Row, BF16Row>) return {(const uint16_t*)w.data_ptr<at::BFloat16>(), N, K};
  else if constexpr (std::is_same_v<Row, I8Row>) return {w.data_ptr<int8_t>(), s.data_ptr<float>(), N, K};
  else return {w.data_ptr<uint8_t>(), s.data_ptr<float>(), N, K, group};
}

// One slot's LoRA of this layer (rank 0 where the adapter leaves a projection out).
template <class LRow>
struct SlotLoRA {
  Stack<LRow> a_gu, a_d;     // [E, rg+ru, H], [E, rd, I]
  const void *b_g, *b_u, *b_d;  // [E, I, rg], [E, I, ru], [E, H, rd] (scaled)
  int64_t rg, ru, rd;
};

template <class T>
inline float lora_expand(const T* b, const float* s, int64_t r) {  // b row · s
  float acc = 0.f;
  for (int64_t j = 0; j < r; ++j) acc += static_cast<float>(b[j]) * s[j];
  return acc;
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

template <class Row, class LRow, class LT>
at::Tensor forward(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                   const at::Tensor& token_slots, const at::Tensor& w_gu, const at::Tensor& s_gu,
                   const at::Tensor& w_d, const at::Tensor& s_d, int64_t group, at::TensorList a_gu,
                   at::TensorList b_g, at::TensorList b_u, at::TensorList a_d, at::TensorList b_d,
                   int64_t num_threads) {
  const int64_t T = x.size(0), H = x.size(1), k = topk_ids.size(1), E = w_gu.size(0);
  const int64_t I = w_d.size(2) * (std::is_same_v<Row, I4Row> ? 2 : 1);
  auto gu = make_stack<Row>(w_gu, s_gu, H, group);
  auto dn = make_stack<Row>(w_d, s_d, I, group);

  std::vector<SlotLoRA<LRow>> slots;
  int64_t r1 = 0, r2 = 0;
  for (size_t s = 0; s < a_gu.size(); ++s) {
    SlotLoRA<LRow> l{make_stack<LRow>(a_gu[s], a_gu[s], H, 0), make_stack<LRow>(a_d[s], a_d[s], I, 0),
                     b_g[s].data_ptr(), b_u[s].data_ptr(), b_d[s].data_ptr(),
                     b_g[s].size(2), b_u[s].size(2), b_d[s].size(2)};
    r1 = std::max(r1, l.rg + l.ru);
    r2 = std::max(r2, l.rd);
    slots.push_back(l);
  }

  // Group the routed pairs by expert (counting sort, stable in pair order).
  const int64_t* ids = topk_ids.data_ptr<int64_t>();
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t p = 0; p < T * k; ++p)
    if (ids[p] >= 0 && ids[p] < E) ++count[ids[p] + 1];
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  const int64_t Q = count[E];
  std::vector<int64_t> start(count.begin(), count.end() - 1), pair_of(Q), q_of(T * k, -1);
  for (int64_t p = 0; p < T * k; ++p)
    if (ids[p] >= 0 && ids[p] < E) { q_of[p] = start[ids[p]]; pair_of[start[ids[p]]++] = p; }
  std::vector<int64_t> active;  // experts with tokens
  for (int64_t e = 0; e < E; ++e)
    if (count[e + 1] > count[e]) active.push_back(e);

  const int64_t* tslot = token_slots.data_ptr<int64_t>();
  std::vector<int64_t> q_slot(Q);
  std::vector<const float*> q_x(Q), q_h(Q);
  auto h = at::empty({std::max<int64_t>(Q, 1), I}, x.options());
  auto d = at::empty({std::max<int64_t>(Q, 1), H}, x.options());
  auto sx = at::empty({std::max<int64_t>(Q * r1, 1)}, x.options());
  auto sh = at::empty({std::max<int64_t>(Q * r2, 1)}, x.options());
  float *hp = h.data_ptr<float>(), *dp = d.data_ptr<float>(), *sxp = sx.data_ptr<float>(), *shp = sh.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t q = 0; q < Q; ++q) {
    int64_t t = pair_of[q] / k;
    q_slot[q] = tslot[t];
    q_x[q] = xp + t * H;
    q_h[q] = hp + q * I;
  }
  auto y = at::empty({T, H}, x.options());
  float* yp = y.data_ptr<float>();
  const float* wts = topk_weights.data_ptr<float>();

  const int64_t gu_blocks = (I + kRowBlock - 1) / kRowBlock, d_blocks = (H + kRowBlock - 1) / kRowBlock;
  const int64_t n_active = active.size();
  constexpr int64_t kRankBlock = 4;
  const int64_t r1_blocks = (r1 + kRankBlock - 1) / kRankBlock, r2_blocks = (r2 + kRankBlock - 1) / kRankBlock;

#pragma omp parallel num_threads(num_threads)
  {
    // 1. shrink x for pairs with an adapter
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < Q * r1_blocks; ++task) {
      int64_t q = task / r1_blocks, j0 = (task % r1_blocks) * kRankBlock;
      if (q_slot[q] < 0) continue;
      const auto& l = slots[q_slot[q]];
      int64_t e = ids[pair_of[q]];
      for (int64_t j = j0; j < std::min(j0 + kRankBlock, l.rg + l.ru); ++j)
        dot_tokens(l.a_gu.row(e, j), H, &q_x[q], 1, sxp + q * r1 + j, 1);
    }
    // 2. gate / up with LoRA and activation
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_active * gu_blocks; ++task) {
      int64_t e = active[task / gu_blocks], i0 = (task % gu_blocks) * kRowBlock;
      int64_t q0 = count[e], n = count[e + 1] - q0;
      float g[kTile * 64], u[kTile * 64];  // n <= 64 per chunk
      for (int64_t c0 = 0; c0 < n; c0 += 64) {
        int64_t nc = std::min<int64_t>(64, n - c0);
        for (int64_t i = i0; i < std::min(i0 + kRowBlock, I); ++i) {
          dot_tokens(gu.row(e, i), H, &q_x[q0 + c0], nc, g, 1);
          dot_tokens(gu.row(e, I + i), H, &q_x[q0 + c0], nc, u, 1);
          for (int64_t m = 0; m < nc; ++m) {
            int64_t q = q0 + c0 + m;
            if (q_slot[q] >= 0) {
              const auto& l = slots[q_slot[q]];
              const float* s = sxp + q * r1;
              g[m] += lora_expand((const LT*)l.b_g + (e * I + i) * l.rg, s, l.rg);
              u[m] += lora_expand((const LT*)l.b_u + (e * I + i) * l.ru, s + l.rg, l.ru);
            }
            hp[q * I + i] = silu(g[m]) * u[m];
          }
        }
      }
    }
    // 3. shrink h
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < Q * r2_blocks; ++task) {
      int64_t q = task / r2_blocks, j0 = (task % r2_blocks) * kRankBlock;
      if (q_slot[q] < 0) continue;
      const auto& l = slots[q_slot[q]];
      int64_t e = ids[pair_of[q]];
      for (int64_t j = j0; j < std::min(j0 + kRankBlock, l.rd); ++j)
        dot_tokens(l.a_d.row(e, j), I, &q_h[q], 1, shp + q * r2 + j, 1);
    }
    // 4. down with LoRA
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_active * d_blocks; ++task) {
      int64_t e = active[task / d_blocks], i0 = (task % d_blocks) * kRowBlock;
      int64_t q0 = count[e], n = count[e + 1] - q0;
      for (int64_t i = i0; i < std::min(i0 + kRowBlock, H); ++i) {
        dot_tokens(dn.row(e, i), I, &q_h[q0], n, dp + q0 * H + i, H);
        for (int64_t q = q0; q < q0 + n; ++q) {
          if (q_slot[q] < 0) continue;
          const auto& l = slots[q_slot[q]];
          dp[q * H + i] += lora_expand((const LT*)l.b_d + (e * H + i) * l.rd, shp + q * r2, l.rd);
        }
      }
    }
    // 5. routing-weight sum, in the order of the token's k choices
#pragma omp for schedule(static)
    for (int64_t task = 0; task < T * d_blocks; ++task) {
      int64_t t = task / d_blocks, c0 = (task % d_blocks) * kRowBlock, c1 = std::min(c0 + kRowBlock, H);
      float* out = yp + t * H;
      for (int64_t c = c0; c < c1; ++c) out[c] = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        int64_t q = q_of[t * k + j];
        if (q < 0) continue;
        float w = wts[t * k + j];
        for (int64_t c = c0; c < c1; ++c) out[c] += w * dp[q * H + c];
      }
    }
  }
  return y;
}

template <class Row>
at::Tensor dispatch_lora(const at::Tensor& lora_probe, const at::Tensor& x, const at::Tensor& ids,
                         const at::Tensor& w, const at::Tensor& slots, const at::Tensor& w_gu,
                         const at::Tensor& s_gu, const at::Tensor& w_d, const at::Tensor& s_d, int64_t group,
                         at::TensorList a_gu, at::TensorList b_g, at::TensorList b_u, at::TensorList a_d,
                         at::TensorList b_d, int64_t threads) {
  if (lora_probe.scalar_type() == at::kFloat)
    return forward<Row, F32Row, float>(x, ids, w, slots, w_gu, s_gu, w_d, s_d, group, a_gu, b_g, b_u, a_d, b_d, threads);
  return forward<Row, BF16Row, at::BFloat16>(x, ids, w, slots, w_gu, s_gu, w_d, s_d, group, a_gu, b_g, b_u, a_d, b_d, threads);
}

// method: 0 fp32, 1 bf16, 2 int8, 3 int4 (quantize.py's storage). Inputs are checked in Python.
at::Tensor moe_lora(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                    const at::Tensor& token_slots, const at::Tensor& w_gu, const at::Tensor& s_gu,
                    const at::Tensor& w_d, const at::Tensor& s_d, int64_t method, int64_t group,
                    at::TensorList a_gu, at::TensorList b_g, at::TensorList b_u, at::TensorList a_d,
                    at::TensorList b_d, int64_t threads) {
  const at::Tensor& probe = a_gu.empty() ? x : a_gu[0];
  switch (method) {
    case 0: return dispatch_lora<F32Row>(probe, x, topk_ids, topk_weights, token_slots, w_gu, s_gu, w_d, s_d, group, a_gu, b_g, b_u, a_d, b_d, threads);
    case 1: return dispatch_lora<BF16Row>(probe, x, topk_ids, topk_weights, token_slots, w_gu, s_gu, w_d, s_d, group, a_gu, b_g, b_u, a_d, b_d, threads);
    case 2: return dispatch_lora<I8Row>(probe, x, topk_ids, topk_weights, token_slots, w_gu, s_gu, w_d, s_d, group, a_gu, b_g, b_u, a_d, b_d, threads);
    default: return dispatch_lora<I4Row>(probe, x, topk_ids, topk_weights, token_slots, w_gu, s_gu, w_d, s_d, group, a_gu, b_g, b_u, a_d, b_d, threads);
  }
}

}  // namespace

TORCH_LIBRARY(expertlora_cpu, m) {
  m.def(
      "moe_lora(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor token_slots, Tensor w_gu, "
      "Tensor s_gu, Tensor w_d, Tensor s_d, int method, int group, Tensor[] a_gu, Tensor[] b_g, "
      "Tensor[] b_u, Tensor[] a_d, Tensor[] b_d, int threads) -> Tensor");
  m.impl("moe_lora", c10::DispatchKey::CPU, TORCH_FN(moe_lora));
}
