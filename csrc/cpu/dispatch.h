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

}  // namespace pfp
