"""NF4 products and modules: nf4_linear (forward, dX), Linear4bit, quantize_model."""

import os

import pytest
import torch
from helpers import DECODE_BASE_CORRUPTIONS, assert_decode_path_agrees, run, tiny_llama
from torch import nn

import pyfastpeft
from pyfastpeft.functional import nf4_linear
from pyfastpeft.nn import Linear4bit
from pyfastpeft.quant import dequantize_nf4, quantize_nf4

# Both sides multiply the same dequantized weight; they differ only in summation order (fp32 accumulation)
# and, for bf16, in where the product is rounded.
PRODUCT_TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def quantized(out_features, in_features, blocksize=64, double_quant=True, quant_type="nf4"):
    w = torch.randn(out_features, in_features) * 0.05
    packed, state = quantize_nf4(w, blocksize, double_quant, quant_type)
    return packed, state, dequantize_nf4(packed, state).float()


def exact_product(x, weight, bias=None):
    y = x.double() @ weight.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64])  # fused GEMV up to 8 rows, tiled GEMM above
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", [((96, 64), 64), ((100, 96), 64), ((33, 33), 32), ((300, 128), 128)])
def test_nf4_linear_matches_dense_product(rows, dtype, shape, blocksize):
    packed, state, weight = quantized(*shape, blocksize=blocksize)
    x = torch.randn(rows, shape[1]).to(dtype)
    bias = torch.randn(shape[0]).to(dtype)
    expected = exact_product(x, weight, bias)
    for backend in ("native", "reference"):
        y = run(backend, nf4_linear, x, packed, state, bias)
        assert y.dtype == dtype and y.shape == (rows, shape[0])
        torch.testing.assert_close(y.double(), expected, **PRODUCT_TOLERANCES[dtype])


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_grad_input_is_dy_times_dequantized_weight(rows, dtype):
    packed, state, weight = quantized(300, 64)
    x = torch.randn(2, rows, 64).to(dtype).requires_grad_()
    bias = torch.randn(300).to(dtype).requires_grad_()
    dy = torch.randn(2, rows, 300).to(dtype)
    nf4_linear(x, packed, state, bias).backward(dy)
    torch.testing.assert_close(x.grad.double(), dy.double() @ weight.double(), **PRODUCT_TOLERANCES[dtype])
    torch.testing.assert_close(bias.grad.double(), dy.double().sum((0, 1)), **PRODUCT_TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize", [((300, 200), 64), ((97, 131), 32)])
def test_nf4_tiles_cover_the_weight(monkeypatch, dtype, shape, blocksize):
    """Forward by tiles of W's rows, dX by tiles of its columns: with tiny tiles many of each, columns of odd
    widths starting mid-byte (an odd in_features), the last tile short; products equal the dense ones."""
    from pyfastpeft.ops import nf4 as nf4_ops

    monkeypatch.setattr(nf4_ops, "TILE_ROWS", 16)
    monkeypatch.setattr(nf4_ops, "TILE_ELEMENTS", 3000)
    packed, state, weight = quantized(*shape, blocksize=blocksize)
    x = torch.randn(24, shape[1]).to(dtype).requires_grad_()
    dy = torch.randn(24, shape[0]).to(dtype)
    with pyfastpeft.use_backend("native"):
        y = nf4_linear(x, packed, state)
        y.backward(dy)
    torch.testing.assert_close(y.double(), exact_product(x.detach(), weight), **PRODUCT_TOLERANCES[dtype])
    torch.testing.assert_close(x.grad.double(), dy.double() @ weight.double(), **PRODUCT_TOLERANCES[dtype])


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_nf4_linear_gradcheck(backend):
    packed, state, _ = quantized(12, 32, blocksize=32)
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: nf4_linear(a, packed, state, b), (x, bias))


def test_nf4_backward_keeps_no_dequantized_weight():
    packed, state, _ = quantized(256, 128)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nf4_linear(x, packed, state)
    assert sum(t.numel() * t.element_size() for t in saved) < 256 * 128  # packed + absmax + code, < 1 B/weight


def test_nf4_ops_opcheck():
    packed, state, _ = quantized(40, 64)
    absmax, code = state.dequantized_absmax(), state.code
    x = torch.randn(5, 64)
    w = torch.randn(40, 64)
    torch.library.opcheck(torch.ops.pyfastpeft.nf4_quantize.default, (w, code, 64))
    torch.library.opcheck(
        torch.ops.pyfastpeft.nf4_dequantize.default, (packed, absmax, code, 64, 40 * 64, torch.bfloat16)
    )
    for rows in (2, 12):
        x = torch.randn(rows, 64)
        torch.library.opcheck(
            torch.ops.pyfastpeft.nf4_linear.default, (x, packed, absmax, code, torch.randn(40), 64, 40, 64)
        )
        torch.library.opcheck(
            torch.ops.pyfastpeft.nf4_linear_grad_input.default,
            (torch.randn(rows, 40), packed, absmax, code, 64, 40, 64),
        )


