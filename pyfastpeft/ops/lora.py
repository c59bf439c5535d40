"""LoRA over a frozen base: custom ops, backend table, autograd and the public lora_linear.

    y = x W^T + b + s * dropout(x) A^T B^T        A [r, in], B [out, r] (PEFT's shapes), s = scaling
The math of forward and backward, and the Philox dropout mask every backend shares, are written out in
pyfastpeft/reference/lora.py. The base product is a swappable piece (ops/lora_base.py: a base object with its
forward x W^T + b and its grad_input dY W, one BaseKind per storage); each base kind has its own pair of ops,
whose tensors and scalars describe the base:
  pyfastpeft::lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng, keep=None) -> (y, xa)
  pyfastpeft::lora_backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad,
      keep=None) -> (dx, dA, dB)
  pyfastpeft::lora_nf4_forward / lora_nf4_backward: the same with the NF4 base (packed, absmax, code) in
      place of weight and (blocksize, out_features, in_features) after lora_B / xa; lora_int8_*: (weight,
      weight_stats) and threshold. Multi-adapter batches: ops/lora_multi.py.
bias: None = none, rng: int64 [2] = (seed, offset) or None = no dropout (both `Tensor?` in the schemas).
xa = x_d A^T [M, r] in x's dtype; dx is empty when needs_input_grad is False. keep: None, or (with dropout) int64
[M, ceil(in / 64)], the mask as bits (element c of row i: bit c % 64 of word c // 64): the forward writes it (on
every backend; `Tensor(a!)?`), the native backward reads it instead of drawing the mask again.

Backends: reference (PyTorch, PEFT's order of operations); native CPU (torch GEMMs into the outputs, the
C++ kernels for the dropout: forward makes x_d a tile of rows at a time for xa; backward makes dA and dX's
branch term s * (dY B A) * keep / (1 - p) in one pass over x and dX, drawing each mask element once; on a CPU with
AMX tiles, bf16 at rank <= 32 also runs xa = x_d A^T and backward's dY B and dY^T xa on tiles, and over an NF4
base adds s xa B^T inside the NF4 tile GEMM's epilogue, y rounded once); Triton
(one kernel reads each x tile once for x W^T and x_d A^T, dequantizing NF4 tiles in its K loop; backward in
torch GEMMs plus a Triton masked-accumulate kernel).

Autograd saves x (not x_d: backward makes it again from rng), A, B, xa [M, r], rng and the base; and where the
native forward draws the mask on AMX tiles, its bits (keep: a sixteenth of x in bf16), so backward draws it once.
"""

from __future__ import annotations

import math
import struct

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend, choose
from pyfastpeft.ops import _dtensor
from pyfastpeft.ops import nf4 as nf4_ops
from pyfastpeft.ops._autocast import autocast_dtype, cast_like_linear
from pyfastpeft.ops._checks import (
    FLOAT_DTYPES,
    check_bool,
    check_dtype,
    check_last_dim,
    check_layer_size,
    check_optional,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from pyfastpeft.ops._library import define_op, triton_module
from pyfastpeft.ops.lora_base import BASE_KINDS, KINDS, BaseKind, dispatch_base
from pyfastpeft.reference import lora as ref

_CPU = torch.device("cpu")

SEED_HIGH = 2**62  # seed and offset are drawn uniformly from [0, SEED_HIGH)


# ---- implementations, generic over the base ------------------------------------------------------------


def _reference_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng):
    y, xa = ref.lora_forward(x, base.reference_forward, bias, lora_A, lora_B, scaling, dropout_p, rng)
    return y.contiguous(), xa.contiguous()


def _reference_backward(base, dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad):
    dx, grad_A, grad_B = ref.lora_backward(
        dy, x, base.reference_grad_input, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad
    )
    return dx.contiguous(), grad_A.contiguous(), grad_B.contiguous()


def dropout_into(src, dst, rng, dropout_p: float, alpha: float = 1.0, accumulate: bool = False, first: int = 0) -> None:
    """Native: dst (+)= alpha * src * keep * fp32(1 / (1 - p)), src and dst contiguous CPU tensors of one dtype.
    first: the mask element of src's first element (rows r0.. of an [M, in] tensor: r0 * in)."""
    seed, offset = rng.tolist()
    _native.launch(
        "lora_dropout",
        src,
        src,
        dst,
        src.numel(),
        src.dtype,
        seed,
        offset + first,
        _keep_threshold(dropout_p),
        _keep_scale(dropout_p),
        alpha,
        accumulate,
    )


# Rows of x_d (forward) are made a tile of about this many elements at a time, into one reused buffer, so the GEMM
# beside each dropout pass reads it in cache instead of an [M, in] temporary in memory.
TILE_ELEMENTS = 1 << 20

# The largest rank one AMX tile's K holds, and the fewest rows lora_down takes on AMX tiles (csrc/cpu/lora.cpp)
AMX_MAX_RANK = 32
AMX_MIN_ROWS = 32


