"""What the Triton kernels compile to on a GPU, checked without one: kernels compiled ahead of time for sm_90
(Triton ships its own ptxas) and their PTX read. fp32 dots carry no TF32 unless torch allows it, the int8
coding divisions are correctly rounded, and the int8 GEMM epilogue rounds its product before adding."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

# Runs in a subprocess: under TRITON_INTERPRET=1 (set by conftest) @triton.jit gives interpreter functions,
# which cannot be compiled for a GPU.
SCRIPT = textwrap.dedent("""
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pyfastpeft.triton_kernels import int8, lora, nf4

    def ptx(fn, types, constexprs, **options):
        signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options or None).asm["ptx"]

    def counts(text):
        return {name: len(re.findall(pattern, text)) for name, pattern in
                (("tf32", r"tf32"), ("div_approx", r"div\\.(full|approx)\\.f32"), ("div_rn", r"div\\.rn\\.f32"),
                 ("fma", r"fma\\.rn\\.f32"))}

    fp32 = lambda *names: {name: "*fp32" for name in names}
    lora_types = {**fp32("x_ptr", "w_ptr", "absmax_ptr", "code_ptr", "bias_ptr", "a_ptr", "b_ptr", "y_ptr", "xa_ptr"),
                  "packed_ptr": "*u8", "rng_ptr": "*i64", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                  "scaling": "fp32", "threshold": "fp32", "keep_scale": "fp32"}
    lora_constexprs = dict(BASE_NF4=False, BLOCKSIZE=1, HAS_BIAS=True, DOT_IN_FP32=False, BLOCK_M=64, BLOCK_N=64,
                           BLOCK_K=32, BLOCK_R=16)
    xa_constexprs = dict(DROPOUT=True, DOT_IN_FP32=False, BLOCK_M=64, BLOCK_R=16, BLOCK_K=32)
    result = {
        "lora_ieee": ptx(lora._forward_kernel, lora_types, {**lora_constexprs, "DOT_PRECISION": "ieee"}),
        "lora_tf32": ptx(lora._forward_kernel, lora_types, {**lora_constexprs, "DOT_PRECISION": "tf32"}),
        "lora_xa_ieee": ptx(lora._xa_kernel, lora_types, {**xa_constexprs, "DOT_PRECISION": "ieee"}),
        "lora_xa_tf32": ptx(lora._xa_kernel, lora_types, {**xa_constexprs, "DOT_PRECISION": "tf32"}),
        "int8_row_codes": ptx(int8._row_codes_kernel,
                              {**fp32("x_ptr", "stats_ptr"), "flags_ptr": "*i32", "q_ptr": "*i8", "k": "i32"},
                              dict(HAS_THRESHOLD=True, BLOCK=1024), enable_fp_fusion=False),
        "int8_col_codes": ptx(int8._col_codes_kernel,
                              {**fp32("x_ptr", "stats_ptr"), "q_ptr": "*i8", "m": "i32", "k": "i32",
                               "threshold": "fp32"},
                              dict(HAS_THRESHOLD=True, BLOCK_R=32, BLOCK_C=64), enable_fp_fusion=False),
        "int8_epilogue": ptx(int8._matmul_kernel,
                             {"a_ptr": "*i8", "b_ptr": "*i8", **fp32("row_stats_ptr", "col_stats_ptr", "bias_ptr",
                              "addend_ptr", "out_ptr"), "m": "i32", "n": "i32", "k": "i32", "scale": "fp32"},
                             dict(RAW=False, HAS_BIAS=True, HAS_ADDEND=True, UPCAST=False, BLOCK_M=32, BLOCK_N=64,
                                  BLOCK_K=32), enable_fp_fusion=False),
        "int8_grad_input": ptx(int8._grad_input_kernel,
                               {**fp32("dy_ptr", "stats_ptr", "dx_ptr"), "w_ptr": "*i8", "m": "i32", "n": "i32",
                                "k": "i32"},
                               dict(UPCAST=False, DOT_PRECISION="ieee", BLOCK_M=32, BLOCK_N=32, BLOCK_K=64)),
        "nf4_grad_input": ptx(nf4._grad_input_kernel,
                              {**fp32("dy_ptr", "absmax_ptr", "code_ptr", "dx_ptr"), "packed_ptr": "*u8",
                               "M": "i32", "N": "i32", "K": "i32"},
                              dict(BLOCKSIZE=64, UPCAST=False, DOT_PRECISION="ieee", BLOCK_M=64, BLOCK_N=32,
                                   BLOCK_K=64), num_warps=8),
    }
    json.dump({name: counts(text) for name, text in result.items()}, sys.stdout)
""")


def _has_cuda_compiler() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.fixture(scope="module")
def ptx_counts():
    if not _has_cuda_compiler():
        pytest.skip("this triton has no CUDA backend to compile with")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default today; the kernels that must not fuse say so
    # outside the repository root: `python -c` puts the working directory first on sys.path, and the source
    # tree there (no pyfastpeft.triton_kernels, no built modules) would shadow the installed package
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir()
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_fp32_dots_use_full_precision_unless_tf32_is_asked_for(ptx_counts):
    for kernel in ("lora_ieee", "lora_xa_ieee", "int8_grad_input", "nf4_grad_input"):
        assert ptx_counts[kernel]["tf32"] == 0, kernel
    for kernel in ("lora_tf32", "lora_xa_tf32"):
        assert ptx_counts[kernel]["tf32"] > 0, kernel  # the flag reaches the dots


def test_launchers_ask_for_tf32_only_where_torch_allows_it():
    from pyfastpeft.triton_kernels import int8, lora

    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    try:
        for module in (lora, int8):
            matmul.allow_tf32 = False
            assert module._dot_precision(torch.float32) == "ieee"
            assert module._dot_precision(torch.bfloat16) == "tf32"  # ignored for 16-bit tiles
            matmul.allow_tf32 = True
            assert module._dot_precision(torch.float32) == "tf32"
    finally:
        matmul.allow_tf32 = previous


def test_int8_coding_divides_correctly_rounded_without_fma(ptx_counts):
    for kernel in ("int8_row_codes", "int8_col_codes"):
        counts = ptx_counts[kernel]
        assert counts["div_approx"] == 0 and counts["div_rn"] > 0 and counts["fma"] == 0, (kernel, counts)


def test_int8_gemm_epilogue_rounds_the_product_before_adding(ptx_counts):
    assert ptx_counts["int8_epilogue"]["fma"] == 0
