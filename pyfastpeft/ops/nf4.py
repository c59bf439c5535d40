"""NF4 (QLoRA 4-bit storage): custom ops, backend table, autograd and the public nf4_linear.

Ops (a QuantState crosses as tensors and ints: packed uint8, absmax fp32 already de-nested, code fp32 [16]):
  pyfastpeft::nf4_quantize(w, code, blocksize) -> (packed [(n+1)//2, 1] uint8, absmax fp32 [nblocks])
  pyfastpeft::nf4_dequantize(packed, absmax, code, blocksize, numel, dtype) -> flat [numel] of dtype
  pyfastpeft::nf4_linear(x, packed, absmax, code, bias, blocksize, N, K) -> x @ W^T + bias   (bias: None = none)
  pyfastpeft::nf4_linear_grad_input(dy, packed, absmax, code, blocksize, N, K) -> dy @ W
W is [N, K] (out_features, in_features), blocks run over its flattened row-major elements.

CPU products: up to GEMV_MAX_ROWS rows of x take the fused dequant-GEMV kernel (W is never
materialized; each packed byte is read once). More rows of bf16 x, on a CPU with AMX tiles or AVX512-BF16, take
nf4_matmul (W decoded straight into the GEMM's packed operand panels, multiplied on the tiles or by the dot
products; on AMX the LoRA layer's forward calls its lora_nf4_matmul twin, which adds the up-projection in the same
epilogue), and without AMX dX = dY @ W takes nf4_matmul_grad_input (panels pairing two rows of W). Otherwise more
rows take tiles of W's rows (about TILE_ELEMENTS elements, TILE_ROWS rows at least), dequantized into one reused
buffer that stays in the last-level cache and feeds torch's GEMM, which writes its columns of the output in place;
dX = dY @ W by tiles of W's columns (nf4_dequantize_cols), so each element of dX is one GEMM's sum over all of N,
rounded once. No dequantized copy of W outlives a call.

CUDA (csrc/cuda/nf4.cu): quantize, dequantize and the fused GEMV up to GEMV_MAX_ROWS rows; more rows, and dX,
dequantize W into the activation's dtype and run torch's GEMM (bitsandbytes' CUDA path: cuBLAS is not ours to
link, and at that size its tensor cores dominate).
Triton (pyfastpeft/triton_kernels/nf4.py): the fused GEMV up to GEMV_MAX_ROWS rows, above that a tl.dot GEMM
(and dX) whose weight tiles are dequantized inside the loop; quantize and dequantize as kernels of their own.
"""

from __future__ import annotations

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend, choose
from pyfastpeft.ops._autocast import autocast_dtype, cast_like_linear
from pyfastpeft.ops._checks import (
    FLOAT_DTYPES,
    check_dtype,
    check_int,
    check_last_dim,
    check_layer_size,
    check_numel,
    check_optional,
    check_power_of_two,
    check_same_device,
    check_tensor,
)
from pyfastpeft.ops._library import define_op, triton_module
from pyfastpeft.reference import nf4 as ref

GEMV_MAX_ROWS = 8
TILE_ROWS = 256
# A dequantized tile of W (rows for the forward, columns for dX) holds about this many elements: 8 MiB in bf16, in the
# last-level cache. Fewer, larger GEMMs beat L2-sized tiles: at 4096 x 4096 and 2048 rows (bf16, AVX-512 host) a QLoRA
# layer's forward + backward took 3% less time than with tiles of 2^20 elements, level with the dense-weight layer.
TILE_ELEMENTS = 1 << 22
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp64 runs the reference
GPU_GEMV_DTYPES = TRITON_DTYPES  # the CUDA GEMV's x dtypes; fp64 takes dequantize + matmul


def _native_cuda_usable(blocksize: int, x) -> bool:
    """The CUDA kernels take blocks of a power of two >= 8 elements (every size QuantState allows); the op has
    checked that every tensor is on x's device."""
    return x.device.type == "cuda" and blocksize >= 8 and blocksize & (blocksize - 1) == 0


def _cuda_launch(t) -> tuple[int, int]:
    """(stream, device index) of the CUDA kernels' trailing arguments for tensors on t's device."""
    return _native.cuda_stream(t), t.device.index


# ---- the contract every NF4 kernel trusts -------------------------------------------------------------------