def _row_tiles(rows: int, in_features: int) -> list[tuple[int, int]]:
    step = max(1, TILE_ELEMENTS // max(in_features, 1))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _fp32(value: float) -> float:
    """value rounded to fp32 (as torch.tensor(value, dtype=torch.float32) rounds it), as a Python float, without
    the ~3 us of a tensor: the decode path calls this twice per layer and token."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _keep_threshold(dropout_p: float) -> float:
    """fp32(p) (reference.lora.keep_threshold) as a Python float."""
    return _fp32(dropout_p)


def _keep_scale(dropout_p: float) -> float:
    """fp32(1 / (1 - p)) as a Python float."""
    return _fp32(1.0 / (1.0 - dropout_p))


def _launch_decode(x, m: int, packed, absmax, code, bias, lora_A, lora_B, blocksize: int, scaling, dropout_p, rng, y,
                   xa):  # fmt: skip
    """A decode step over an NF4 base in one native call (lora_nf4_gemv): xa = dropout(x) A^T, then
    y = x W^T + b + s * xa B^T with one rounding of y, for x's m rows (any leading shape). Every tensor contiguous on
    the CPU, absmax and code fp32, y [..., out] and xa [m, r] (None: not kept) in x's dtype. Pointers go to the
    kernel directly: the generic launcher's per-argument Python costs microseconds at every layer and token, and
    so would a view of x as [m, in]."""
    (rank, in_features), out_features = lora_A.shape, lora_B.shape[0]
    dropout = rng is not None
    seed, offset = rng.tolist() if dropout else (0, 0)
    threshold, keep_scale = (_keep_threshold(dropout_p), _keep_scale(dropout_p)) if dropout else (0.0, 1.0)
    codes = _native.DTYPE_CODES
    _native.cpu.lora_nf4_gemv(x.data_ptr(), codes[x.dtype], packed.data_ptr(), absmax.data_ptr(),
                              code.data_ptr(), 0 if bias is None else bias.data_ptr(),
                              0 if bias is None else codes[bias.dtype], lora_A.data_ptr(), lora_B.data_ptr(),
                              0 if xa is None else xa.data_ptr(), scaling, dropout, seed, offset, threshold,
                              keep_scale, y.data_ptr(), m, out_features, in_features, rank, blocksize,
                              torch.get_num_threads())  # fmt: skip


def _native_decode(base, x2d, bias, lora_A, lora_B, scaling, dropout_p, rng):
    """(y, xa) of a few rows (decode) over an NF4 base on the CPU: one native call, the down-projection with its
    dropout, then the dequant-GEMV adding the up-projection in its epilogue (one rounding of y). The general path's
    four torch calls around the GEMV added about a fifth to a bf16 layer's time at 4096 x 4096, r = 16."""
    m, rank, out_features = x2d.shape[0], lora_A.shape[0], lora_B.shape[0]
    xa = torch.empty((m, rank), dtype=x2d.dtype)
    y = torch.empty((m, out_features), dtype=x2d.dtype)
    packed, absmax, code = base.native_tensors()
    _launch_decode(x2d, m, packed, absmax, code, None if bias is None else bias.contiguous(), lora_A.contiguous(),
                   lora_B.contiguous(), base.blocksize, scaling, dropout_p, rng, y, xa)  # fmt: skip
    return y, xa


def _decodes_fused(base, x2d, lora_A) -> bool:
    return (
        base.kind == "nf4"
        and x2d.device.type == "cpu"
        and 1 <= x2d.shape[0] <= nf4_ops.GEMV_MAX_ROWS
        and x2d.shape[1] > 0
        and lora_A.shape[0] > 0
        and base.out_features > 0
        and x2d.dtype in nf4_ops.ALL_DTYPES
    )


def _native_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng, keep=None):
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    x2d = x.reshape(-1, in_features).contiguous()
    if _decodes_fused(base, x2d, lora_A):
        y, xa = _native_decode(base, x2d, bias, lora_A, lora_B, scaling, dropout_p, rng)
        if keep is not None:
            fill_keep(keep, rng, dropout_p, in_features)
        return y.view(*x.shape[:-1], out_features), xa
    if rng is not None and x2d.numel() and _native_products(x2d.dtype, lora_A.shape[0], x2d.shape[0], AMX_MIN_ROWS):
        # xa = x_d A^T in one kernel (x_d made a block of rows at a time in cache, the products on AMX tiles or by
        # AVX512-BF16's dot products), the mask's bits into keep as they are drawn
        xa = x2d.new_empty((x2d.shape[0], lora_A.shape[0]))
        seed, offset = rng.tolist()
        _native.launch("lora_down", x2d, x2d, lora_A.contiguous(), xa, keep, x2d.shape[0], in_features,
                       lora_A.shape[0], x2d.dtype, True, seed, offset, _keep_threshold(dropout_p),
                       _keep_scale(dropout_p))  # fmt: skip
        keep = None
    elif rng is not None and x2d.numel():
        # xa = x_d A^T a tile of rows at a time; the buffer is freed on return: backward regenerates x_d from rng
        xa = x2d.new_empty((x2d.shape[0], lora_A.shape[0]))
        tiles = _row_tiles(*x2d.shape)
        buffer = x2d.new_empty((tiles[0][1], in_features))
        for r0, r1 in tiles:
            x_dropped = buffer[: r1 - r0]
            dropout_into(x2d[r0:r1], x_dropped, rng, dropout_p, first=r0 * in_features)
            torch.mm(x_dropped, lora_A.t(), out=xa[r0:r1])
    else:
        xa = x2d @ lora_A.t()
    y = _nf4_forward_with_up(base, x2d, bias, xa, lora_B, scaling)
    if y is None:
        y = base.forward(x2d, bias)
        y.addmm_(xa, lora_B.t(), alpha=scaling)
    if keep is not None:
        fill_keep(keep, rng, dropout_p, in_features)
    return y.view(*x.shape[:-1], out_features), xa


