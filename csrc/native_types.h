// Types every native entry point shares, CPU and CUDA alike. Plain C++17, no torch and no CUDA headers.
#pragma once

#include <array>
#include <cstdint>

namespace pfp {

// dtype codes of the `int *_dtype` parameters. Must match pyfastpeft/_native.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Element strides of a tensor's three leading dims (rope's q, k and outputs: batch, head, position).
using Strides3 = std::array<int64_t, 3>;

}  // namespace pfp
