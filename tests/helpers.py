"""Shared test helpers: backends and ISAs to sweep, per-dtype tolerances, NF4 test weights."""

import contextlib
import importlib.util
import math

import pytest
import torch

import pyfastpeft
from pyfastpeft import _native
from pyfastpeft.reference import nf4 as nf4_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None

# Two roundings of the dtype apart (ours rounds once from fp32, eager PyTorch may round twice).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU_ISAS = [
    isa
    for isa in ("avx512", "avx2", "scalar")
    if ("avx512", "avx2", "scalar").index(isa) >= ("avx512", "avx2", "scalar").index(_native.cpu.best_isa())
]

# The backends to compare with the reference on CPU tensors. Triton runs in the interpreter here, on
# small shapes only, in fp32/fp16 (the interpreter mishandles bf16 arithmetic).
BACKENDS = ["native"] + (["triton"] if HAS_TRITON else [])


# The devices every device-parametric test runs on: the CPU always, a CUDA GPU where one is visible (the `cuda`
# mark skips it elsewhere, see conftest.py); bitsandbytes' tests take the device as a parameter the same way.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def on_device_unsupported(device, backend, dtype, numel, interpreter_limit=50_000):
    """skip_unsupported where Triton runs in the CPU interpreter (CPU tensors: bf16, and more than
    interpreter_limit elements); on a GPU every case runs."""
    if device == "cpu":
        skip_unsupported(backend, dtype, 0)
        if backend == "triton" and numel > interpreter_limit:
            pytest.skip("too large for the Triton CPU interpreter")