def check_nf4_weight(op: str, packed, absmax, code, blocksize, numel) -> None:
    """packed uint8 holding numel 4-bit codes (two per byte), absmax float [ceil(numel / blocksize)], code float
    [16], blocksize a power of two >= 2 (a byte never straddles two blocks). Run on every call before a
    pointer reaches C++/CUDA/Triton: these are what a corrupt checkpoint supplies."""
    check_power_of_two(op, "blocksize", blocksize, low=2)
    check_int(op, "numel", numel, low=0)
    check_dtype(op, "packed", packed, (torch.uint8,))
    check_numel(op, "packed", packed, (numel + 1) // 2, f"a weight of {numel} elements (two per byte)")
    check_dtype(op, "absmax", absmax, FLOAT_DTYPES)
    check_numel(op, "absmax", absmax, -(-numel // blocksize), f"{numel} elements in blocks of {blocksize}")
    check_dtype(op, "code", code, FLOAT_DTYPES)
    check_numel(op, "code", code, 16, "a 4-bit code table")


def check_nf4_linear(op: str, x, packed, absmax, code, bias, blocksize, out_features, in_features) -> None:
    """check_nf4_weight for W [out_features, in_features], x [..., in_features], bias None or [out_features]."""
    check_int(op, "out_features", out_features, low=0)
    check_int(op, "in_features", in_features, low=0)
    check_layer_size(op, out_features, in_features)
    check_nf4_weight(op, packed, absmax, code, blocksize, out_features * in_features)
    check_last_dim(op, "x", x, in_features, "in_features")
    if bias is not None:
        check_optional(op, "bias", bias, out_features, "out_features")


def _check_quantize(w, code, blocksize):
    check_power_of_two("nf4_quantize", "blocksize", blocksize, low=2)
    check_dtype("nf4_quantize", "code", code, FLOAT_DTYPES)
    check_numel("nf4_quantize", "code", code, 16, "a 4-bit code table")


def _check_dequantize(packed, absmax, code, blocksize, numel, dtype):
    check_nf4_weight("nf4_dequantize", packed, absmax, code, blocksize, numel)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"nf4_dequantize: dtype must be a float dtype, got {dtype}")


def _check_linear(x, packed, absmax, code, bias, blocksize, out_features, in_features):
    check_nf4_linear("nf4_linear", x, packed, absmax, code, bias, blocksize, out_features, in_features)


def _check_linear_grad_input(dy, packed, absmax, code, blocksize, out_features, in_features):
    check_int("nf4_linear_grad_input", "out_features", out_features, low=0)
    check_int("nf4_linear_grad_input", "in_features", in_features, low=0)
    check_layer_size("nf4_linear_grad_input", out_features, in_features)
    check_nf4_weight("nf4_linear_grad_input", packed, absmax, code, blocksize, out_features * in_features)
    check_last_dim("nf4_linear_grad_input", "dy", dy, out_features, "out_features")


# ---- quantize / dequantize -------------------------------------------------------------------------


def _reference_quantize(w, code, blocksize):
    return ref.quantize_4bit(w, blocksize, code)


def _native_quantize(w, code, blocksize):
    if _native_cuda_usable(blocksize, w):
        w = w.reshape(-1).contiguous()
        packed, absmax = _empty_quantized(w, blocksize)
        if w.numel():
            midpoints, order = ref.search_tables(code)
            _native.cuda.nf4_quantize(
                _native.ptr(w),
                _native.dtype_code(w),
                _native.ptr(packed),
                _native.ptr(absmax),
                w.numel(),
                blocksize,
                _native.ptr(midpoints.contiguous()),
                _native.ptr(order.contiguous()),
                *_cuda_launch(w),
            )
        return packed, absmax
    if w.device.type != "cpu":
        return _reference_quantize(w, code, blocksize)
    w = w.reshape(-1).contiguous()
    n = w.numel()
    # the packed weight on 2 MiB pages where it is large: decode streams it once per token, and at one row a cold
    # 4096 x 4096 weight's GEMV ran 6-15% faster from huge pages in interleaved runs (fewer TLB misses)
    packed = _native.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    if n:
        _native.cpu.nf4_quantize(
            _native.ptr(w),
            _native.dtype_code(w),
            _native.ptr(packed),
            _native.ptr(absmax),
            n,
            blocksize,
            _native.ptr(code.float().contiguous()),
            _native.num_threads(),
        )
    return packed, absmax


def _empty_quantized(w, blocksize):
    n = w.numel()
    return (
        torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device),
        torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device),
    )


