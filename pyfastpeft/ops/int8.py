"""LLM.int8 and vector-wise int8 quantization: custom ops, backend table, autograd, public int8_linear.

Ops (the math is in pyfastpeft/reference/int8.py; x is flattened to [M, K] over its leading dims):
  pyfastpeft::int8_vectorwise_quant(x, threshold) -> (q int8 like x, row_stats fp32 [M], outlier_cols int64)
  pyfastpeft::int8_colwise_quant(x, threshold)    -> (q int8 like x, col_stats fp32 [K], outlier_cols int64)
  pyfastpeft::int8_vectorwise_dequant(q, stats, axis) -> fp32 like q
  pyfastpeft::int8_matmul(a, b)                    -> int32 [M, N] = a [M, K] @ b [N, K]^T, exact
  pyfastpeft::int8_mm_dequant(c, row_stats, col_stats, bias, dtype) -> dtype [M, N]
  pyfastpeft::int8_linear(x, weight, weight_stats, bias, threshold) -> [..., N] in x's dtype
  pyfastpeft::int8_linear_grad_input(dy, weight, weight_stats) -> [..., K] = dY @ dequant(W)
An absent bias is None (`Tensor?`); "no outlier" is an empty outlier_cols.

CPU products: the int8 x int8 -> int32 product of more than GEMV_MAX_ROWS rows runs torch._int_mm (oneDNN's
VNNI GEMM; it measured faster here than a hand-written VNNI kernel would have to be to matter), or, on a CPU with
AMX tiles and from AMX_MIN_ROWS rows, our tile GEMM (torch's CPU build does not use AMX for it: ours took 0.5-0.7x
its time at 512-2048 x 4096 x 4096); our kernel then turns the int32 result into the output dtype in one pass (the
dequant epilogue, with the outlier columns' 16-bit product and the bias added in fp32 before the single rounding).
2 to GEMV_MAX_ROWS rows run our fused int8 GEMV (VNNI, every weight byte read once, epilogue fused):
torch._int_mm reads the weight at about 58 GB/s at one row, faster than our GEMV there, but at a fifth of that
for 2 to 8 rows.
dX = dY @ dequant(W) dequantizes TILE_ROWS rows of W at a time into one reused
buffer (no dequantized copy of W outlives a call).
"""

from __future__ import annotations

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops._autocast import autocast_dtype, cast_like_linear
from pyfastpeft.ops._checks import (
    FLOAT_DTYPES,
    check_dtype,
    check_features,
    check_int,
    check_last_dim,
    check_layer_size,
    check_numel,
    check_optional,
    check_real,
    check_same_device,
    check_tensor,
)
from pyfastpeft.ops._library import define_op, triton_module
from pyfastpeft.reference import int8 as ref

GEMV_MAX_ROWS = 8
TILE_ROWS = 256
# int32 accumulation stays exact up to this reduction length (127 * 255 * 65536 < 2^31 with the VNNI
# unsigned-offset trick; 127 * 127 * 65536 for a plain int8 product).
MAX_IN_FEATURES = 65536
# From this many rows our AMX tile GEMM beats torch._int_mm (oneDNN's VNNI kernel on this CPU): it packs all of the
# weight into tiles once per call, which below about 32 rows costs more than the product (4096 x 4096, AMX host).
AMX_MIN_ROWS = 32
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_int_mm(a, b):
    """a [M, K] @ b [N, K]^T by torch._int_mm on shapes CUDA's cuBLASLt int8 GEMM accepts (M > 16, K and N
    multiples of 8): a is zero-padded to at least 17 rows and K to a multiple of 8 (cheap: M x K bytes), b to
    multiples of 8 only when K or N is not one already (a copy of the weight's bytes, not the fp64 copy of
    8 bytes per element the exact fallback would make); zero rows and columns add nothing to the products."""
    m, k = a.shape
    n = b.shape[0]
    m_pad, k_pad, n_pad = max(m, 17), _round_up(k, 8), _round_up(n, 8)
    if (m_pad, k_pad) != (m, k):
        a = torch.nn.functional.pad(a, (0, k_pad - k, 0, m_pad - m))
    if (n_pad, k_pad) != (n, k):
        b = torch.nn.functional.pad(b, (0, k_pad - k, 0, n_pad - n))
    out = torch._int_mm(a, b.t())
    if n_pad != n:  # the epilogue kernels read [M, N] row-major: drop the padded columns, not just view past them
        return out[:m, :n].contiguous()
    return out[:m]