def _nf4_forward_with_up(base, x2d, bias, xa, lora_B, scaling):
    """y = x W^T (+ b) + s xa B^T over an NF4 base in one kernel where nf4_matmul runs (bf16 above a GEMV's rows on a
    CPU with AMX tiles) and rank <= AMX_MAX_RANK: lora_nf4_matmul, the up-projection one more tile product in each
    output block's epilogue, added to the base's fp32 sums and rounded once (a bias after, as nf4_matmul's). Else
    None: the base's product, then y += s xa B^T in torch (another pass over y, rounded twice). The op's check has
    made lora_B [out, rank] in x's dtype."""
    m, rank = x2d.shape[0], xa.shape[1]
    if not (
        base.kind == "nf4"
        and x2d.device.type == "cpu"
        and m > nf4_ops.GEMV_MAX_ROWS
        and 1 <= rank <= AMX_MAX_RANK
        and base.out_features > 0
        and nf4_ops.amx_usable(x2d.dtype, base.in_features, base.blocksize)
    ):
        return None
    y = x2d.new_empty((m, base.out_features))
    _native.launch("lora_nf4_matmul", x2d, x2d, *base.native_tensors(), xa.contiguous(), lora_B.contiguous(), scaling,
                   y, m, base.out_features, base.in_features, rank, base.blocksize)  # fmt: skip
    if bias is not None:
        y += bias.to(y.dtype)
    return y


def _native_products(dtype, rank: int, rows: int, min_rows: int = 0) -> bool:
    """Whether the native kernels take a bf16 LoRA branch's products (rank <= AMX_MAX_RANK, at least min_rows rows)
    on AMX tiles, or on a CPU without them but with AVX512-BF16 (AMD Zen 4) by its dot products: there lora_down and
    lora_up_grads run in place of torch's small GEMMs, which read x and dY at about half the bandwidth on AMX hosts
    and at a fifth of it on Zen 4, and dY twice."""
    if dtype != torch.bfloat16 or rank > AMX_MAX_RANK or rows < min_rows:
        return False
    return _native.cpu.amx_in_use() or _native.cpu.avx512_bf16_in_use()


def _up_grads(dy2d, lora_B, xa, scaling):
    """(dY B, s dY^T xa): lora_up_grads, one read of dY for both, where _native_products; elsewhere torch's GEMMs."""
    if _native_products(dy2d.dtype, lora_B.shape[1], dy2d.shape[0]):
        grad_xa = dy2d.new_empty((dy2d.shape[0], lora_B.shape[1]))
        grad_B = torch.empty_like(lora_B, memory_format=torch.contiguous_format)
        _native.launch("lora_up_grads", dy2d, dy2d, lora_B.contiguous(), xa.contiguous(), grad_xa, grad_B,
                       dy2d.shape[0], dy2d.shape[1], lora_B.shape[1], dy2d.dtype, scaling)  # fmt: skip
        return grad_xa, grad_B
    grad_B = (xa.t() @ dy2d).mul_(scaling).t().contiguous()  # torch runs dY^T xa a fifth slower than (xa^T dY)^T
    return dy2d @ lora_B, grad_B


