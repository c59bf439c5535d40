"""8-bit blockwise dynamic quantization and the fused 8-bit optimizer steps: custom ops and backend table.

Ops (formulas, rounding and NaN rules in pyfastpeft/reference/blockwise.py):
  pyfastpeft::blockwise_quantize(x, code, blocksize) -> (codes uint8 of x's shape, absmax fp32 [nblocks])
  pyfastpeft::blockwise_dequantize(codes, absmax, code, blocksize, dtype) -> x_hat of codes' shape
  pyfastpeft::adam8bit_step(p!, g, state1!, state2!, absmax1!, absmax2!, code1, code2, step_size, correction2_eps,
                            beta1, beta2, decay) -> ()
  pyfastpeft::lion8bit_step(p!, g, state1!, absmax1!, code1, lr, beta1, beta2, decay) -> ()
  pyfastpeft::adam8bit_step_multi / lion8bit_step_multi: the same over lists of tensors (one dtype, one set of
                            constants) in one call
The step ops update their `!` arguments in place (declared in the schema) and run outside autograd: they are what
pyfastpeft.optim's optimizers call under torch.no_grad. code is a sorted fp32 table of 256 values; states hold one
code per parameter element, absmax one fp32 per block of 256. A parameter must be contiguous (it is written in place);
the rest is made contiguous where it is not. Native kernel: csrc/cpu/blockwise.cpp (CPU). Triton kernels for the steps:
triton_kernels/blockwise.py (compiled for sm_80/sm_90 in CI, checked against the reference in the interpreter, not yet
run on a GPU: CUDA tensors take the reference unless use_backend("triton") asks for them).
"""

from __future__ import annotations

import torch

from pyfastpeft import _native
from pyfastpeft.ops._checks import FLOAT_DTYPES, check_dtype, check_int
from pyfastpeft.ops._library import define_op, triton_module
from pyfastpeft.reference import blockwise as ref

STEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCKSIZE = 1 << 20


def _nblocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


# ---- blockwise_quantize / blockwise_dequantize ------------------------------------------------------------------


def _native_quantize(x, code, blocksize):
    codes = _native.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(_nblocks(x.numel(), blocksize), dtype=torch.float32, device=x.device)
    if x.numel():
        _native.launch(
            "blockwise_quantize", x, x.contiguous(), x.dtype, code.contiguous(), codes, absmax, x.numel(), blocksize
        )
    return codes, absmax


def _fake_quantize(x, code, blocksize):
    nblocks = _nblocks(x.numel(), blocksize)
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device), x.new_empty(nblocks, dtype=torch.float32)


def _reference_quantize(x, code, blocksize):
    codes, absmax = ref.quantize(x, code, blocksize)
    return codes.contiguous(), absmax


def _check_code(op: str, name: str, code) -> None:
    check_dtype(op, name, code, (torch.float32,))
    if code.numel() != 256:
        raise ValueError(f"{op}: {name} must hold 256 values (an 8-bit code), got {code.numel()}")


def _check_quantize(x, code, blocksize):
    check_dtype("blockwise_quantize", "x", x, FLOAT_DTYPES)
    _check_code("blockwise_quantize", "code", code)
    check_int("blockwise_quantize", "blocksize", blocksize, low=1, high=MAX_BLOCKSIZE)


def _native_dequantize(codes, absmax, code, blocksize, dtype):
    out = _native.empty(codes.shape, dtype=dtype, device=codes.device)
    if codes.numel():
        _native.launch(
            "blockwise_dequantize",
            codes,
            codes.contiguous(),
            absmax.contiguous(),
            code.contiguous(),
            out,
            dtype,
            codes.numel(),
            blocksize,
        )
    return out


def _fake_dequantize(codes, absmax, code, blocksize, dtype):
    return torch.empty(codes.shape, dtype=dtype, device=codes.device)


def _reference_dequantize(codes, absmax, code, blocksize, dtype):
    return ref.dequantize(codes, absmax, code, blocksize, dtype).contiguous()