def _int_mm(a, b):
    """a [M, K] @ b [N, K]^T in int32, exact (both contiguous, K <= MAX_IN_FEATURES). CUDA: torch._int_mm over
    padded shapes. CPU with AMX, from AMX_MIN_ROWS rows: our tile kernel. Other CPUs: torch._int_mm, but at K == 1
    (where it returns uninitialized int32 for N >= 2, measured on torch 2.13) exactly in fp64."""
    if a.is_cuda:
        return _padded_int_mm(a, b)
    if a.shape[0] >= AMX_MIN_ROWS and _native.cpu.amx_in_use():
        out = _native.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
        _native.launch("int8_matmul", a, a, b, out, a.shape[0], b.shape[0], a.shape[1])
        return out
    if a.shape[1] == 1:
        return ref.int8_matmul(a, b)
    return torch._int_mm(a, b.t())


def _flags_to_cols(flags: torch.Tensor, threshold: float) -> torch.Tensor:
    """The outlier columns' indices. With no threshold there are none, and no flags.nonzero(): on a GPU that
    would wait for the kernel (a host sync per call). With one, the sync stays: the outlier product needs
    the count."""
    if threshold <= 0:
        return torch.empty(0, dtype=torch.int64, device=flags.device)
    return flags.nonzero().view(-1)


# ---- quantization -------------------------------------------------------------------------------------


def quantize_into(x2d, q, stats, axis: int, threshold: float) -> torch.Tensor:
    """Native: fills q [M, K] and stats ([M] for axis 0, [K] for axis 1); returns the outlier flags [K]
    (uint8 on CPU, int32 on CUDA; nonzero = outlier column)."""
    flags = torch.zeros(x2d.shape[1], dtype=torch.int32 if x2d.is_cuda else torch.uint8, device=x2d.device)
    _native.launch("int8_quantize", x2d, x2d, x2d.dtype, q, stats, flags, *x2d.shape, axis, float(threshold))
    return flags


def _make_quant(axis: int, reference_fn):
    def reference(x, threshold):
        x2d = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        q, stats, cols = reference_fn(x2d, threshold)
        return q.view(x.shape), stats, cols

    def native(x, threshold):
        if x.dtype not in NATIVE_DTYPES:
            return reference(x, threshold)
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        # on 2 MiB pages where large: a weight's codes, which decode streams once per token (as nf4.py's packed bytes)
        q = _native.empty(x2d.shape, dtype=torch.int8, device=x.device)
        stats = torch.empty(x2d.shape[axis], dtype=torch.float32, device=x.device)
        if x2d.numel() == 0:
            return q.view(x.shape), stats.zero_(), torch.empty(0, dtype=torch.int64, device=x.device)
        flags = quantize_into(x2d, q, stats, axis, threshold)
        return q.view(x.shape), stats, _flags_to_cols(flags, threshold)

    def triton(x, threshold):
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        q = torch.empty(x2d.shape, dtype=torch.int8, device=x.device)
        stats = torch.zeros(x2d.shape[axis], dtype=torch.float32, device=x.device)
        flags = torch.zeros(x2d.shape[1], dtype=torch.int32, device=x.device)
        if x2d.numel():
            triton_module("int8").quantize(x2d, q, stats, flags, axis, threshold)
        return q.view(x.shape), stats, _flags_to_cols(flags, threshold)

    def fake(x, threshold):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        stats = x.new_empty((rows if axis == 0 else x.shape[-1],), dtype=torch.float32)
        n_outliers = torch.library.get_ctx().new_dynamic_size()
        return x.new_empty(x.shape, dtype=torch.int8), stats, x.new_empty((n_outliers,), dtype=torch.int64)

    return reference, native, triton, fake


_reference_rowq, _native_rowq, _triton_rowq, _fake_rowq = _make_quant(0, ref.vectorwise_quant)
_reference_colq, _native_colq, _triton_colq, _fake_colq = _make_quant(1, ref.colwise_quant)

# ---- the contract every int8 kernel trusts, checked on every op call ---------------------------------------


def _check_quant(op):
    def check(x, threshold):
        check_dtype(op, "x", x, FLOAT_DTYPES)
        check_features(op, "x", x)
        check_real(op, "threshold", threshold, low=0.0)

    return check


