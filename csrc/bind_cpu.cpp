// pybind11 bindings of the CPU kernels (pyfastpeft._C): one line per entry point of csrc/cpu/kernels.h, the Python
// function taking the kernel's parameters in its order (pointers as integers, see csrc/bind_common.h) and calling the
// build for the instruction set in use. pyfastpeft/ops/<family>.py has validated every argument against the contract
// written above each kernel. The GIL is released around every kernel call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdint>
#include <string>
#include <vector>

#include "bind_common.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace py = pybind11;

namespace {

// Ask the kernel to back [address, address + nbytes) with 2 MiB pages, before its first touch.
// Fresh large tensors come straight from mmap, and with 4 KiB pages their first-touch page faults
// cost several times the kernel that fills them (about 15 ms for 64 MiB, against 3 ms here).
// Only whole aligned 2 MiB pages inside the range are advised; a no-op off Linux.
void advise_huge_pages(uintptr_t address, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  uintptr_t begin = (address + huge - 1) & ~(huge - 1), end = (address + nbytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)address;
  (void)nbytes;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfastpeft CPU kernels (torch-free, pointer-based)";
#define PFP_DEF(name)                                                                                           \
  m.def(#name,                                                                                                  \
        pfp_bind::python_call_per_isa(&pfp::current_isa, pfp::Isa::kAvx512, pfp::Isa::kAvx2, &pfp_avx512::name, \
                                      &pfp_avx2::name, &pfp_scalar::name),                                      \
        pfp_bind::release_gil())
  PFP_DEF(rmsnorm_forward);
  PFP_DEF(rmsnorm_backward);
  PFP_DEF(swiglu_forward);
  PFP_DEF(swiglu_backward);
  PFP_DEF(rope);
  PFP_DEF(nf4_quantize);
  PFP_DEF(nf4_dequantize);
  PFP_DEF(nf4_dequantize_cols);
  PFP_DEF(nf4_matmul);
  PFP_DEF(nf4_matmul_grad_input);
  PFP_DEF(lora_nf4_matmul);
  PFP_DEF(nf4_gemv);
  PFP_DEF(int8_quantize);
  PFP_DEF(int8_matmul);
  PFP_DEF(int8_mm_dequant);
  PFP_DEF(int8_gemv);
  PFP_DEF(int8_dequantize_rows);
  PFP_DEF(int8_dequantize_cols);
  PFP_DEF(lora_dropout);
  PFP_DEF(lora_branch_grads);
  PFP_DEF(lora_up_grads);
  PFP_DEF(lora_down);
  PFP_DEF(lora_nf4_gemv);
  PFP_DEF(quantize_affine);
  PFP_DEF(quantize_static);
  PFP_DEF(dequantize_affine);
  PFP_DEF(lora_dropout_rows);
  PFP_DEF(flce_rows);
  PFP_DEF(distill_rows);
  PFP_DEF(blockwise_quantize);
  PFP_DEF(blockwise_dequantize);
  PFP_DEF(adam8bit_step);
  PFP_DEF(lion8bit_step);
  PFP_DEF(blockwise_table_exact);
  PFP_DEF(dora_scale);
  PFP_DEF(dora_grad);
  PFP_DEF(dora_norm);
  PFP_DEF(attention_forward);
  PFP_DEF(attention_backward);
#undef PFP_DEF
  m.def("advise_huge_pages", &advise_huge_pages, py::arg("address"), py::arg("nbytes"));

  m.def(
      "best_isa", [] { return std::string(pfp::isa_name(pfp::best_isa())); },
      "Best CPU instruction set this machine supports: avx512, avx2 or scalar.");
  m.def(
      "current_isa", [] { return std::string(pfp::isa_name(pfp::current_isa())); },
      "The CPU instruction set the kernels use now.");
  m.def(
      "set_isa",
      [](const std::string& name) { return std::string(pfp::isa_name(pfp::set_isa(pfp::isa_from_name(name)))); },
      py::arg("name"), "Use the kernels built for `name`; returns the previous choice.");
  m.def("avx512_bf16_supported", &pfp::avx512_bf16_supported,
        "Whether this CPU has AVX512-BF16 (fp32 to bf16 in one instruction).");
  m.def("avx512_bf16_in_use", &pfp::avx512_bf16_in_use, "Whether the kernels' bf16 stores take AVX512-BF16 now.");
  m.def("set_avx512_bf16", &pfp::set_avx512_bf16, py::arg("enabled"),
        "Allow or forbid the AVX512-BF16 stores; returns the previous setting.");
  m.def("avx512_vnni_in_use", &pfp::avx512_vnni_in_use,
        "Whether the int8 GEMV multiplies with AVX512-VNNI now (the CPU has it and the ISA is avx512).");
  m.def("avx512_vbmi_supported", &pfp::avx512_vbmi_supported,
        "Whether this CPU has AVX512-VBMI (byte permutes over 64- and 128-entry tables).");
  m.def("avx512_vbmi_in_use", &pfp::avx512_vbmi_in_use,
        "Whether the 8-bit optimizers decode their states by AVX512-VBMI byte lookups now.");
  m.def("set_avx512_vbmi", &pfp::set_avx512_vbmi, py::arg("enabled"),
        "Allow or forbid the AVX512-VBMI lookups; returns the previous setting.");
  m.def("amx_supported", &pfp::amx_supported,
        "Whether this CPU has AMX tiles (int8, bf16) and the OS granted them to this process.");
  m.def("amx_in_use", &pfp::amx_in_use, "Whether the kernels with an AMX path take it now.");
  m.def("set_amx", &pfp::set_amx, py::arg("enabled"), "Allow or forbid the AMX paths; returns the previous setting.");
  m.def("build_info", [] {
    py::dict info;
    info["compiler"] = PFP_CXX_COMPILER;
    info["build_type"] = PFP_BUILD_TYPE;
    info["isas_built"] = std::vector<std::string>{"avx512", "avx2", "scalar"};
    info["openmp"] = _OPENMP;
    return info;
  });
}
