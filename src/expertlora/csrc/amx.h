// AMX tiles for moe_lora_cpu.cpp: the tile configuration, the process's permission to use the
// tile registers, and the six tile operations the kernel uses, as macros (GCC's intrinsics are
// inline assembly that names the tile register, so its number must be a literal).
//
// Built with -DEXPERTLORA_AMX_EMULATE, the same macros run a scalar emulation (eight
// thread_local tiles and the configuration; tdpbf16ps in fp32 as Intel's pseudocode gives it),
// so the kernel's packing and indexing run and are tested on CPUs without AMX.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__) && !defined(EXPERTLORA_AMX_EMULATE)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace amx {

// The 64-byte tile configuration of palette 1 (ldtilecfg's memory operand).
struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(Config) == 64, "ldtilecfg reads 64 bytes");

// Every tile the kernel uses is 16 rows of 64 bytes: A (16 weight rows x 32 bf16), B (16 VNNI
// rows: 16 tokens x 2 bf16), C (16 weight rows x 16 tokens fp32).
inline Config full_tiles() {
  Config c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
  return c;
}

#ifdef EXPERTLORA_AMX_EMULATE

#define EXPERTLORA_AMX_TARGET

struct Tile {
  alignas(64) uint8_t b[16][64];
};
inline thread_local Tile regs[8];
inline thread_local Config cfg;
inline thread_local bool configured = false;

inline void check(bool ok) {  // what the hardware would fault on (#UD): a misuse of the emulation
  if (!ok) std::abort();
}
inline bool enable() { return true; }
inline void load_config(const Config* c) { cfg = *c, configured = true; }
inline void release() { cfg = Config(), configured = false; }
inline void zero(int t) {
  check(configured);
  std::memset(regs[t].b, 0, sizeof regs[t].b);
}
inline void load(int t, const void* p, int64_t stride) {
  check(configured);
  std::memset(regs[t].b, 0, sizeof regs[t].b);
  for (int r = 0; r < cfg.rows[t]; ++r) std::memcpy(regs[t].b[r], (const char*)p + r * stride, cfg.colsb[t]);
}
inline void store(int t, void* p, int64_t stride) {
  check(configured);
  for (int r = 0; r < cfg.rows[t]; ++r) std::memcpy((char*)p + r * stride, regs[t].b[r], cfg.colsb[t]);
}
inline float f32_of_bf16(const uint8_t* p) {
  uint32_t u = (uint32_t)(p[0] | p[1] << 8) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// C[m][n] += Σ_k A[m][2k] B[k][2n] + A[m][2k+1] B[k][2n+1] (fp32 C, bf16 A and B).
inline void dpbf16(int c, int a, int b) {
  check(configured && cfg.colsb[a] / 4 == cfg.rows[b] && cfg.rows[c] == cfg.rows[a] && cfg.colsb[c] == cfg.colsb[b]);
  for (int m = 0; m < cfg.rows[c]; ++m)
    for (int k = 0; k < cfg.colsb[a] / 4; ++k)
      for (int n = 0; n < cfg.colsb[c] / 4; ++n) {
        float acc;
        std::memcpy(&acc, regs[c].b[m] + 4 * n, 4);
        acc += f32_of_bf16(regs[a].b[m] + 4 * k) * f32_of_bf16(regs[b].b[k] + 4 * n);
        acc += f32_of_bf16(regs[a].b[m] + 4 * k + 2) * f32_of_bf16(regs[b].b[k] + 4 * n + 2);
        std::memcpy(regs[c].b[m] + 4 * n, &acc, 4);
      }
}

#define EXPERTLORA_TILE_ZERO(t) amx::zero(t)
#define EXPERTLORA_TILE_LOAD(t, p, stride) amx::load(t, p, stride)
#define EXPERTLORA_TILE_STORE(t, p, stride) amx::store(t, p, stride)
#define EXPERTLORA_TILE_DP(c, a, b) amx::dpbf16(c, a, b)

#elif !defined(__x86_64__) || (defined(__clang__) ? __clang_major__ < 12 : __GNUC__ < 11)

// A compiler without AMX intrinsics: the tile path is compiled out and never taken.
#define EXPERTLORA_AMX_TARGET
inline bool enable() { return false; }
inline void load_config(const Config*) {}
inline void release() {}
#define EXPERTLORA_TILE_ZERO(t) ((void)0)
#define EXPERTLORA_TILE_LOAD(t, p, stride) ((void)(p), (void)(stride))
#define EXPERTLORA_TILE_STORE(t, p, stride) ((void)(p), (void)(stride))
#define EXPERTLORA_TILE_DP(c, a, b) ((void)0)

#else

#define EXPERTLORA_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

// Whether this process may run tile instructions: the CPU has AMX-TILE and AMX-BF16 (CPUID 7.0
// EDX bits 24, 22) and Linux granted the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA, once per process; it covers every thread).
inline bool enable() {
  static const bool ok = [] {
#if defined(__linux__) && defined(__x86_64__)
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 22) & 1)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
    return false;
#endif
  }();
  return ok;
}
// ldtilecfg's asm names only the first 8 bytes of the configuration as its input: the compiler
// barrier makes the whole struct be in memory first.
EXPERTLORA_AMX_TARGET inline void load_config(const Config* c) {
  asm volatile("" ::: "memory");
  _tile_loadconfig(c);
}
EXPERTLORA_AMX_TARGET inline void release() { _tile_release(); }

// tileloadd's asm does not tell the compiler it reads memory: stores the tiles read (scratch
// rows) are fenced with EXPERTLORA_COMPILER_FENCE before the loads.
#define EXPERTLORA_TILE_ZERO(t) _tile_zero(t)
#define EXPERTLORA_TILE_LOAD(t, p, stride) _tile_loadd(t, p, stride)
#define EXPERTLORA_TILE_STORE(t, p, stride) _tile_stored(t, p, stride)
#define EXPERTLORA_TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)

#endif

}  // namespace amx

#define EXPERTLORA_COMPILER_FENCE() asm volatile("" ::: "memory")