def _check_dequantize(codes, absmax, code, blocksize, dtype):
    op = "blockwise_dequantize"
    check_dtype(op, "codes", codes, (torch.uint8,))
    check_dtype(op, "absmax", absmax, (torch.float32,))
    _check_code(op, "code", code)
    check_int(op, "blocksize", blocksize, low=1, high=MAX_BLOCKSIZE)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be one of float32, float16, bfloat16, float64, got {dtype}")
    expected = _nblocks(codes.numel(), blocksize)
    if absmax.numel() != expected:
        raise ValueError(
            f"{op}: absmax has {absmax.numel()} elements, {codes.numel()} codes in blocks of {blocksize} "
            f"need {expected}"
        )


blockwise_quantize = define_op(
    "blockwise_quantize",
    "(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)",
    family="blockwise",
    fake=_fake_quantize,
    reference=_reference_quantize,
    native=_native_quantize,
    triton=_reference_quantize,
    check=_check_quantize,
)
blockwise_dequantize = define_op(
    "blockwise_dequantize",
    "(Tensor codes, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    family="blockwise",
    fake=_fake_dequantize,
    reference=_reference_dequantize,
    native=_native_dequantize,
    triton=_reference_dequantize,
    check=_check_dequantize,
)


# ---- the 8-bit optimizer steps ----------------------------------------------------------------------------------


def _check_state(op: str, p, g, states: dict, absmaxes: dict, codes: dict) -> None:
    """p floating (fp32, fp16, bf16) and contiguous; g of p's dtype and size; each state uint8 of p's size and
    contiguous; each absmax fp32 of ceil(numel / 256) elements, contiguous; each code an fp32 [256]."""
    check_dtype(op, "p", p, STEP_DTYPES)
    if not p.is_contiguous():
        raise ValueError(f"{op}: p must be contiguous (it is updated in place)")
    check_dtype(op, "g", g, (p.dtype,))
    n = p.numel()
    if g.numel() != n:
        raise ValueError(f"{op}: g has {g.numel()} elements, p has {n}")
    for name, state in states.items():
        check_dtype(op, name, state, (torch.uint8,))
        if state.numel() != n:
            raise ValueError(f"{op}: {name} has {state.numel()} elements, p has {n}")
        if not state.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is updated in place)")
    nblocks = _nblocks(n, ref.OPTIMIZER_BLOCKSIZE)
    for name, absmax in absmaxes.items():
        check_dtype(op, name, absmax, (torch.float32,))
        if absmax.numel() != nblocks:
            raise ValueError(
                f"{op}: {name} has {absmax.numel()} elements, {n} parameters in blocks of "
                f"{ref.OPTIMIZER_BLOCKSIZE} need {nblocks}"
            )
        if not absmax.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is updated in place)")
    for name, code in codes.items():
        _check_code(op, name, code)


def _check_lists(op: str, p, named_lists: dict) -> None:
    """Tensor lists of one length, the parameters of one dtype (one device: define_op's check_op_devices)."""
    if len(p) == 0:
        raise ValueError(f"{op}: p is an empty list")
    for name, values in named_lists.items():
        if len(values) != len(p):
            raise ValueError(f"{op}: {name} has {len(values)} tensors, p has {len(p)}")
    for i, t in enumerate(p):
        if t.dtype != p[0].dtype:
            raise TypeError(f"{op}: p[{i}] has dtype {t.dtype}, p[0] has {p[0].dtype}: one call takes one dtype")


def _all_fit(p, g, states: tuple, absmaxes: tuple) -> bool:
    """Whether every tensor of the lists meets _check_state (p[0]'s dtype being every p's, as _check_lists
    checks): the same conditions in one pass with no message, as a step validates hundreds of tensors a call. A
    False sends the caller through _check_state, tensor by tensor, for the error that names the argument."""
    dtype = p[0].dtype
    if dtype not in STEP_DTYPES:
        return False
    uint8, fp32, blocksize = torch.uint8, torch.float32, ref.OPTIMIZER_BLOCKSIZE
    for i, param in enumerate(p):
        n = param.numel()
        grad = g[i]
        if not param.is_contiguous() or grad.dtype != dtype or grad.numel() != n:
            return False
        for state in states:
            t = state[i]
            if t.dtype != uint8 or t.numel() != n or not t.is_contiguous():
                return False
        nblocks = _nblocks(n, blocksize)
        for absmax in absmaxes:
            t = absmax[i]
            if t.dtype != fp32 or t.numel() != nblocks or not t.is_contiguous():
                return False
    return True