def _check_dequant(q, stats, axis):
    op = "int8_vectorwise_dequant"
    check_dtype(op, "q", q, (torch.int8,))
    if q.dim() != 2:
        raise ValueError(f"{op}: q must be 2-D [rows, K], got shape {tuple(q.shape)}")
    check_dtype(op, "stats", stats, FLOAT_DTYPES)
    check_int(op, "axis", axis, low=0, high=1)
    check_numel(op, "stats", stats, q.shape[axis], f"one per {'row' if axis == 0 else 'column'} of q")


def _check_matmul(a, b):
    op = "int8_matmul"
    for name, t in (("a", a), ("b", b)):
        check_dtype(op, name, t, (torch.int8,))
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: a is {tuple(a.shape)} and b is {tuple(b.shape)}, their dim 1 (K) must match")
    if a.shape[1] > MAX_IN_FEATURES:  # past it an int32 sum can wrap: refused rather than silently wrong
        raise ValueError(f"{op}: K is {a.shape[1]}, at most {MAX_IN_FEATURES} keeps the int32 accumulation exact")


def _check_mm_dequant(c, row_stats, col_stats, bias, dtype):
    op = "int8_mm_dequant"
    check_dtype(op, "c", c, (torch.int32,))
    if c.dim() != 2:
        raise ValueError(f"{op}: c must be 2-D, got shape {tuple(c.shape)}")
    check_dtype(op, "row_stats", row_stats, FLOAT_DTYPES)
    check_numel(op, "row_stats", row_stats, c.shape[0], "one per row of c")
    check_dtype(op, "col_stats", col_stats, FLOAT_DTYPES)
    check_numel(op, "col_stats", col_stats, c.shape[1], "one per column of c")
    if bias is not None:
        check_dtype(op, "bias", bias, FLOAT_DTYPES)
    check_optional(op, "bias", bias, c.shape[1], "columns of c")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be a float dtype, got {dtype}")


def _check_linear(x, weight, weight_stats, bias, threshold):
    op = "int8_linear"
    check_int8_weight(op, weight, weight_stats)
    check_layer_size(op, weight.shape[0], weight.shape[1])
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_last_dim(op, "x", x, weight.shape[1], "in_features")
    if bias is not None:
        check_dtype(op, "bias", bias, FLOAT_DTYPES)
    check_optional(op, "bias", bias, weight.shape[0], "out_features")
    check_real(op, "threshold", threshold, low=0.0)


def _check_linear_grad_input(dy, weight, weight_stats):
    op = "int8_linear_grad_input"
    check_int8_weight(op, weight, weight_stats)
    check_layer_size(op, weight.shape[0], weight.shape[1])
    check_dtype(op, "dy", dy, FLOAT_DTYPES)
    check_last_dim(op, "dy", dy, weight.shape[0], "out_features")


int8_vectorwise_quant_op = define_op(
    "int8_vectorwise_quant",
    "(Tensor x, float threshold) -> (Tensor, Tensor, Tensor)",
    family="int8",
    fake=_fake_rowq,
    reference=_reference_rowq,
    native=_native_rowq,
    triton=_triton_rowq,
    triton_dtypes=NATIVE_DTYPES,
    check=_check_quant("int8_vectorwise_quant"),
)
int8_colwise_quant_op = define_op(
    "int8_colwise_quant",
    "(Tensor x, float threshold) -> (Tensor, Tensor, Tensor)",
    family="int8",
    fake=_fake_colq,
    reference=_reference_colq,
    native=_native_colq,
    triton=_triton_colq,
    triton_dtypes=NATIVE_DTYPES,
    check=_check_quant("int8_colwise_quant"),
)


def _reference_dequant(q, stats, axis):
    return ref.vectorwise_dequant(q, stats, axis)


def _native_dequant(q, stats, axis):
    if axis != 0:
        return _reference_dequant(q, stats, axis)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if q.numel():
        dequantize_rows_into(q.contiguous(), stats.float().contiguous(), out)
    return out


def dequantize_rows_into(q, stats, out) -> None:
    """Native: out [rows, K] (contiguous, fp32/fp16/bf16) = q [rows, K] * stats[r] / 127."""
    _native.launch("int8_dequantize_rows", q, q, stats, out, out.dtype, *q.shape)


