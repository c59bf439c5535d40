// Run-time choice of the CPU kernels' instruction set.
#pragma once
#include <string>

namespace pfp {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set this CPU supports (AVX-512 F/BW/VL/DQ, else AVX2+FMA+F16C, else scalar).
Isa best_isa();
// The one in use: best_isa() unless set_isa() chose another (tests run every path this way).
Isa current_isa();
// Select `isa`; throws std::invalid_argument when the CPU lacks it. Returns the previous one.
Isa set_isa(Isa isa);
const char* isa_name(Isa isa);
Isa isa_from_name(const std::string& name);

// AVX512-BF16 (vcvtne2ps2bf16: fp32 to bf16, nearest even, in one instruction; AMD Zen 4, Intel Cooper Lake and
// later): the elementwise kernels' bf16 stores take it when avx512_bf16_in_use(), i.e. the CPU has it,
// set_avx512_bf16() has not switched it off and current_isa() is avx512. The AMX paths use it whatever this says
// (every CPU with AMX has it).
bool avx512_bf16_supported();
bool avx512_bf16_in_use();
// Allow (true) or forbid (false) it; throws std::invalid_argument for true where the CPU lacks it. Returns the
// previous setting as it took effect (false where the CPU lacks it), which can always be set again.
bool set_avx512_bf16(bool enabled);

// AVX512-VBMI (vpermi2b: a 128-entry byte table in two registers; AMD Zen 4, Intel Ice Lake and later): the 8-bit
// optimizers decode their states' codes by byte lookups when avx512_vbmi_in_use(), i.e. the CPU has it,
// set_avx512_vbmi() has not switched it off and current_isa() is avx512.
bool avx512_vbmi_supported();
bool avx512_vbmi_in_use();
// Allow (true) or forbid (false) it; throws std::invalid_argument for true where the CPU lacks it. Returns the
// previous setting as it took effect (false where the CPU lacks it), which can always be set again.
bool set_avx512_vbmi(bool enabled);

// AVX512-VNNI (vpdpbusd: 64 int8 products summed into 16 int32 lanes): the int8 GEMV multiplies by it when
// avx512_vnni_in_use(), i.e. the CPU has it and current_isa() is avx512; elsewhere its portable loop is a fraction of
// torch._int_mm's speed, and the int8 linear layer leaves its rows to torch._int_mm.
bool avx512_vnni_in_use();

// AMX (Intel's tile instructions, int8 and bf16): kernels with an AMX path take it when amx_in_use(), i.e. the
// CPU has AMX-TILE/INT8/BF16, Linux granted this process the tile data state, set_amx() has not switched it off
// and current_isa() is avx512 (so set_isa("avx2") also leaves AMX).
bool amx_supported();
bool amx_in_use();
// Allow (true) or forbid (false) the AMX paths; throws std::invalid_argument for true without AMX. Returns the
// previous setting as it took effect (false without AMX), which can always be set again.
bool set_amx(bool enabled);

}  // namespace pfp