def _check_adam(p, g, state1, state2, absmax1, absmax2, code1, code2, *constants):
    _check_state(
        "adam8bit_step",
        p,
        g,
        {"state1": state1, "state2": state2},
        {"absmax1": absmax1, "absmax2": absmax2},
        {"code1": code1, "code2": code2},
    )


def _check_adam_multi(p, g, state1, state2, absmax1, absmax2, code1, code2, *constants):
    op = "adam8bit_step_multi"
    lists = dict(g=g, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2)
    _check_lists(op, p, lists)
    _check_code(op, "code1", code1)
    _check_code(op, "code2", code2)
    if _all_fit(p, g, (state1, state2), (absmax1, absmax2)):
        return
    for i in range(len(p)):
        _check_state(
            f"{op}: tensor {i}",
            p[i],
            g[i],
            {"state1": state1[i], "state2": state2[i]},
            {"absmax1": absmax1[i], "absmax2": absmax2[i]},
            {},
        )


def _addresses(tensors) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _launch_multi(kernel: str, p, g, in_place: list, codes: tuple, constants: tuple) -> None:
    """One native call over the non-empty tensors of the lists: each list's addresses and the sizes as int64 arrays
    (the kernel's pointer arrays), the count and dtype, the codes, the step's constants, and whether decay
    (the last constant) applies."""
    keep = [i for i in range(len(p)) if p[i].numel()]
    if not keep:
        return
    grads = [g[i] if g[i].is_contiguous() else g[i].contiguous() for i in keep]  # alive until the kernel returns
    lists = [[p[i] for i in keep], grads] + [[t[i] for i in keep] for t in in_place]
    _native.launch(
        kernel,
        p[keep[0]],
        *(_addresses(tensors) for tensors in lists),
        torch.tensor([p[i].numel() for i in keep], dtype=torch.int64),
        len(keep),
        p[keep[0]].dtype,
        *(code.contiguous() for code in codes),
        *constants,
        constants[-1] != 1.0,
    )


def _native_adam_multi(p, g, state1, state2, absmax1, absmax2, code1, code2, *constants):
    _launch_multi("adam8bit_step", p, g, [state1, state2, absmax1, absmax2], (code1, code2), constants)


def _native_adam(p, g, state1, state2, absmax1, absmax2, code1, code2, *constants):
    _native_adam_multi([p], [g], [state1], [state2], [absmax1], [absmax2], code1, code2, *constants)


def _reference_adam(p, g, state1, state2, absmax1, absmax2, code1, code2, *constants):
    if p.numel():
        ref.adam8bit_step(p, g, state1, state2, absmax1, absmax2, code1, code2, *constants)


def _reference_adam_multi(p, g, state1, state2, absmax1, absmax2, code1, code2, *constants):
    for tensors in zip(p, g, state1, state2, absmax1, absmax2):
        _reference_adam(*tensors, code1, code2, *constants)


def _fake_step(*args):
    return None


def _triton_adam(p, g, state1, state2, absmax1, absmax2, code1, code2, *constants):
    if p.numel():
        triton_module("blockwise").adam8bit_step(
            p, g.contiguous(), state1, state2, absmax1, absmax2, code1.contiguous(), code2.contiguous(), *constants
        )


def _triton_adam_multi(p, g, state1, state2, absmax1, absmax2, code1, code2, *constants):
    for tensors in zip(p, g, state1, state2, absmax1, absmax2):
        _triton_adam(*tensors, code1, code2, *constants)


def _triton_lion(p, g, state1, absmax1, code1, *constants):
    if p.numel():
        triton_module("blockwise").lion8bit_step(p, g.contiguous(), state1, absmax1, code1.contiguous(), *constants)