def _native_backward(base, dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad, keep=None):
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    dy2d = dy.reshape(-1, out_features).contiguous()
    x2d = x.reshape(-1, in_features).contiguous()
    grad_xa, grad_B = _up_grads(dy2d, lora_B, xa, scaling)
    dx = base.grad_input(dy2d) if needs_input_grad else None
    if rng is None:  # torch's GEMMs: dA = s (dY B)^T x, dX += s (dY B) A
        grad_A = (grad_xa.t() @ x2d).mul_(scaling)
        if dx is not None:
            dx.addmm_(grad_xa, lora_A, alpha=scaling)
    else:  # dA and dX's branch term in one native pass, each mask element drawn once (no x_d or dY B A in memory),
        # or read from keep, the forward's bits
        grad_A = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
        seed, offset = rng.tolist()
        _native.launch("lora_branch_grads", x2d, x2d, grad_xa, lora_A.contiguous(), dx, grad_A, keep, x2d.shape[0],
                       in_features, lora_A.shape[0], x2d.dtype, True, seed, offset, _keep_threshold(dropout_p),
                       _keep_scale(dropout_p), scaling)  # fmt: skip
    if dx is None:
        return x.new_empty(0), grad_A, grad_B
    return dx.view(x.shape), grad_A, grad_B


def _triton_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng):
    if base.kind == "int8":  # no fused Triton kernel over an int8 base: the base's own ops, then the LoRA branch
        return _unfused_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng)
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    x2d = x.reshape(-1, in_features).contiguous()
    y = torch.empty((x2d.shape[0], out_features), dtype=x.dtype, device=x.device)
    xa = torch.empty((x2d.shape[0], lora_A.shape[0]), dtype=x.dtype, device=x.device)
    triton_module("lora").lora_forward(
        x2d,
        base,
        None if bias is None else bias.contiguous(),
        lora_A.contiguous(),
        lora_B.contiguous(),
        y,
        xa,
        scaling,
        dropout_p,
        _keep_scale(dropout_p),
        rng,
    )
    return y.view(*x.shape[:-1], out_features), xa


def _triton_backward(base, dy, x, lora_A, lora_B, xa, scaling, dropout_p, rng, needs_input_grad):
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    kernels = triton_module("lora")
    dy2d = dy.reshape(-1, out_features).contiguous()
    x2d = x.reshape(-1, in_features).contiguous()
    dropout = rng is not None and x2d.numel() > 0
    keep_scale = _keep_scale(dropout_p)
    grad_xa = dy2d @ lora_B
    x_dropped = x2d
    if dropout:
        x_dropped = torch.empty_like(x2d)
        kernels.dropout_into(x2d, x_dropped, rng, dropout_p, keep_scale, 1.0, False)
    grad_A = (grad_xa.t() @ x_dropped).mul_(scaling)
    del x_dropped
    grad_B = (dy2d.t() @ xa).mul_(scaling)
    if not needs_input_grad:
        return x.new_empty(0), grad_A, grad_B
    dx = base.grad_input(dy2d)
    if dropout:
        kernels.dropout_into(grad_xa @ lora_A, dx, rng, dropout_p, keep_scale, scaling, True)
    else:
        dx.addmm_(grad_xa, lora_A, alpha=scaling)
    return dx.view(x.shape), grad_A, grad_B


def _unfused_forward(base, x, bias, lora_A, lora_B, scaling, dropout_p, rng):
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    x2d = x.reshape(-1, in_features).contiguous()
    y = base.forward(x2d, bias)
    x_dropped = x2d
    if rng is not None and x2d.numel():
        x_dropped = ref.dropout(x2d, dropout_p, rng)
    xa = x_dropped @ lora_A.t()
    y.add_((xa @ lora_B.t()).to(y.dtype), alpha=scaling)
    return y.view(*x.shape[:-1], out_features), xa


# ---- the ops ---------------------------------------------------------------------------------------------


def _fake_forward(x, lora_A, lora_B):
    rows = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], lora_B.shape[0])), x.new_empty((rows, lora_A.shape[0]))


def _fake_backward(x, lora_A, lora_B, needs_input_grad):
    dx = x.new_empty(x.shape) if needs_input_grad else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _op_impls(kind: BaseKind, impl_forward, impl_backward, takes_keep: bool):
    """The op kernels of one backend over base `kind`: they split the op's arguments (x, *base tensors, bias, A, B,
    *base scalars, scaling, dropout_p, rng, keep) and hand the implementation the base object. keep goes to an
    implementation that takes_keep (the native one); for the others the forward fills it from the reference mask,
    and the backward draws the mask again."""
    n_tensors, n_scalars = kind.n_tensors, kind.n_scalars

    def forward(x, *args):
        base_tensors, (bias, lora_A, lora_B, *rest) = args[:n_tensors], args[n_tensors:]
        base = kind.make(base_tensors, rest[:n_scalars])
        *settings, keep = _with_keep(rest[n_scalars:], 3)
        if takes_keep:
            return impl_forward(base, x, bias, lora_A, lora_B, *settings, keep)
        y, xa = impl_forward(base, x, bias, lora_A, lora_B, *settings)
        if keep is not None:
            fill_keep(keep, settings[2], settings[1], x.shape[-1])
        return y, xa

    def backward(dy, x, *args):
        base_tensors, (lora_A, lora_B, xa, *rest) = args[:n_tensors], args[n_tensors:]
        base = kind.make(base_tensors, rest[:n_scalars])
        *settings, keep = _with_keep(rest[n_scalars:], 4)
        if takes_keep:
            return impl_backward(base, dy, x, lora_A, lora_B, xa, *settings, keep)
        return impl_backward(base, dy, x, lora_A, lora_B, xa, *settings)

    return forward, backward