def outlier_product(x2d, weight, weight_stats, outlier_cols, out=None) -> torch.Tensor:
    """ref.outlier_product (x's outlier columns times W's, in x's compute dtype, as fp32 [M, N]) with, on the
    CPU, W's columns gathered and dequantized by a native kernel that prefetches them: torch's W[:, cols] reads
    one scattered cache line per row and column, and took about as long as the GEMV itself on a cold 4096 x 4096 W.
    weight int8 [N, K] and weight_stats fp32 [N] contiguous; outlier_cols int64, non-empty."""
    if weight.is_cuda:
        return ref.outlier_product(x2d, weight, weight_stats, outlier_cols, out=out)
    compute = ref.matmul_dtype(x2d.dtype)
    cols = outlier_cols.contiguous()
    sub_w = torch.empty((weight.shape[0], cols.numel()), dtype=compute)
    _native.launch(
        "int8_dequantize_cols", weight, weight, weight_stats, cols, sub_w, compute, *weight.shape, cols.numel()
    )
    sub_x = x2d[:, cols].to(compute)
    if out is not None and compute == torch.float32:
        return torch.mm(sub_x, sub_w.t(), out=out)
    return (sub_x @ sub_w.t()).float()


def _fake_dequant(q, stats, axis):
    return q.new_empty(q.shape, dtype=torch.float32)


int8_vectorwise_dequant_op = define_op(
    "int8_vectorwise_dequant",
    "(Tensor q, Tensor stats, int axis) -> Tensor",
    family="int8",
    fake=_fake_dequant,
    reference=_reference_dequant,
    native=_native_dequant,
    triton=_reference_dequant,
    triton_dtypes=(),
    check=_check_dequant,
)


# ---- int8 matmul and its epilogue ----------------------------------------------------------------------


def _reference_matmul(a, b):
    return ref.int8_matmul(a, b)


def _native_matmul(a, b):
    if a.numel() == 0 or b.numel() == 0:
        return _reference_matmul(a, b)
    return _int_mm(a.contiguous(), b.contiguous())


def _triton_matmul(a, b):
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    if out.numel():
        if a.shape[1] == 0:
            return out.zero_()
        triton_module("int8").matmul(a.contiguous(), b.contiguous(), out)
    return out