def test_linear4bit_compiles_fullgraph():
    layer = Linear4bit(64, 48, compute_dtype=None)
    x = torch.randn(3, 64, requires_grad=True)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer(x))


def test_linear4bit_from_linear_matches_the_dequantized_layer():
    linear = nn.Linear(128, 72)
    layer = Linear4bit.from_linear(linear)
    assert not layer.weight.requires_grad and layer.weight.dtype == torch.uint8
    x = torch.randn(6, 128)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.dequantize(), linear.bias), rtol=1e-4, atol=1e-4)
    assert (layer.dequantize() - linear.weight).abs().mean() < 0.08 * linear.weight.abs().max()


@pytest.mark.parametrize("rows", [1, 40])
def test_linear4bit_gives_the_same_values_with_and_without_autograd(rows):
    """Without anything to differentiate the layer calls its op directly; with x or the bias requiring grad it goes
    through the autograd.Function. Same bits either way, and gradients where they are asked for."""
    layer = Linear4bit.from_linear(nn.Linear(128, 72), compute_dtype=torch.bfloat16)
    x = torch.randn(rows, 128)
    with torch.no_grad():
        plain = layer(x)
    frozen = layer.requires_grad_(False)(x)  # grad mode on, nothing requires grad
    assert not plain.requires_grad and not frozen.requires_grad
    x_leaf = x.clone().requires_grad_()
    traced = layer(x_leaf)
    assert torch.equal(plain, frozen) and torch.equal(plain, traced.detach())
    traced.sum().backward()
    assert x_leaf.grad is not None and x_leaf.grad.shape == x.shape
    layer.bias.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.bias.grad is not None


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear4bit_decode_steps_skip_the_op_only_where_the_op_would_run_the_same_gemv(monkeypatch, x_dtype):
    """At inference a few contiguous CPU rows run the GEMV without the op's dispatch: the op's bits. A
    non-contiguous x, the reference backend or a corrupted weight go through the op (which checks and raises)."""
    from pyfastpeft.ops import nf4 as nf4_ops

    layer = Linear4bit.from_linear(nn.Linear(256, 40), compute_dtype=x_dtype).requires_grad_(False)
    x = torch.randn(2, 3, 256).to(x_dtype)
    want = nf4_ops.nf4_linear_op(x, layer.weight, layer._absmax, layer.quant_state.code, layer.bias.to(x_dtype),
                                 layer.blocksize, 40, 256)  # fmt: skip
    calls = []
    op = nf4_ops.nf4_linear_op
    monkeypatch.setattr(nf4_ops, "nf4_linear_op", lambda *args: calls.append(args) or op(*args))
    assert torch.equal(layer(x), want) and not calls  # 6 rows: direct
    layer(x.transpose(0, 1))  # not contiguous
    with pyfastpeft.use_backend("reference"):
        layer(x)
    layer(torch.randn(9, 256).to(x_dtype))  # past GEMV_MAX_ROWS: the op's tiled path
    assert len(calls) == 3
    layer.weight.data = layer.weight.data[:-1]  # a truncated checkpoint
    with pytest.raises(ValueError, match="packed"):
        layer(x)