def _with_keep(settings, count: int):
    """The op's trailing arguments with keep last (None where the caller left the default out: the dispatcher
    passes only the arguments given)."""
    return (*settings, None) if len(settings) == count else tuple(settings)


def keep_words(in_features: int) -> int:
    """int64 words a row of the kept mask takes: bit c % 64 of word c // 64 is element c (csrc/cpu/lora.cpp)."""
    return (in_features + 63) // 64


def pack_keep(mask) -> torch.Tensor:
    """A bool mask [M, in] as int64 bit words [M, keep_words(in)]: element c of row i is bit c % 64 of word c // 64,
    the bits past in 0."""
    rows, in_features = mask.shape
    words = keep_words(in_features)
    kept = torch.zeros((rows, words * 64), dtype=torch.int64, device=mask.device)
    kept[:, :in_features] = mask
    bits = torch.bitwise_left_shift(
        torch.ones(64, dtype=torch.int64, device=mask.device), torch.arange(64, device=mask.device)
    )
    return (kept.view(rows, words, 64) * bits).sum(-1)  # distinct bits: the sum is their or (wrapping at bit 63)


def fill_keep(keep, rng, dropout_p: float, in_features: int) -> None:
    """keep = the reference's mask of rng packed (pack_keep): what the native forward writes as it draws the mask."""
    keep.copy_(pack_keep(ref.keep_mask(rng, (keep.shape[0], in_features), dropout_p, keep.device)))


# ---- the contract every LoRA kernel trusts, checked on every op call ----------------------------------------------