def _fake_matmul(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


int8_matmul_op = define_op(
    "int8_matmul",
    "(Tensor a, Tensor b) -> Tensor",
    family="int8",
    fake=_fake_matmul,
    reference=_reference_matmul,
    native=_native_matmul,
    triton=_triton_matmul,
    triton_dtypes=(torch.int8,),
    check=_check_matmul,
)


def _bias_for(bias, out):
    """bias as the kernel reads it: the CUDA epilogue reads it in the output dtype, the CPU one in its own."""
    return bias.to(out.dtype).contiguous() if bias is not None and out.is_cuda else bias


def mm_dequant_into(c, row_stats, col_stats, bias, addend, out) -> None:
    """Native epilogue: out [M, N] = c * (row_stats x col_stats) / 127^2 (+ addend fp32) (+ bias); None = none.
    The kernels index c, addend and out as dense row-major [M, N]: a strided view would be read as garbage."""
    if not (c.is_contiguous() and out.is_contiguous() and (addend is None or addend.is_contiguous())):
        raise RuntimeError("int8 mm_dequant: c, addend and out must be contiguous [M, N]")
    bias = _bias_for(bias, out)
    _native.launch(
        "int8_mm_dequant",
        out,
        c,
        row_stats,
        col_stats,
        bias,
        bias.dtype if bias is not None else 0,
        addend,
        out,
        out.dtype,
        *c.shape,
    )


def gemv_into(q, row_stats, weight, weight_stats, bias, addend, out, outliers=None) -> None:
    """Native fused int8 GEMV + epilogue for q [m <= GEMV_MAX_ROWS, K]; bias / addend None = none. outliers (CPU
    only, instead of an addend): gemv_outliers' triple, whose product the kernel adds as it streams W."""
    bias = _bias_for(bias, out)
    m, k = q.shape
    cols, x_cols, bf16 = outliers if outliers is not None else (None, None, False)
    _native.launch(
        "int8_gemv",
        out,
        q,
        row_stats,
        weight,
        weight_stats,
        bias,
        bias.dtype if bias is not None else 0,
        addend,
        out,
        out.dtype,
        m,
        out.shape[1],
        k,
        cols,
        0 if cols is None else cols.numel(),
        x_cols,
        bf16,
    )


def gemv_outliers(x2d, outlier_cols) -> tuple | None:
    """For gemv_into on the CPU: (the columns, x's values in them as ref.outlier_product's compute dtype holds them,
    as fp32 [M, count], whether that dtype is bf16), or None without outlier columns."""
    if not outlier_cols.numel():
        return None
    compute = ref.matmul_dtype(x2d.dtype)
    cols = outlier_cols.contiguous()
    return cols, x2d[:, cols].to(compute).float().contiguous(), compute == torch.bfloat16


def _reference_mm_dequant(c, row_stats, col_stats, bias, dtype):
    return ref.mm_dequant(c, row_stats, col_stats, bias, None, dtype)


def _native_mm_dequant(c, row_stats, col_stats, bias, dtype):
    if dtype not in NATIVE_DTYPES or (bias is not None and bias.dtype not in NATIVE_DTYPES):
        return _reference_mm_dequant(c, row_stats, col_stats, bias, dtype)
    out = _native.empty(c.shape, dtype=dtype, device=c.device)
    if c.numel():
        mm_dequant_into(
            c.contiguous(),
            row_stats.float().contiguous(),
            col_stats.float().contiguous(),
            None if bias is None else bias.contiguous(),
            None,
            out,
        )
    return out


def _fake_mm_dequant(c, row_stats, col_stats, bias, dtype):
    return c.new_empty(c.shape, dtype=dtype)


int8_mm_dequant_op = define_op(
    "int8_mm_dequant",
    "(Tensor c, Tensor row_stats, Tensor col_stats, Tensor? bias, ScalarType dtype) -> Tensor",
    family="int8",
    fake=_fake_mm_dequant,
    reference=_reference_mm_dequant,
    native=_native_mm_dequant,
    triton=_reference_mm_dequant,
    triton_dtypes=(),
    check=_check_mm_dequant,
)


# ---- LLM.int8 linear -----------------------------------------------------------------------------------


def _reference_linear(x, weight, weight_stats, bias, threshold):
    return ref.int8_linear(x, weight, weight_stats, bias, threshold).contiguous()


def _native_linear(x, weight, weight_stats, bias, threshold):
    if x.dtype not in NATIVE_DTYPES or (bias is not None and bias.dtype not in NATIVE_DTYPES):
        return _reference_linear(x, weight, weight_stats, bias, threshold)
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features).contiguous()
    weight, weight_stats = weight.contiguous(), weight_stats.float().contiguous()
    bias = None if bias is None else bias.contiguous()
    m = x2d.shape[0]

    def new_out():
        return _native.empty((m, out_features), dtype=x.dtype, device=x.device)

    if m == 0 or out_features == 0 or in_features == 0:
        out = new_out()
        if out.numel():  # no inputs: the product is the bias alone
            out.copy_(torch.zeros(()) if bias is None else bias.expand(m, out_features))
        return out.view(*lead, out_features)
    q = torch.empty((m, in_features), dtype=torch.int8, device=x.device)
    row_stats = torch.empty(m, dtype=torch.float32, device=x.device)
    outlier_cols = _flags_to_cols(quantize_into(x2d, q, row_stats, 0, threshold), threshold)
    # A decode step: W streamed once (on the CPU with its outlier columns read on the way), where the GEMV multiplies
    # with VNNI; without it the portable GEMV took 2.7x torch._int_mm's time at one row (AVX2 build, 4096 x 4096).
    if m <= GEMV_MAX_ROWS and (x.is_cuda or _native.cpu.avx512_vnni_in_use()):
        out = new_out()
        if x.is_cuda:
            addend = outlier_product(x2d, weight, weight_stats, outlier_cols) if outlier_cols.numel() else None
            gemv_into(q, row_stats, weight, weight_stats, bias, addend, out)
        else:
            gemv_into(q, row_stats, weight, weight_stats, bias, None, out, gemv_outliers(x2d, outlier_cols))
        return out.view(*lead, out_features)
    products = _int_mm(q, weight)
    if x.dtype == torch.float32:
        # An fp32 result fits the int32 products' own memory: without outliers the epilogue rewrites them in
        # place (row by row, each read before it is written); with outliers their fp32 product goes straight
        # into one output buffer that the epilogue then reads back and overwrites. Either way one [M, N]
        # buffer fewer to allocate and fault in.
        if outlier_cols.numel():
            out = new_out()
            addend = outlier_product(x2d, weight, weight_stats, outlier_cols, out=out)
            mm_dequant_into(products, row_stats, weight_stats, bias, addend, out)
        else:
            out = products.view(torch.float32)
            mm_dequant_into(products, row_stats, weight_stats, bias, None, out)
        return out.view(*lead, out_features)
    addend = outlier_product(x2d, weight, weight_stats, outlier_cols) if outlier_cols.numel() else None
    out = new_out()
    mm_dequant_into(products, row_stats, weight_stats, bias, addend, out)
    return out.view(*lead, out_features)


