// What both binding modules share: each kernel entry point becomes one Python function with one line,
// `m.def(name, python_call(&kernel), release)`, whatever its parameter list.
//
// Python hands every pointer parameter as an integer (tensor.data_ptr(), 0 for an absent optional tensor) and
// a CUDA stream (cudaStream_t is a pointer) as the integer torch.cuda.current_stream().cuda_stream gives;
// every other parameter (sizes, dtype codes, flags, scalars, stride triples as std::array) crosses as itself.
// pyfastpeft/_native.py launch() builds that argument list; pyfastpeft/ops/<family>.py has validated every
// argument against the contract written above the entry point.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

namespace pfp_bind {

// The Python-facing type of one kernel parameter, and its conversion back.
template <typename T>
struct Param {
  using type = T;
  static T from(T value) { return value; }
};
template <typename T>
struct Param<T*> {
  using type = uintptr_t;
  static T* from(uintptr_t address) { return reinterpret_cast<T*>(address); }
};

// A callable taking the Python-facing parameters of kernel and calling it.
template <typename... Params>
auto python_call(void (*kernel)(Params...)) {
  return [kernel](typename Param<Params>::type... args) { kernel(Param<Params>::from(args)...); };
}

// The same over kernels built once per CPU instruction set: calls the one for `isa()` at each call.
template <typename Isa, typename... Params>
auto python_call_per_isa(Isa (*isa)(), Isa avx512_isa, Isa avx2_isa, void (*avx512)(Params...), void (*avx2)(Params...),
                         void (*scalar)(Params...)) {
  return [=](typename Param<Params>::type... args) {
    const Isa current = isa();
    auto kernel = current == avx512_isa ? avx512 : current == avx2_isa ? avx2 : scalar;
    kernel(Param<Params>::from(args)...);
  };
}

inline pybind11::call_guard<pybind11::gil_scoped_release> release_gil() { return {}; }

}  // namespace pfp_bind