def check_lora_args(
    op: str, x, lora_A, lora_B, out_features: int, in_features: int, dropout_p, rng, bias=None, scaling=None
) -> int:
    """x [..., in] float, lora_A [r, in] and lora_B [out, r] in x's dtype, bias None or float [out], dropout_p in
    [0, 1), rng None or int64 [2] (seed, offset), scaling finite; returns x's row count M."""
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_layer_size(op, out_features, in_features)
    check_last_dim(op, "x", x, in_features, "in_features")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        check_dtype(op, name, t, (x.dtype,))
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"{op}: lora_A is {tuple(lora_A.shape)}, expected [r, {in_features}] (in_features)")
    if lora_B.shape[0] != out_features:
        raise ValueError(f"{op}: lora_B is {tuple(lora_B.shape)}, expected [{out_features}, R] (out_features)")
    if bias is not None:
        check_dtype(op, "bias", bias, FLOAT_DTYPES)
        check_optional(op, "bias", bias, out_features, "out_features")
    if scaling is not None:
        check_real(op, "scaling", scaling)
    check_real(op, "dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    if rng is not None:
        check_dtype(op, "rng", rng, (torch.int64,))
        if rng.shape != (2,):
            raise ValueError(
                f"{op}: rng must be None (no dropout) or the int64 pair (seed, offset) of shape [2], got shape "
                f"{tuple(rng.shape)}"
            )
    return math.prod(x.shape[:-1])


def _check_backward_extras(op, dy, x, lora_A, xa, rows: int, out_features: int, width: int) -> None:
    """dy [..., out] with x's rows and dtype, xa [M, width] in x's dtype."""
    check_dtype(op, "dy", dy, (x.dtype,))
    check_last_dim(op, "dy", dy, out_features, "out_features")
    if math.prod(dy.shape[:-1]) != rows:
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, x has {rows} rows")
    check_dtype(op, "xa", xa, (x.dtype,))
    if tuple(xa.shape) != (rows, width):
        raise ValueError(f"{op}: xa has shape {tuple(xa.shape)}, expected [{rows}, {width}]")


def _check_keep(op, keep, rng, rows: int, in_features: int) -> None:
    """keep None, or (with dropout) the int64 [M, keep_words(in)] contiguous words of the mask."""
    if keep is None:
        return
    if rng is None:
        raise ValueError(f"{op}: keep holds a dropout mask's bits; without dropout (rng None) it must be None")
    check_dtype(op, "keep", keep, (torch.int64,))
    if tuple(keep.shape) != (rows, keep_words(in_features)) or not keep.is_contiguous():
        raise ValueError(
            f"{op}: keep must be a contiguous int64 [{rows}, {keep_words(in_features)}] (x's rows, in_features / 64 "
            f"rounded up), got shape {tuple(keep.shape)}"
        )


def _single_checks(name: str, kind: BaseKind):
    """Checks of the (forward, backward) ops of single-adapter LoRA over base `kind`."""
    n_tensors, n_scalars = kind.n_tensors, kind.n_scalars

    def forward(x, *args):
        op = f"{name}_forward"
        base_tensors, (bias, lora_A, lora_B, *rest) = args[:n_tensors], args[n_tensors:]
        scaling, dropout_p, rng, keep = _with_keep(rest[n_scalars:], 3)
        out_features, in_features = kind.check(op, x, base_tensors, tuple(rest[:n_scalars]))
        rows = check_lora_args(op, x, lora_A, lora_B, out_features, in_features, dropout_p, rng, bias, scaling)
        if lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(f"{op}: lora_B is {tuple(lora_B.shape)}, its rank must be lora_A's {lora_A.shape[0]}")
        _check_keep(op, keep, rng, rows, in_features)

    def backward(dy, x, *args):
        op = f"{name}_backward"
        base_tensors, (lora_A, lora_B, xa, *rest) = args[:n_tensors], args[n_tensors:]
        scaling, dropout_p, rng, _, keep = _with_keep(rest[n_scalars:], 4)
        out_features, in_features = kind.check(op, x, base_tensors, tuple(rest[:n_scalars]))
        rows = check_lora_args(op, x, lora_A, lora_B, out_features, in_features, dropout_p, rng, None, scaling)
        if lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(f"{op}: lora_B is {tuple(lora_B.shape)}, its rank must be lora_A's {lora_A.shape[0]}")
        _check_backward_extras(op, dy, x, lora_A, xa, rows, out_features, lora_A.shape[0])
        _check_keep(op, keep, rng, rows, in_features)

    return forward, backward


_IMPLS = {
    "reference": (_reference_forward, _reference_backward, False),
    "native": (_native_forward, _native_backward, True),
    "triton": (_triton_forward, _triton_backward, False),
}


def _define_base_ops(kind: BaseKind):
    """pyfastpeft::lora{_kind}_forward / _backward over base `kind` (the module docstring gives the arguments)."""
    name = kind.op_name("lora")
    n_tensors, n_scalars = kind.n_tensors, kind.n_scalars
    impls = {backend: _op_impls(kind, *entry) for backend, entry in _IMPLS.items()}
    checks = _single_checks(name, kind)
    forward = define_op(
        f"{name}_forward",
        f"(Tensor x, {kind.tensors_schema}, Tensor? bias, Tensor lora_A, Tensor lora_B{kind.scalars_schema}, "
        "float scaling, float dropout_p, Tensor? rng, Tensor(a!)? keep=None) -> (Tensor, Tensor)",
        family="lora",
        fake=lambda x, *args: _fake_forward(x, *args[n_tensors + 1 : n_tensors + 3]),
        reference=impls["reference"][0],
        native=impls["native"][0],
        triton=impls["triton"][0],
        check=checks[0],
    )
    backward = define_op(
        f"{name}_backward",
        f"(Tensor dy, Tensor x, {kind.tensors_schema}, Tensor lora_A, Tensor lora_B, Tensor xa"
        f"{kind.scalars_schema}, float scaling, float dropout_p, Tensor? rng, bool needs_input_grad, "
        "Tensor? keep=None) -> (Tensor, Tensor, Tensor)",
        family="lora",
        fake=lambda dy, x, *args: _fake_backward(x, *args[n_tensors : n_tensors + 2], args[n_tensors + n_scalars + 6]),
        reference=impls["reference"][1],
        native=impls["native"][1],
        triton=impls["triton"][1],
        check=checks[1],
    )
    return forward, backward


# base kind name -> (forward op, backward op): the op arguments are (x, *base tensors, bias, A, B, *base scalars, ...)
BASE_OPS = {kind.name: _define_base_ops(kind) for kind in BASE_KINDS}
lora_forward, lora_backward = BASE_OPS["dense"]
lora_nf4_forward, lora_nf4_backward = BASE_OPS["nf4"]
lora_int8_forward, lora_int8_backward = BASE_OPS["int8"]
_REALS = frozenset({float, int})


def _decode_takes(x, packed, absmax, code, bias, lora_A, lora_B, blocksize, out_features, in_features, scaling,
                  dropout_p, rng) -> bool:  # fmt: skip
    """Whether lora_nf4_no_grad may hand its arguments to the decode kernel as they are: the base, x and bias as the
    NF4 GEMV takes them (nf4_ops.gemv_takes), lora_A [r, in] and lora_B [out, r] plain contiguous CPU tensors in x's
    dtype with r >= 1, scaling finite, dropout_p in [0, 1), rng None or the int64 pair (seed, offset) on the CPU, and
    the native backend for LoRA too. True implies every condition of the op's check (tests/test_lora.py holds the
    two together on corrupted arguments); False sends the call to the op, whose check names the bad argument."""
    plain = nf4_ops.PLAIN_TENSOR_TYPES
    return (
        nf4_ops.gemv_takes(x, packed, absmax, code, bias, blocksize, out_features, in_features)
        and type(lora_A) in plain
        and type(lora_B) in plain
        and lora_A.dtype == x.dtype
        and lora_B.dtype == x.dtype
        and lora_A.is_cpu
        and lora_B.is_cpu
        and lora_A.is_contiguous()
        and lora_B.is_contiguous()
        and lora_A.dim() == 2
        and lora_B.dim() == 2
        and lora_A.shape[1] == in_features
        and lora_B.shape[0] == out_features
        and 1 <= lora_A.shape[0] == lora_B.shape[1]
        and type(scaling) in _REALS
        and math.isfinite(scaling)
        and type(dropout_p) in _REALS
        and 0.0 <= dropout_p < 1.0
        and (rng is None or (type(rng) in plain and rng.dtype == torch.int64 and rng.is_cpu and rng.shape == (2,)))
        and choose("lora", _CPU) == "native"
    )


def lora_nf4_no_grad(
    x, packed, absmax, code, bias, lora_A, lora_B, blocksize, out_features, in_features, scaling, dropout_p, rng
):
    """lora_nf4_forward's y for a caller with nothing to differentiate (a decode step, inference). Arguments the
    decode kernel takes as they are (_decode_takes) run it straight from here; anything else is the op, which checks
    them. The op's dispatch around that kernel (torch's dispatcher, the backend choice, the base object, the checks'
    wrappers) cost about a tenth of a LoRA layer's call over a 4096 x 4096 NF4 base at one token on a 2-core host
    (0.6-0.8 ms in all): Python that runs with the caches the weight stream has just emptied."""
    if not _decode_takes(x, packed, absmax, code, bias, lora_A, lora_B, blocksize, out_features, in_features, scaling,
                         dropout_p, rng):  # fmt: skip
        return lora_nf4_forward(x, packed, absmax, code, bias, lora_A, lora_B, blocksize, out_features, in_features,
                                scaling, dropout_p, rng)[0]  # fmt: skip
    y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype)
    _launch_decode(x, x.numel() // in_features, packed, absmax, code, bias, lora_A, lora_B, blocksize, scaling,
                   dropout_p, rng, y, None)  # fmt: skip
    return y