def _triton_quantize(w, code, blocksize):
    w = w.reshape(-1).contiguous()
    packed, absmax = _empty_quantized(w, blocksize)
    midpoints, order = ref.search_tables(code.to(w.device))
    triton_module("nf4").quantize(w, midpoints.contiguous(), order.contiguous(), packed, absmax, blocksize)
    return packed, absmax


def _fake_quantize(w, code, blocksize):
    n = w.numel()
    return (
        w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
        w.new_empty((n + blocksize - 1) // blocksize, dtype=torch.float32),
    )


def dequantize_into(packed, absmax, code, out, start: int, blocksize: int) -> None:
    """Native: out (contiguous, any float dtype) = elements [start, start + out.numel()) of W."""
    _native.cpu.nf4_dequantize(
        _native.ptr(packed),
        _native.ptr(absmax),
        _native.ptr(code),
        _native.ptr(out),
        _native.dtype_code(out),
        start,
        out.numel(),
        blocksize,
        _native.num_threads(),
    )


def dequantize_cols_into(packed, absmax, code, out, in_features: int, col_start: int, blocksize: int) -> None:
    """Native: out [N, cols] (contiguous, any float dtype) = W[:, col_start : col_start + cols] of W [N, in]."""
    _native.cpu.nf4_dequantize_cols(
        _native.ptr(packed),
        _native.ptr(absmax),
        _native.ptr(code),
        _native.ptr(out),
        _native.dtype_code(out),
        out.shape[0],
        in_features,
        col_start,
        out.shape[1],
        blocksize,
        _native.num_threads(),
    )


def _reference_dequantize(packed, absmax, code, blocksize, numel, dtype):
    return ref.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)


def dequantize_all_into(packed, absmax, code, out, blocksize: int) -> None:
    """Native, CPU or CUDA: out (contiguous, any float dtype) = elements [0, out.numel()) of W; every tensor
    contiguous, absmax fp32 de-nested, code fp32 [16]; on CUDA, blocksize a power of two >= 8."""
    if not out.numel():
        return
    if out.is_cuda:
        _native.cuda.nf4_dequantize(
            _native.ptr(packed),
            _native.ptr(absmax),
            _native.ptr(code),
            _native.ptr(out),
            _native.dtype_code(out),
            out.numel(),
            blocksize,
            *_cuda_launch(out),
        )
    else:
        dequantize_into(packed, absmax, code, out, 0, blocksize)


def _native_dequantize(packed, absmax, code, blocksize, numel, dtype):
    cuda = _native_cuda_usable(blocksize, packed)
    if not cuda and packed.device.type != "cpu":
        return _reference_dequantize(packed, absmax, code, blocksize, numel, dtype)
    out = _native.empty(numel, dtype=dtype, device=packed.device)
    dequantize_all_into(packed.contiguous(), absmax.float().contiguous(), code.float().contiguous(), out, blocksize)
    return out


def _triton_dequantize(packed, absmax, code, blocksize, numel, dtype):
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    triton_module("nf4").dequantize(
        packed.contiguous(), absmax.float().contiguous(), code.float().contiguous(), out, blocksize
    )
    return out


def _fake_dequantize(packed, absmax, code, blocksize, numel, dtype):
    return packed.new_empty(numel, dtype=dtype)


# ---- products ----------------------------------------------------------------------------------------