def grads_of(backend, fn, inputs, dy):
    """(outputs..., gradient of each input) of fn on `backend`, inputs as fresh leaves, dy the output grads."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = run(backend, fn, *leaves)
    torch.autograd.backward(out, dy)
    return (out if isinstance(out, tuple) else (out,)) + tuple(t.grad for t in leaves)


def assert_close(actual, expected, dtype=None):
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype or expected.dtype], equal_nan=True)


def skip_unsupported(backend, dtype, numel):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton CPU interpreter mishandles bf16 arithmetic")
    if backend == "triton" and numel > 300_000:
        pytest.skip("too large for the Triton CPU interpreter")


@contextlib.contextmanager
def _native_setting(setter, value):
    """setter(value) (one of _C's switches, which return the previous setting) for the block, then back."""
    previous = setter(value)
    try:
        yield
    finally:
        setter(previous)


def cpu_isa(name):
    return _native_setting(_native.cpu.set_isa, name)


# Where the CPU has AVX512-BF16, the kernels with a bf16 store by it run with it (True) and without it (False).
CPU_BF16 = [True, False] if _native.cpu.avx512_bf16_supported() else [False]


def cpu_avx512_bf16(enabled):
    return _native_setting(_native.cpu.set_avx512_bf16, enabled)


# Where the CPU has AVX512-VBMI, the 8-bit optimizers decode their states by byte lookups (True) and by float
# permutes (False).
CPU_VBMI = [True, False] if _native.cpu.avx512_vbmi_supported() else [False]


def cpu_avx512_vbmi(enabled):
    return _native_setting(_native.cpu.set_avx512_vbmi, enabled)


# Where the CPU has AMX tiles, the kernels with an AMX path run with it (True) and without it (False).
CPU_AMX = [True, False] if _native.cpu.amx_supported() else [False]


def cpu_amx(enabled):
    return _native_setting(_native.cpu.set_amx, enabled)


def run(backend, fn, *args, **kwargs):
    with pyfastpeft.use_backend(backend):
        return fn(*args, **kwargs)


def assert_no_less_accurate(ours, reference, exact, dtype):
    """ours is at least as close to the fp64 result as the eager reference, up to one rounding."""
    err_ours = (ours.double() - exact).abs().max().item()
    err_ref = (reference.double() - exact).abs().max().item()
    one_ulp = torch.finfo(dtype).eps * max(1.0, exact.abs().max().item())
    assert err_ours <= err_ref + one_ulp, (err_ours, err_ref)


def random_weight_state(n, k, blocksize, generator):
    """(packed, absmax) of an [n, k] weight: every byte value, absmax in [0.5, 1.5)."""
    packed = torch.randint(0, 256, ((n * k + 1) // 2,), dtype=torch.uint8, generator=generator)
    absmax = torch.rand(-(-n * k // blocksize), generator=generator) + 0.5
    return packed, absmax


def with_planted_ties(shape, blocksize, code, generator):
    """fp32 weight whose every other block scales exactly onto the code's midpoints and their fp32 neighbours:
    the block's absmax is a power of two (one element holds it), so x / absmax and x * (1 / absmax) are exact."""
    midpoints, _ = nf4_reference.search_tables(code)
    candidates = torch.cat(
        [
            midpoints,
            torch.nextafter(midpoints, torch.tensor(2.0)),
            torch.nextafter(midpoints, torch.tensor(-2.0)),
            code,
            torch.tensor([0.0, -0.0]),
        ]
    )
    flat = torch.randn(math.prod(shape), generator=generator)
    for b in range(0, -(-flat.numel() // blocksize), 2):
        block = flat[b * blocksize : (b + 1) * blocksize]
        scale = 2.0 ** torch.randint(-4, 5, (), generator=generator).item()
        block.copy_(candidates[torch.randint(0, candidates.numel(), (block.numel(),), generator=generator)] * scale)
        block[0] = scale * (1 if b % 4 == 0 else -1)
    return flat.view(shape)


def special_blocks_weight(numel: int) -> torch.Tensor:
    """A flat weight of numel (> 256) elements whose 64-element blocks are: all zero, holding a NaN, holding
    +inf, holding -inf, then zeros (a partial last block when numel is not a multiple of 64)."""
    w = torch.randn(numel)
    w[:64] = 0
    w[64 + 5] = float("nan")
    w[128 + 7] = float("inf")
    w[192 + 1] = float("-inf")
    w[256:] = 0
    return w


# The sizes of the tiny decoders the model tests build from configs (2 layers, hidden 64, GQA 4/2, vocab 128).
TINY_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def edge_rows(k: int) -> torch.Tensor:
    """9 fp32 rows of k >= 3 values for quantizers: rows whose range (and so scale) is not an ordinary number,
    beside one whose is: zeros, subnormals (qmax / absmax overflows), a tiny normal range, inf, NaN, -inf with a
    100 (an outlier at 6.0), values near the fp32 maximum, signed zeros with one 0.5, and a plain row."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, k, generator=g)
    x[0] = 0.0
    x[1] = torch.randn(k, generator=g) * 1e-40
    x[2] = torch.randn(k, generator=g) * 1e-38
    x[3, k // 2] = float("inf")
    x[4, k - 1] = float("nan")
    x[5, 0], x[5, k - 2] = float("-inf"), 100.0
    x[6] = torch.randn(k, generator=g) * 1e37
    x[7] = -0.0
    x[7, 1] = 0.5
    return x


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer LlamaForCausalLM with random weights (hidden 64, vocab 128), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_DECODER, "intermediate_size": 160, **overrides})).eval()


def train_steps(model, input_ids, steps: int, lr: float = 1e-2) -> list[float]:
    """`steps` AdamW steps of a causal LM on one batch (labels = the inputs) over the parameters that require grad,
    in training mode; the losses, one per step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---- the decode steps' own argument tests (ops/nf4.py: gemv_takes; ops/lora.py: _decode_takes) ---------------
# Each corruption maps valid keyword arguments (in the op's order) to altered ones; some leave them valid (another
# dtype, a view of another rank), so both sides of the implication below are exercised.


def _strided(t):
    """t's values in a non-contiguous view of the same shape (every other element of a doubled last dim)."""
    return t.repeat_interleave(2, dim=-1)[..., ::2] if t.dim() else t


DECODE_BASE_CORRUPTIONS = {
    "x not contiguous": lambda a: {**a, "x": _strided(a["x"])},
    "x of 9 rows": lambda a: {**a, "x": a["x"].new_ones(9, a["in_features"])},
    "x of no dims": lambda a: {**a, "x": a["x"].new_ones(())},
    "x narrow": lambda a: {**a, "x": a["x"][..., 1:].contiguous()},
    "x of ints": lambda a: {**a, "x": a["x"].to(torch.int32)},
    "x in fp16": lambda a: {**a, "x": a["x"].half()},
    "x of three dims": lambda a: {**a, "x": a["x"].unsqueeze(0)},
    "x on meta": lambda a: {**a, "x": a["x"].to("meta")},
    "packed short": lambda a: {**a, "packed": a["packed"][:-1]},
    "packed int8": lambda a: {**a, "packed": a["packed"].view(torch.int8)},
    "packed not contiguous": lambda a: {**a, "packed": _strided(a["packed"].view(-1, 1))},
    "packed flat": lambda a: {**a, "packed": a["packed"].view(-1)},
    "absmax short": lambda a: {**a, "absmax": a["absmax"][:-1]},
    "absmax in fp16": lambda a: {**a, "absmax": a["absmax"].half()},
    "absmax not contiguous": lambda a: {**a, "absmax": _strided(a["absmax"])},
    "code short": lambda a: {**a, "code": a["code"][:15]},
    "code in fp64": lambda a: {**a, "code": a["code"].double()},
    "bias short": lambda a: {**a, "bias": a["x"].new_ones(a["out_features"] - 1)},
    "bias of ints": lambda a: {**a, "bias": torch.ones(a["out_features"], dtype=torch.int64)},
    "bias in fp64": lambda a: {**a, "bias": torch.ones(a["out_features"], dtype=torch.float64)},
    "bias not contiguous": lambda a: {**a, "bias": _strided(a["x"].new_ones(a["out_features"]))},
    "no bias": lambda a: {**a, "bias": None},
    "blocksize 32": lambda a: {**a, "blocksize": 32},
    "blocksize 3": lambda a: {**a, "blocksize": 3},
    "blocksize a bool": lambda a: {**a, "blocksize": True},
    "blocksize a float": lambda a: {**a, "blocksize": 64.0},
    "out_features one short": lambda a: {**a, "out_features": a["out_features"] - 1},
    "out_features 0": lambda a: {**a, "out_features": 0},
    "in_features one short": lambda a: {**a, "in_features": a["in_features"] - 1},
    "in_features -1": lambda a: {**a, "in_features": -1},
}


def assert_decode_path_agrees(takes, check, direct, op, args: dict, corruptions: dict, corruption: str | None):
    """A decode path's own test `takes` accepts the valid `args` on the native backend, and accepts them altered by
    corruptions[corruption] only where the op's `check` does; there `direct` (the path itself) returns the op's
    output bit for bit, and arguments the check refuses raise through the path (which then is the op: its check's
    error, or torch's own where the schema refuses or converts a Python type first). On the reference backend it
    takes nothing."""
    with pyfastpeft.use_backend("native"):
        if corruption is None:
            assert takes(*args.values())
        else:
            args = corruptions[corruption](args)
        values = tuple(args.values())
        try:
            check(*values)
        except (TypeError, ValueError) as error:
            assert not takes(*values), f"{corruption}: the decode path takes arguments the op's check refuses: {error}"
            with pytest.raises((TypeError, ValueError, RuntimeError)):
                direct(*values)
        else:
            if takes(*values):
                assert torch.equal(direct(*values), op(*values)), corruption
    with pyfastpeft.use_backend("reference"):
        assert not takes(*values)