def _keeps_mask_bits(x, rank: int, rng) -> bool:
    """Whether the forward keeps the dropout mask's bits for backward (M x in / 8 bytes, x_d's sixteenth in bf16),
    so backward reads them instead of drawing the mask again: where the native forward draws it in lora_down
    (_native_products from AMX_MIN_ROWS rows), in eager mode. Elsewhere, and under torch.compile, backward draws it
    again."""
    if rng is None or x.device.type != "cpu" or torch.compiler.is_compiling() or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    return choose("lora", x.device) == "native" and _native_products(x.dtype, rank, rows, AMX_MIN_ROWS)


@carry_backend
class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T over a frozen base; gradients for x, bias, A and B (the
    formulas in pyfastpeft/reference/lora.py; db = sum over rows of dY). Saves x, A, B, xa [M, r], rng and
    the base's tensors: never x_d, which backward makes again from rng; the mask's bits where _keeps_mask_bits."""

    @staticmethod
    def forward(
        ctx,
        x,
        bias,
        lora_A,
        lora_B,
        scaling: float,
        dropout_p: float,
        rng,
        base_kind: str,
        base_ints: tuple,
        *base_tensors,
    ):
        forward_op, _ = BASE_OPS[base_kind]
        keep = None
        if _keeps_mask_bits(x, lora_A.shape[0], rng):
            keep = torch.empty((x.numel() // x.shape[-1], keep_words(x.shape[-1])), dtype=torch.int64)
        y, xa = forward_op(x, *base_tensors, bias, lora_A, lora_B, *base_ints, scaling, dropout_p, rng, keep)
        ctx.save_for_backward(x, lora_A, lora_B, xa, rng, keep, *base_tensors)
        ctx.settings = (base_kind, base_ints, scaling, dropout_p)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, xa, rng, keep, *base_tensors = ctx.saved_tensors
        base_kind, base_ints, scaling, dropout_p = ctx.settings
        _, backward_op = BASE_OPS[base_kind]
        needs = ctx.needs_input_grad
        dx, grad_A, grad_B = backward_op(
            dy, x, *base_tensors, lora_A, lora_B, xa, *base_ints, scaling, dropout_p, rng, needs[0], keep
        )
        grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0) if needs[1] else None
        grad_base = [None] * len(base_tensors)
        if KINDS[base_kind].trainable and needs[9]:
            # a trainable dense base (full fine-tuning beside the adapter): dW = dY^T x, [out, in]
            grad_base[0] = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return (
            (dx if needs[0] else None),
            grad_bias,
            (grad_A if needs[2] else None),
            (grad_B if needs[3] else None),
            None,
            None,
            None,
            None,
            None,
            *grad_base,
        )


# ---- the public function ---------------------------------------------------------------------------------


def _check_dropout(fn: str, dropout_p, training) -> float:
    dropout_p = check_real(fn, "dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    check_bool(fn, "training", training)
    return dropout_p


def _checked_bias(fn: str, bias, x, out_features: int) -> torch.Tensor | None:
    """bias checked (None: none)."""
    if bias is None:
        return None
    check_tensor(fn, "bias", bias, dim=1, dtypes=FLOAT_DTYPES)
    if bias.shape[0] != out_features:
        raise ValueError(f"{fn}: bias has {bias.shape[0]} elements, out_features is {out_features}")
    check_same_dtype(fn, x=x, bias=bias)
    check_same_device(fn, x=x, bias=bias)
    return bias


def _draw_rng(x, dropout_p: float, training: bool) -> torch.Tensor | None:
    """(seed, offset) from the default generator of x's device when dropout applies, else None (no draw)."""
    if training and dropout_p > 0.0:
        return torch.randint(0, SEED_HIGH, (2,), dtype=torch.int64, device=x.device)
    return None