def _weight_tiles(packed, absmax, code, blocksize: int, out_features: int, in_features: int, dtype):
    """Yields (n0, n1, W[n0:n1] as dtype) through one reused buffer of about TILE_ELEMENTS (TILE_ROWS rows at least)."""
    rows = min(out_features, max(TILE_ROWS, TILE_ELEMENTS // max(in_features, 1)))
    buffer = torch.empty(rows * in_features, dtype=dtype)
    for n0 in range(0, out_features, rows):
        n1 = min(n0 + rows, out_features)
        tile = buffer[: (n1 - n0) * in_features]
        dequantize_into(packed, absmax, code, tile, n0 * in_features, blocksize)
        yield n0, n1, tile.view(n1 - n0, in_features)


def gemv_into(x2d, packed, absmax, code, bias, out, blocksize: int):
    """Native fused dequant-GEMV: out[m, N] = x2d[m, K] @ W^T (+ bias; None = none), m <= GEMV_MAX_ROWS;
    every tensor contiguous, absmax fp32 de-nested, code fp32 [16], out in x2d's dtype. CPU or CUDA (there:
    x2d fp32/fp16/bf16, blocksize a power of two >= 8). LoRA's decode step adds its branch in the same kernel
    (ops/lora.py: _launch_decode)."""
    m, k = x2d.shape
    has_bias = bias is not None
    args = (x2d, x2d.dtype, packed, absmax, code, bias if has_bias else None, bias.dtype if has_bias else 0)
    _native.launch("nf4_gemv", x2d, *args, out, m, out.shape[1], k, blocksize)


def _cuda_dequantized_weight(packed, absmax, code, blocksize: int, out_features: int, in_features: int, dtype):
    weight = torch.empty((out_features, in_features), dtype=dtype, device=packed.device)
    dequantize_all_into(packed.contiguous(), absmax.float().contiguous(), code.float().contiguous(), weight, blocksize)
    return weight


def _cuda_linear(x, packed, absmax, code, bias, blocksize, out_features, in_features):
    """Up to GEMV_MAX_ROWS rows the fused GEMV; more rows dequantize W into x's dtype and run torch's GEMM
    (bitsandbytes' CUDA path), whose tensor cores beat any fusion at that size."""
    lead = x.shape[:-1]
    m = x.numel() // in_features if in_features else 0
    if 1 <= m <= GEMV_MAX_ROWS and out_features and x.dtype in GPU_GEMV_DTYPES:
        out = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
        gemv_into(
            x.reshape(m, in_features).contiguous(),
            packed.contiguous(),
            absmax.float().contiguous(),
            code.float().contiguous(),
            None if bias is None else bias.contiguous(),
            out,
            blocksize,
        )
        return out.view(*lead, out_features)
    weight = _cuda_dequantized_weight(packed, absmax, code, blocksize, out_features, in_features, x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype)).contiguous()


def amx_usable(dtype, in_features: int, blocksize: int) -> bool:
    """bf16 products above GEMV_MAX_ROWS rows run nf4_matmul on CPUs with AMX tiles: W decoded into the tiles of a
    panel each thread keeps in L2, one GEMM over all of K, no dequantized tile in memory. It took 0.85x the time of
    the tile-dequantize-then-GEMM path at 512 x 4096 x 4096, level with dense bf16 F.linear, on an AMX host. (dX
    keeps that path: a decode into the transposed tiles measured no faster there.)"""
    return dtype == torch.bfloat16 and in_features % 32 == 0 and blocksize % 32 == 0 and _native.cpu.amx_in_use()


def matmul_usable(dtype, in_features: int, blocksize: int) -> bool:
    """Where nf4_matmul runs: amx_usable, or on a CPU without AMX but with AVX512-BF16 (AMD Zen 4), by its dot
    products on the same decoded panels. There it took 0.84-0.98x the time of the dequantized-tile path over bf16 rows
    of 256 (the Llama-shaped step's layers), 512 and 2048 at 4096 x 4096, level with dense bf16 F.linear."""
    if dtype != torch.bfloat16 or in_features % 32 or blocksize % 32:
        return False
    return _native.cpu.amx_in_use() or _native.cpu.avx512_bf16_in_use()


def grad_input_matmul_usable(dtype, in_features: int, blocksize: int) -> bool:
    """dX = dY W runs nf4_matmul_grad_input (W decoded into panels that pair two of its rows per dword, no dequantized
    tile in memory) by AVX512-BF16's dot products, on a CPU without AMX: 0.75-1.0x the time of the dequantized-tile
    path over 256-2048 bf16 rows on AMD Zen 4. On AMX hosts dX keeps that path (see amx_usable); the kernel's AMX
    branch is tested there, not yet timed."""
    return matmul_usable(dtype, in_features, blocksize) and not _native.cpu.amx_in_use()


def _native_linear(x, packed, absmax, code, bias, blocksize, out_features, in_features):
    if _native_cuda_usable(blocksize, x):
        return _cuda_linear(x, packed, absmax, code, bias, blocksize, out_features, in_features)
    if x.device.type != "cpu" or x.dtype not in ALL_DTYPES:
        return _reference_linear(x, packed, absmax, code, bias, blocksize, out_features, in_features)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features).contiguous()
    packed, absmax, code = packed.contiguous(), absmax.float().contiguous(), code.float().contiguous()
    m = x2d.shape[0]
    out = _native.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out.view(*lead, out_features)
    if m <= GEMV_MAX_ROWS:
        gemv_into(x2d, packed, absmax, code, None if bias is None else bias.contiguous(), out, blocksize)
        return out.view(*lead, out_features)
    if matmul_usable(x.dtype, in_features, blocksize):
        _native.launch("nf4_matmul", x2d, x2d, packed, absmax, code, out, m, out_features, in_features, blocksize)
        if bias is not None:
            out += bias.to(x.dtype)
        return out.view(*lead, out_features)
    compute = ref.matmul_dtype(x.dtype)
    xc = x2d.to(compute)
    result = out if compute == x.dtype else torch.empty((m, out_features), dtype=compute)
    for n0, n1, tile in _weight_tiles(packed, absmax, code, blocksize, out_features, in_features, compute):
        torch.mm(xc, tile.t(), out=result[:, n0:n1])
    if bias is not None:
        result += bias.to(compute)
    if result is not out:
        out.copy_(result)
    return out.view(*lead, out_features)