def _triton_lion_multi(p, g, state1, absmax1, code1, *constants):
    for tensors in zip(p, g, state1, absmax1):
        _triton_lion(*tensors, code1, *constants)


def _check_lion(p, g, state1, absmax1, code1, *constants):
    _check_state("lion8bit_step", p, g, {"state1": state1}, {"absmax1": absmax1}, {"code1": code1})


def _check_lion_multi(p, g, state1, absmax1, code1, *constants):
    op = "lion8bit_step_multi"
    _check_lists(op, p, dict(g=g, state1=state1, absmax1=absmax1))
    _check_code(op, "code1", code1)
    if _all_fit(p, g, (state1,), (absmax1,)):
        return
    for i in range(len(p)):
        _check_state(f"{op}: tensor {i}", p[i], g[i], {"state1": state1[i]}, {"absmax1": absmax1[i]}, {})


def _native_lion_multi(p, g, state1, absmax1, code1, *constants):
    _launch_multi("lion8bit_step", p, g, [state1, absmax1], (code1,), constants)


def _native_lion(p, g, state1, absmax1, code1, *constants):
    _native_lion_multi([p], [g], [state1], [absmax1], code1, *constants)


def _reference_lion(p, g, state1, absmax1, code1, *constants):
    if p.numel():
        ref.lion8bit_step(p, g, state1, absmax1, code1, *constants)


def _reference_lion_multi(p, g, state1, absmax1, code1, *constants):
    for tensors in zip(p, g, state1, absmax1):
        _reference_lion(*tensors, code1, *constants)


ADAM_CONSTANTS = "float step_size, float correction2_eps, float beta1, float beta2, float decay) -> ()"
LION_CONSTANTS = "float lr, float beta1, float beta2, float decay) -> ()"
adam8bit_step = define_op(
    "adam8bit_step",
    "(Tensor(a!) p, Tensor g, Tensor(b!) state1, Tensor(c!) state2, Tensor(d!) absmax1, Tensor(e!) absmax2, "
    "Tensor code1, Tensor code2, " + ADAM_CONSTANTS,
    family="blockwise",
    fake=_fake_step,
    reference=_reference_adam,
    native=_native_adam,
    triton=_triton_adam,
    check=_check_adam,
)
# One call over many tensors of one dtype with the same constants (an optimizer's parameter group): one parallel
# loop over all their blocks, where per-tensor calls would each pay for one.
adam8bit_step_multi = define_op(
    "adam8bit_step_multi",
    "(Tensor(a!)[] p, Tensor[] g, Tensor(b!)[] state1, Tensor(c!)[] state2, Tensor(d!)[] absmax1, "
    "Tensor(e!)[] absmax2, Tensor code1, Tensor code2, " + ADAM_CONSTANTS,
    family="blockwise",
    fake=_fake_step,
    reference=_reference_adam_multi,
    native=_native_adam_multi,
    triton=_triton_adam_multi,
    check=_check_adam_multi,
)
lion8bit_step = define_op(
    "lion8bit_step",
    "(Tensor(a!) p, Tensor g, Tensor(b!) state1, Tensor(c!) absmax1, Tensor code1, " + LION_CONSTANTS,
    family="blockwise",
    fake=_fake_step,
    reference=_reference_lion,
    native=_native_lion,
    triton=_triton_lion,
    check=_check_lion,
)
lion8bit_step_multi = define_op(
    "lion8bit_step_multi",
    "(Tensor(a!)[] p, Tensor[] g, Tensor(b!)[] state1, Tensor(c!)[] absmax1, Tensor code1, " + LION_CONSTANTS,
    family="blockwise",
    fake=_fake_step,
    reference=_reference_lion_multi,
    native=_native_lion_multi,
    triton=_triton_lion_multi,
    check=_check_lion_multi,
)


def table_exact(code: torch.Tensor) -> bool:
    """Whether the native kernel answers `code` from its bucket table (else by binary search): both dynamic maps do."""
    out = torch.zeros(1, dtype=torch.int32)
    _native.cpu.blockwise_table_exact(code.float().contiguous().data_ptr(), out.data_ptr())
    return bool(out.item())