def lora_linear(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """x W^T + b + scaling * dropout(x) A^T B^T, PEFT's LoRA linear; differentiable w.r.t. x, bias, A, B.

    weight: dense [out, in] in x's dtype, the (packed, state) pair pyfastpeft.quant.quantize_nf4 returns, or an
    LLM.int8 base (weight_int8 [out, in], weight_stats fp32 [out][, threshold = 6.0]) as int8_linear takes it.
    lora_A: [r, in], lora_B: [out, r], in x's dtype. scaling: alpha / r (or alpha / sqrt(r), rsLoRA).
    Dropout (probability dropout_p in [0, 1)) applies only when training and dropout_p > 0: then a (seed,
    offset) pair is drawn from torch's default generator for x's device, so torch.manual_seed reproduces
    the mask and activation checkpointing recomputes it; otherwise nothing is drawn.

    DTensor inputs (tensor parallel: a dense weight sharded on out_features (column) or in_features (row), lora_B
    or lora_A sharded with it, as PEFT shards them; data or sequence parallel: x sharded on a dim but its last) run
    on each rank's shards and return a DTensor (ops/_dtensor.py has the layouts and the gradients' placements).
    """
    fn = "lora_linear"
    if _dtensor.any_dtensor(x, weight, bias, lora_A, lora_B):
        return _dtensor.lora_linear(lora_linear, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    check_tensor(fn, "x", x, min_dim=1)
    dtype = autocast_dtype(x)  # F.linear's autocast rule for every product (ops/_autocast.py)
    x, lora_A, lora_B, bias = cast_like_linear(dtype, x, lora_A, lora_B, bias)
    if isinstance(weight, torch.Tensor):
        (weight,) = cast_like_linear(dtype, weight)
    check_tensor(fn, "lora_A", lora_A, dim=2)
    check_tensor(fn, "lora_B", lora_B, dim=2)
    kind, base_ints, base_tensors, out_features, in_features = dispatch_base(fn, weight, x)
    scaling = check_real(fn, "scaling", scaling)
    dropout_p = _check_dropout(fn, dropout_p, training)
    if x.shape[-1] != in_features:
        raise ValueError(f"{fn}: x's last dim is {x.shape[-1]}, the weight's in_features is {in_features}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"{fn}: lora_A is {tuple(lora_A.shape)}, expected [r, {in_features}] (in_features)")
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"{fn}: lora_B is {tuple(lora_B.shape)}, its rank (dim 1) must match lora_A's rank {lora_A.shape[0]}"
        )
    if lora_B.shape[0] != out_features:
        raise ValueError(f"{fn}: lora_B is {tuple(lora_B.shape)}, expected [{out_features}, r] (out_features)")
    check_same_dtype(fn, x=x, lora_A=lora_A, lora_B=lora_B)
    check_same_device(fn, x=x, lora_A=lora_A, lora_B=lora_B)
    bias = _checked_bias(fn, bias, x, out_features)
    rng = _draw_rng(x, dropout_p, training)
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B, *base_tensors)
    ):  # nothing to differentiate (inference, a decode step): the op alone, without the autograd.Function's cost
        if kind.name == "nf4":  # a decode step's kernel without the op's dispatch (lora_nf4_no_grad says when)
            return lora_nf4_no_grad(x, *base_tensors, bias, lora_A, lora_B, *base_ints, scaling, dropout_p, rng)
        forward_op, _ = BASE_OPS[kind.name]
        return forward_op(x, *base_tensors, bias, lora_A, lora_B, *base_ints, scaling, dropout_p, rng)[0]
    return LoRALinearFunction.apply(
        x,
        bias,
        lora_A,
        lora_B,
        scaling,
        dropout_p,
        rng,
        kind.name,
        base_ints,
        *base_tensors,
    )