def _native_linear_grad_input(dy, packed, absmax, code, blocksize, out_features, in_features):
    if _native_cuda_usable(blocksize, dy):
        weight = _cuda_dequantized_weight(packed, absmax, code, blocksize, out_features, in_features, dy.dtype)
        return torch.matmul(dy, weight)
    if dy.device.type != "cpu" or dy.dtype not in ALL_DTYPES:
        return _reference_linear_grad_input(dy, packed, absmax, code, blocksize, out_features, in_features)
    lead = dy.shape[:-1]
    if not out_features:  # an empty sum
        return torch.zeros((*lead, in_features), dtype=dy.dtype)
    dy2d = dy.reshape(-1, out_features)
    packed, absmax, code = packed.contiguous(), absmax.float().contiguous(), code.float().contiguous()
    if grad_input_matmul_usable(dy.dtype, in_features, blocksize):
        dy2d = dy2d.contiguous()
        dx = torch.empty((dy2d.shape[0], in_features), dtype=dy.dtype)
        _native.launch("nf4_matmul_grad_input", dy2d, dy2d, packed, absmax, code, dx, dy2d.shape[0], out_features,
                       in_features, blocksize)  # fmt: skip
        return dx.view(*lead, in_features)
    compute = ref.matmul_dtype(dy.dtype)
    dyc = dy2d.to(compute)
    dx = torch.empty((dy2d.shape[0], in_features), dtype=compute)
    if dy2d.shape[0] and in_features:
        # by tiles of W's columns (about TILE_ELEMENTS elements, whole blocks of 64 where the width allows): each
        # tile's GEMM sums over all of N in one call and writes its columns of dX once, where tiles of rows would add
        # N / TILE_ROWS partial products into dX, rounding it to the compute dtype each time
        width = min(in_features, max(64, TILE_ELEMENTS // out_features // 64 * 64))
        buffer = torch.empty(out_features * width, dtype=compute)
        for k0 in range(0, in_features, width):
            k1 = min(k0 + width, in_features)
            tile = buffer[: out_features * (k1 - k0)].view(out_features, k1 - k0)
            dequantize_cols_into(packed, absmax, code, tile, in_features, k0, blocksize)
            torch.mm(dyc, tile, out=dx[:, k0:k1])
    return dx.to(dy.dtype).view(*lead, in_features)


def _triton_linear(x, packed, absmax, code, bias, blocksize, out_features, in_features):
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features).contiguous()
    m = x2d.shape[0]
    out = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m and out_features:
        kernels = triton_module("nf4")
        launch = kernels.gemv if m <= GEMV_MAX_ROWS else kernels.matmul
        launch(
            x2d,
            packed.contiguous(),
            absmax.float().contiguous(),
            code.float().contiguous(),
            None if bias is None else bias.contiguous(),
            out,
            blocksize,
        )
    return out.view(*lead, out_features)


def _triton_linear_grad_input(dy, packed, absmax, code, blocksize, out_features, in_features):
    lead = dy.shape[:-1]
    dy2d = dy.reshape(-1, out_features).contiguous()
    m = dy2d.shape[0]
    dx = torch.empty((m, in_features), dtype=dy.dtype, device=dy.device)
    if m and in_features:
        triton_module("nf4").grad_input(
            dy2d, packed.contiguous(), absmax.float().contiguous(), code.float().contiguous(), dx, blocksize
        )
    return dx.view(*lead, in_features)


def _reference_linear(x, packed, absmax, code, bias, blocksize, out_features, in_features):
    return ref.nf4_linear(x, packed, absmax, code, bias, blocksize, out_features, in_features).contiguous()


def _reference_linear_grad_input(dy, packed, absmax, code, blocksize, out_features, in_features):
    return ref.nf4_linear_grad_input(dy, packed, absmax, code, blocksize, out_features, in_features).contiguous()


def _fake_linear(x, packed, absmax, code, bias, blocksize, out_features, in_features):
    torch._check(x.shape[-1] == in_features, lambda: "nf4_linear: x's last dim must be in_features")
    return x.new_empty((*x.shape[:-1], out_features))


def _fake_linear_grad_input(dy, packed, absmax, code, blocksize, out_features, in_features):
    return dy.new_empty((*dy.shape[:-1], in_features))


nf4_quantize = define_op(
    "nf4_quantize",
    "(Tensor w, Tensor code, int blocksize) -> (Tensor, Tensor)",
    family="nf4",
    fake=_fake_quantize,
    reference=_reference_quantize,
    native=_native_quantize,
    triton=_triton_quantize,
    triton_dtypes=TRITON_DTYPES,
    check=_check_quantize,
)
nf4_dequantize = define_op(
    "nf4_dequantize",
    "(Tensor packed, Tensor absmax, Tensor code, int blocksize, SymInt numel, ScalarType dtype) -> Tensor",
    family="nf4",
    fake=_fake_dequantize,
    reference=_reference_dequantize,
    native=_native_dequantize,
    triton=_triton_dequantize,
    triton_dtypes=(torch.uint8,),
    check=_check_dequantize,
)
nf4_linear_op = define_op(
    "nf4_linear",
    "(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor? bias, int blocksize, "
    "SymInt out_features, SymInt in_features) -> Tensor",
    family="nf4",
    fake=_fake_linear,
    reference=_reference_linear,
    native=_native_linear,
    triton=_triton_linear,
    triton_dtypes=TRITON_DTYPES,
    check=_check_linear,
)
nf4_linear_grad_input = define_op(
    "nf4_linear_grad_input",
    "(Tensor dy, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
    "SymInt out_features, SymInt in_features) -> Tensor",
    family="nf4",
    fake=_fake_linear_grad_input,
    reference=_reference_linear_grad_input,
    native=_native_linear_grad_input,
    triton=_triton_linear_grad_input,
    triton_dtypes=TRITON_DTYPES,
    check=_check_linear_grad_input,
)


# Tensor types whose storage a decode step may hand the GEMV directly: plain tensors and parameters (nn/linear4bit.py
# adds its packed-weight Parameter). Any other subclass (DTensor, FakeTensor, a functorch wrapper) takes the op.
PLAIN_TENSOR_TYPES = {torch.Tensor, torch.nn.Parameter}


_CPU = torch.device("cpu")
_GEMV_DTYPES = frozenset(ALL_DTYPES)


def gemv_takes(x, packed, absmax, code, bias, blocksize, out_features, in_features) -> bool:
    """Whether nf4_linear_no_grad may hand its arguments to the fused GEMV as they are: W [out, in] as the GEMV reads
    it (uint8 packed, fp32 absmax and code, the sizes the op's contract gives them), x a few rows of [..., in], bias
    None or [out], all of them plain contiguous CPU tensors; eager mode and the native backend. True implies every
    condition of check_nf4_linear (tests/test_nf4.py holds the two together on corrupted arguments); False sends
    the call to the op, whose check names the bad argument. One expression that reads each attribute once: it runs
    at every layer and token with the caches the weight stream has just emptied, where the op's check and a
    separate eligibility test took about 45 us of LoRA's 0.5 ms decode step over a 4096 x 4096 NF4 base (2-core
    host)."""
    plain = PLAIN_TENSOR_TYPES
    if not (
        type(x) in plain
        and type(packed) in plain
        and type(absmax) in plain
        and type(code) in plain
        and type(blocksize) is int
        and type(out_features) is int
        and type(in_features) is int
        and out_features >= 1
        and in_features >= 1
        and blocksize >= 2
        and blocksize & (blocksize - 1) == 0
    ):
        return False
    numel = out_features * in_features
    return (
        x.dtype in _GEMV_DTYPES
        and x.is_cpu
        and x.is_contiguous()
        and x.dim() >= 1
        and x.shape[-1] == in_features
        and 1 <= x.numel() // in_features <= GEMV_MAX_ROWS
        and packed.dtype == torch.uint8
        and packed.is_cpu
        and packed.is_contiguous()
        and packed.numel() == (numel + 1) // 2
        and absmax.dtype == torch.float32
        and absmax.is_cpu
        and absmax.is_contiguous()
        and absmax.numel() == -(-numel // blocksize)
        and code.dtype == torch.float32
        and code.is_cpu
        and code.is_contiguous()
        and code.numel() == 16
        and (
            bias is None
            or (
                type(bias) in plain
                and bias.dtype in _GEMV_DTYPES
                and bias.is_cpu
                and bias.is_contiguous()
                and bias.numel() == out_features
            )
        )
        and not torch.compiler.is_compiling()
        and choose("nf4", _CPU) == "native"
    )


def nf4_linear_no_grad(x, packed, absmax, code, bias, blocksize: int, out_features: int, in_features: int):
    """nf4_linear_op for a caller with nothing to differentiate (Linear4bit at inference, a decode step). Arguments
    the GEMV takes as they are (gemv_takes) run it straight from here; anything else is the op, which checks them.
    The op's dispatch around that kernel cost a quarter of a 4096 x 4096 layer's time at one token on a 2-core
    host: Python that runs with the caches the weight stream has just emptied, where each call into torch costs
    several microseconds."""
    if not gemv_takes(x, packed, absmax, code, bias, blocksize, out_features, in_features):
        return nf4_linear_op(x, packed, absmax, code, bias, blocksize, out_features, in_features)
    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype)
    codes = _native.DTYPE_CODES
    _native.cpu.nf4_gemv(x.data_ptr(), codes[x.dtype], packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
                         0 if bias is None else bias.data_ptr(), 0 if bias is None else codes[bias.dtype],
                         out.data_ptr(), x.numel() // in_features, out_features, in_features, blocksize,
                         torch.get_num_threads())  # fmt: skip
    return out


@carry_backend
class NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T + b over a frozen NF4 weight: dX = dY @ dequant(W), db = sum over rows of dY,
    no dW. Saves the packed weight, absmax and code (not x, not a dequantized W)."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, bias, blocksize: int, out_features: int, in_features: int):
        ctx.save_for_backward(packed, absmax, code)
        ctx.meta = (blocksize, out_features, in_features)
        return nf4_linear_op(x, packed, absmax, code, bias, blocksize, out_features, in_features)

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, code = ctx.saved_tensors
        dx = nf4_linear_grad_input(dy, packed, absmax, code, *ctx.meta) if ctx.needs_input_grad[0] else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[4] else None
        return dx, None, None, None, dbias, None, None, None


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequantize_nf4(packed, state)^T + bias for a weight quantized as [out_features, in_features].

    Computes in x's dtype (fp16 meets the weight in fp32 on CPU); differentiable w.r.t. x and bias.
    """
    from pyfastpeft.quant.nf4 import QuantState

    fn = "nf4_linear"
    check_tensor(fn, "x", x, min_dim=1)
    x, bias = cast_like_linear(autocast_dtype(x), x, bias)  # F.linear's autocast rule (ops/_autocast.py)
    if not isinstance(state, QuantState):
        raise TypeError(f"{fn}: state must be a pyfastpeft.quant.QuantState, got {type(state).__name__}")
    absmax = state.dequantized_absmax(f"{fn}: state")  # validates the state first
    if len(state.shape) != 2:
        raise ValueError(f"{fn}: state.shape must be [out_features, in_features], got {state.shape}")
    out_features, in_features = state.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"{fn}: x's last dim is {x.shape[-1]}, the weight's in_features is {in_features}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"{fn}: packed must be a uint8 tensor")
    if packed.numel() != (out_features * in_features + 1) // 2:
        raise ValueError(
            f"{fn}: packed has {packed.numel()} bytes, a {out_features}x{in_features} weight needs "
            f"{(out_features * in_features + 1) // 2}"
        )
    check_same_device(fn, x=x, packed=packed, absmax=state.absmax)
    if bias is not None:
        check_tensor(fn, "bias", bias, dim=1)
        if bias.shape[0] != out_features:
            raise ValueError(f"{fn}: bias has {bias.shape[0]} elements, out_features is {out_features}")
    return NF4LinearFunction.apply(
        x, packed, absmax, state.code.float(), bias, state.blocksize, out_features, in_features
    )
