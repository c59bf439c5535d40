// Types every native entry point shares, CPU and CUDA alike. Plain C++17, no torch and no CUDA headers.
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace pfp {

// dtype codes of the `int *_dtype` parameters. Must match pyfastpeft/_native.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Element strides of a tensor's three leading dims (rope's q, k and outputs: batch, head, position).
using Strides3 = std::array<int64_t, 3>;

// Runs body(static_cast<T*>(nullptr)) with T the storage type of dtype code `dtype`: float, F16, BF16 (the
// backend's 16-bit types) or double; any other code throws std::invalid_argument naming `what`. A kernel's entry
// point is then one call whatever its dtype: `using T = std::remove_pointer_t<decltype(tag)>` inside the body.
template <typename F16, typename BF16, typename Body>
void dispatch_dtype(int dtype, const char* what, Body&& body) {
  switch (dtype) {
    case kFloat32: return body(static_cast<float*>(nullptr));
    case kFloat16: return body(static_cast<F16*>(nullptr));
    case kBFloat16: return body(static_cast<BF16*>(nullptr));
    case kFloat64: return body(static_cast<double*>(nullptr));
  }
  throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(dtype));
}

}  // namespace pfp