def test_linear4bit_casts_to_compute_dtype_and_back():
    layer = Linear4bit(64, 32, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = nn.functional.linear(x.bfloat16(), layer.dequantize().bfloat16(), layer.bias.bfloat16()).float()
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_state_dict_round_trip(double_quant):
    layer = Linear4bit.from_linear(nn.Linear(64, 40), double_quant=double_quant)
    state = layer.state_dict()
    assert {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"} <= set(state)
    assert ("weight.nested_absmax" in state) == double_quant
    other = Linear4bit(64, 40, double_quant=not double_quant, compute_dtype=None)
    other.load_state_dict(state)
    x = torch.randn(3, 64)
    assert torch.equal(other(x), layer(x)) and other.double_quant == double_quant


def _bitsandbytes_nn():
    try:
        import bitsandbytes

        return bitsandbytes.nn
    except Exception:
        return None


bnb_nn = _bitsandbytes_nn()


@pytest.mark.skipif(bnb_nn is None, reason="bitsandbytes is not importable")
def test_linear4bit_checkpoints_load_both_ways_with_bitsandbytes():
    linear = nn.Linear(64, 96)
    ours = Linear4bit.from_linear(linear)
    theirs = bnb_nn.Linear4bit(64, 96, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    with torch.compiler.set_stance("force_eager"):
        theirs.weight = bnb_nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64
        )
        theirs.bias = linear.bias
        theirs = theirs.to("cpu")  # quantizes
        x = torch.randn(5, 64)
        loaded = Linear4bit(64, 96, compute_dtype=None)
        loaded.load_state_dict(theirs.state_dict())
        assert torch.equal(loaded.weight, ours.weight)
        torch.testing.assert_close(loaded(x), theirs(x), rtol=1e-5, atol=1e-5)
        # ours into theirs, the way transformers loads a prequantized checkpoint
        state = ours.state_dict()
        stats = {k[len("weight.") :]: v for k, v in state.items() if k.startswith("weight.")}
        back = bnb_nn.Linear4bit(64, 96, compute_dtype=torch.float32, quant_type="nf4")
        back.weight = bnb_nn.Params4bit.from_prequantized(
            data=state["weight"], quantized_stats=stats, requires_grad=False, device="cpu"
        )
        back.bias = nn.Parameter(state["bias"])
        torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)


def test_quantize_model_replaces_linears_but_lm_head_and_saves_memory():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        reference = model(ids).logits
    report = pyfastpeft.quantize_model(model, "nf4")
    assert len(report.replaced) == 2 * 7 and report.skipped == ["lm_head"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit) and type(model.lm_head) is nn.Linear
    assert report.bytes_after < report.bytes_before
    with torch.no_grad():
        logits = model(ids).logits
    # 4-bit weights perturb a random model's logits by ~10%; they must still point the same way
    similarity = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    assert similarity > 0.98, similarity


def test_quantize_model_rejects_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        pyfastpeft.quantize_model(nn.Linear(4, 4), "int3")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda p, s: nf4_linear(torch.randn(2, 63), p, s), ValueError, "in_features is 64"),
        (lambda p, s: nf4_linear(torch.randn(2, 64), p.int(), s), TypeError, "packed must be a uint8"),
        (lambda p, s: nf4_linear(torch.randn(2, 64), p, "state"), TypeError, "state must be"),
        (lambda p, s: nf4_linear(torch.randn(2, 64), p, s, torch.randn(3)), ValueError, "bias has 3 elements"),
        (lambda p, s: nf4_linear(torch.ones(2, 64, dtype=torch.int32), p, s), TypeError, "x must have dtype"),
    ],
)
def test_nf4_linear_bad_input(call, error, match):
    packed, state, _ = quantized(40, 64)
    with pytest.raises(error, match=match):
        call(packed, state)


def test_linear4bit_rejects_bad_construction():
    with pytest.raises(ValueError, match="blocksize must be one of"):
        Linear4bit(64, 32, blocksize=48)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        Linear4bit(64, 32, quant_type="int4")


def test_linear4bit_dtype_casts_leave_the_quantized_weight_alone():
    layer = Linear4bit.from_linear(nn.Linear(64, 32), compute_dtype=None)
    x = torch.randn(2, 64)
    expected = layer(x)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer._absmax.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x.bfloat16()).float(), expected, rtol=2e-2, atol=2e-2)


def test_linear4bit_rejects_wrong_input_width():
    with pytest.raises(ValueError, match="in_features is 64"):
        Linear4bit(64, 32)(torch.randn(2, 65))


def _huge_page_advised(address: int) -> bool:
    """Whether the mapping holding address carries MADV_HUGEPAGE (VmFlags "hg" in /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                begin, end = (int(part, 16) for part in head.split("-"))
                inside = begin <= address < end
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    return False


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="Linux with transparent huge pages"
)
def test_large_packed_weights_are_advised_onto_huge_pages():
    """Decode reads the packed weight once per token: a large one is quantized into memory advised onto 2 MiB pages
    (its 2 MiB-aligned interior)."""
    with pyfastpeft.use_backend("native"):
        packed, _ = quantize_nf4(torch.randn(4096, 4096), 64, True)
    huge = 1 << 21
    interior = (packed.data_ptr() + huge - 1) // huge * huge
    assert interior + huge <= packed.data_ptr() + packed.numel()
    assert _huge_page_advised(interior)


# ---- the decode step's own argument test ---------------------------------------------------------------------


def _gemv_arguments(rows: int, dtype: torch.dtype) -> dict:
    packed, state, _ = quantized(48, 128)
    return dict(x=torch.randn(rows, 128).to(dtype), packed=packed, absmax=state.dequantized_absmax(),
                code=state.code.float(), bias=torch.randn(48).to(dtype), blocksize=64, out_features=48,
                in_features=128)  # fmt: skip


@pytest.mark.parametrize("corruption", [None, *DECODE_BASE_CORRUPTIONS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gemv_takes_only_what_the_ops_check_accepts(corruption, dtype):
    """nf4_linear_no_grad runs the GEMV itself where gemv_takes says so, without the op's check: gemv_takes must
    refuse whatever that check refuses (a corrupt checkpoint, a caller's mistake), and where it accepts, the
    output is the op's."""
    from pyfastpeft.ops import nf4 as nf4_ops

    assert_decode_path_agrees(
        nf4_ops.gemv_takes,
        lambda *values: nf4_ops.check_nf4_linear("nf4_linear", *values),
        nf4_ops.nf4_linear_no_grad,
        nf4_ops.nf4_linear_op,
        _gemv_arguments(3, dtype),
        DECODE_BASE_CORRUPTIONS,
        corruption,
    )
