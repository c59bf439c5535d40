#include "cpu/dispatch.h"

#include <atomic>
#include <stdexcept>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pfp {

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
  return Isa::kScalar;
}

static std::atomic<int> g_isa{-1};

Isa current_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = int(best_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return Isa(v);
}

Isa set_isa(Isa isa) {
  if (int(isa) > int(best_isa()))
    throw std::invalid_argument(std::string("this CPU does not support ") + isa_name(isa));
  Isa previous = current_isa();
  g_isa.store(int(isa), std::memory_order_relaxed);
  return previous;
}

// Bit `bit` of register `reg` (0 eax, 1 ebx, 2 ecx, 3 edx) of CPUID leaf 7, subleaf `subleaf`, on an AVX-512 host:
// the AVX-512 extensions the kernels use beyond the base set.
static bool avx512_feature(unsigned subleaf, int reg, int bit) {
#if defined(__x86_64__)
  unsigned regs[4] = {};
  return best_isa() == Isa::kAvx512 && __get_cpuid_count(7, subleaf, &regs[0], &regs[1], &regs[2], &regs[3]) &&
         (regs[reg] >> bit & 1);
#else
  (void)subleaf, (void)reg, (void)bit;
  return false;
#endif
}

bool avx512_bf16_supported() {
  static const bool supported = avx512_feature(1, 0, 5);  // subleaf 1, eax bit 5
  return supported;
}

static std::atomic<bool> g_avx512_bf16_enabled{true};

bool avx512_bf16_in_use() {
  return g_avx512_bf16_enabled.load(std::memory_order_relaxed) && current_isa() == Isa::kAvx512 &&
         avx512_bf16_supported();
}

bool set_avx512_bf16(bool enabled) {
  if (enabled && !avx512_bf16_supported()) throw std::invalid_argument("this CPU does not provide AVX512-BF16");
  // the previous setting as it took effect: a CPU without it reports false, so that restoring it never throws
  return g_avx512_bf16_enabled.exchange(enabled, std::memory_order_relaxed) && avx512_bf16_supported();
}

bool avx512_vbmi_supported() {
  static const bool supported = avx512_feature(0, 2, 1);  // subleaf 0, ecx bit 1
  return supported;
}

bool avx512_vnni_in_use() {
  static const bool supported = avx512_feature(0, 2, 11);  // subleaf 0, ecx bit 11
  return supported && current_isa() == Isa::kAvx512;
}

static std::atomic<bool> g_avx512_vbmi_enabled{true};

bool avx512_vbmi_in_use() {
  return g_avx512_vbmi_enabled.load(std::memory_order_relaxed) && current_isa() == Isa::kAvx512 &&
         avx512_vbmi_supported();
}

bool set_avx512_vbmi(bool enabled) {
  if (enabled && !avx512_vbmi_supported()) throw std::invalid_argument("this CPU does not provide AVX512-VBMI");
  return g_avx512_vbmi_enabled.exchange(enabled, std::memory_order_relaxed) && avx512_vbmi_supported();
}

bool amx_supported() {
  static const bool supported = [] {
#if defined(__x86_64__) && defined(__linux__)
    unsigned eax, ebx, ecx, edx;
    if (best_isa() != Isa::kAvx512 || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = edx >> 24 & 1, int8 = edx >> 25 & 1, bf16 = edx >> 22 & 1;
    if (!(tile && int8 && bf16)) return false;
    // The AMX paths also round with AVX512-BF16, which every CPU with AMX has so far.
    if (!avx512_bf16_supported()) return false;
    // Linux hands the 8 KiB tile data state to a process only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
    // XFEATURE_XTILEDATA, 18); a tile instruction without it is a fatal signal.
    constexpr int kReqXcompPerm = 0x1023, kGetXcompPerm = 0x1022, kXtileData = 18;
    if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0) return false;
    unsigned long granted = 0;
    return syscall(SYS_arch_prctl, kGetXcompPerm, &granted) == 0 && (granted >> kXtileData & 1);
#else
    return false;
#endif
  }();
  return supported;
}

static std::atomic<bool> g_amx_enabled{true};

bool amx_in_use() {
  return g_amx_enabled.load(std::memory_order_relaxed) && current_isa() == Isa::kAvx512 && amx_supported();
}

bool set_amx(bool enabled) {
  if (enabled && !amx_supported()) throw std::invalid_argument("this CPU (or its kernel) does not provide AMX");
  // the previous setting as it took effect: a CPU without AMX reports false, so that restoring it never throws
  return g_amx_enabled.exchange(enabled, std::memory_order_relaxed) && amx_supported();
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Isa isa_from_name(const std::string& name) {
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  throw std::invalid_argument("unknown CPU instruction set '" + name + "' (expected avx512, avx2 or scalar)");
}

}  // namespace pfp