def _triton_linear(x, weight, weight_stats, bias, threshold):
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features).contiguous()
    out = torch.empty((x2d.shape[0], out_features), dtype=x.dtype, device=x.device)
    if out.numel() == 0 or in_features == 0:
        return _reference_linear(x, weight, weight_stats, bias, threshold)
    kernels = triton_module("int8")
    q = torch.empty(x2d.shape, dtype=torch.int8, device=x.device)
    row_stats = torch.empty(x2d.shape[0], dtype=torch.float32, device=x.device)
    flags = torch.zeros(in_features, dtype=torch.int32, device=x.device)
    kernels.quantize(x2d, q, row_stats, flags, 0, threshold)
    outlier_cols = _flags_to_cols(flags, threshold)
    weight, weight_stats = weight.contiguous(), weight_stats.float().contiguous()
    addend = ref.outlier_product(x2d, weight, weight_stats, outlier_cols) if outlier_cols.numel() else None
    kernels.matmul(q, weight, out, row_stats, weight_stats, None if bias is None else bias.contiguous(), addend)
    return out.view(*lead, out_features)


def _fake_linear(x, weight, weight_stats, bias, threshold):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "int8_linear: x's last dim must be in_features")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _reference_linear_grad_input(dy, weight, weight_stats):
    return ref.int8_linear_grad_input(dy, weight, weight_stats).contiguous()


def _native_linear_grad_input(dy, weight, weight_stats):
    if dy.dtype not in NATIVE_DTYPES:
        return _reference_linear_grad_input(dy, weight, weight_stats)
    out_features, in_features = weight.shape
    dy2d = dy.reshape(-1, out_features)
    # CUDA, fp16/bf16: tensor-core products of dY and the dequantized tile in dY's dtype, summed over the tiles
    # into an fp32 dX (addmm with out_dtype), one rounding at the end. CPU (where fp16 matmul is slow) and fp32:
    # operands and dX in the reference's compute dtype.
    mixed = dy.is_cuda and dy.dtype in (torch.float16, torch.bfloat16)
    compute = dy.dtype if mixed else ref.matmul_dtype(dy.dtype)
    dyc = dy2d.to(compute)
    weight, weight_stats = weight.contiguous(), weight_stats.float().contiguous()
    dx = torch.zeros((dy2d.shape[0], in_features), dtype=torch.float32 if mixed else compute, device=dy.device)
    if dy2d.shape[0] and in_features:
        tile_buffer = torch.empty(min(TILE_ROWS, out_features) * in_features, dtype=compute, device=dy.device)
        for n0 in range(0, out_features, TILE_ROWS):
            n1 = min(n0 + TILE_ROWS, out_features)
            tile = tile_buffer[: (n1 - n0) * in_features].view(n1 - n0, in_features)
            dequantize_rows_into(weight[n0:n1], weight_stats[n0:n1], tile)
            if mixed:
                torch.addmm(dx, dyc[:, n0:n1], tile, out_dtype=torch.float32, out=dx)
            else:
                dx.addmm_(dyc[:, n0:n1], tile)
    return dx.to(dy.dtype).view(*dy.shape[:-1], in_features)


def _triton_linear_grad_input(dy, weight, weight_stats):
    out_features, in_features = weight.shape
    dy2d = dy.reshape(-1, out_features).contiguous()
    dx = torch.empty((dy2d.shape[0], in_features), dtype=dy.dtype, device=dy.device)
    if dx.numel():
        if out_features == 0:
            return dx.zero_().view(*dy.shape[:-1], in_features)
        triton_module("int8").grad_input(dy2d, weight.contiguous(), weight_stats.float().contiguous(), dx)
    return dx.view(*dy.shape[:-1], in_features)


def _fake_linear_grad_input(dy, weight, weight_stats):
    return dy.new_empty((*dy.shape[:-1], weight.shape[1]))


int8_linear_op = define_op(
    "int8_linear",
    "(Tensor x, Tensor weight, Tensor weight_stats, Tensor? bias, float threshold) -> Tensor",
    family="int8",
    fake=_fake_linear,
    reference=_reference_linear,
    native=_native_linear,
    triton=_triton_linear,
    triton_dtypes=NATIVE_DTYPES,
    check=_check_linear,
)
int8_linear_grad_input = define_op(
    "int8_linear_grad_input",
    "(Tensor dy, Tensor weight, Tensor weight_stats) -> Tensor",
    family="int8",
    fake=_fake_linear_grad_input,
    reference=_reference_linear_grad_input,
    native=_native_linear_grad_input,
    triton=_triton_linear_grad_input,
    triton_dtypes=NATIVE_DTYPES,
    check=_check_linear_grad_input,
)


@carry_backend
class Int8LinearFunction(torch.autograd.Function):
    """y = int8_linear(x) over a frozen int8 weight: dX = dY @ (W * SCB / 127) (the straight-through gradient
    of x's quantization), db = sum over rows of dY, no dW. Saves the int8 weight and its stats, not x."""

    @staticmethod
    def forward(ctx, x, weight, weight_stats, bias, threshold: float):
        ctx.save_for_backward(weight, weight_stats)
        return int8_linear_op(x, weight, weight_stats, bias, threshold)

    @staticmethod
    def backward(ctx, dy):
        weight, weight_stats = ctx.saved_tensors
        dx = int8_linear_grad_input(dy, weight, weight_stats) if ctx.needs_input_grad[0] else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(dy.dtype) if ctx.needs_input_grad[3] else None
        return dx, None, None, dbias, None


def check_int8_weight(fn: str, weight, weight_stats) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8:
        raise TypeError(
            f"{fn}: weight must be an int8 tensor of codes, got "
            f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    check_tensor(fn, "weight_stats", weight_stats, dtypes=(torch.float32,), dim=1)
    if weight_stats.shape[0] != weight.shape[0]:
        raise ValueError(f"{fn}: weight_stats has {weight_stats.shape[0]} elements, weight has {weight.shape[0]} rows")
    if weight.shape[1] > MAX_IN_FEATURES:
        raise ValueError(
            f"{fn}: in_features is {weight.shape[1]}, at most {MAX_IN_FEATURES} keeps the int32 accumulation exact"
        )


def int8_linear(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_stats: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> torch.Tensor:
    """LLM.int8 product: x [..., K] @ (weight_int8 * weight_stats / 127)^T + bias, in x's dtype.

    x is quantized row-wise to int8 except its outlier columns (any |x| >= threshold), which meet the matching
    dequantized weight columns in 16-bit (fp32 for fp32 x); threshold 0 turns the decomposition off.
    weight_int8 [N, K] holds row-wise codes and weight_stats [N] their absmax (bitsandbytes' CB and SCB).
    Differentiable w.r.t. x (straight-through: dX = dY @ dequant(W)) and bias.
    """
    fn = "int8_linear"
    check_tensor(fn, "x", x, min_dim=1)
    x, bias = cast_like_linear(autocast_dtype(x), x, bias)  # F.linear's autocast rule (ops/_autocast.py)
    check_int8_weight(fn, weight_int8, weight_stats)
    if x.shape[-1] != weight_int8.shape[1]:
        raise ValueError(f"{fn}: x's last dim is {x.shape[-1]}, the weight's in_features is {weight_int8.shape[1]}")
    threshold = check_real(fn, "threshold", threshold, low=0.0)
    check_same_device(fn, x=x, weight_int8=weight_int8, weight_stats=weight_stats)
    if bias is not None:
        check_tensor(fn, "bias", bias, dim=1)
        if bias.shape[0] != weight_int8.shape[0]:
            raise ValueError(f"{fn}: bias has {bias.shape[0]} elements, out_features is {weight_int8.shape[0]}")
        check_same_device(fn, x=x, bias=bias)
    return Int8LinearFunction.apply(x, weight_int8, weight_stats, bias, float(threshold))
