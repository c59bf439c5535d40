"""DoRA: the ops against the reference and PEFT's formula (every base kind, dtype, with and without dropout), fp64
gradcheck, opcheck; LoRALinear(use_dora=True) against PEFT's DoRA layer (outputs and gradients, the dropout path with
the same mask); from_peft, load_adapter and save_adapter both ways on tiny Llama and Gemma; merge and unmerge; a
training run whose loss falls."""

import copy
import json
import math

import pytest
import torch
from helpers import CPU_BF16, CPU_ISAS, TINY_DECODER, cpu_avx512_bf16, cpu_isa, tiny_llama, train_steps
from torch import nn

import pyfastpeft
from pyfastpeft.backend import use_backend
from pyfastpeft.functional import dora_linear, dora_weight_norm
from pyfastpeft.nn import LoRALinear
from pyfastpeft.nn.linear4bit import Linear4bit
from pyfastpeft.nn.linear8bitlt import Linear8bitLt
from pyfastpeft.ops import dora as dora_ops
from pyfastpeft.ops.lora import SEED_HIGH
from pyfastpeft.reference import lora as lora_ref

peft = pytest.importorskip("peft")

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def eager_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_dropped):
    """PEFT's DoRA math written out in fp64: x W^T + b + (g - 1) x_d W^T + g s x_d A^T B^T, g = m / ||W + s B A||."""
    c = torch.float64
    weight = weight.to(c)
    norm = torch.linalg.vector_norm(weight + scaling * (lora_B.detach().to(c) @ lora_A.detach().to(c)), dim=1)
    g = magnitude.to(c) / norm
    y = x.to(c) @ weight.t() + (g - 1) * (x_dropped.to(c) @ weight.t())
    y = y + g * scaling * (x_dropped.to(c) @ lora_A.to(c).t() @ lora_B.to(c).t())
    return y if bias is None else y + bias.to(c)


def make_inputs(dtype, out_features=40, in_features=48, r=4, rows=(3, 37), bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dt)

    magnitude_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(
        x=randn(*rows, in_features).requires_grad_(),
        weight=randn(out_features, in_features, scale=0.3),
        bias=randn(out_features).requires_grad_() if bias else None,
        lora_A=randn(r, in_features, scale=0.3).requires_grad_(),
        lora_B=randn(out_features, r, scale=0.3).requires_grad_(),
        magnitude=(randn(out_features, dt=magnitude_dtype).abs() + 1.0).requires_grad_(),
    )


def run(inputs, scaling, dropout_p, backend, weight=None, seed=3):
    torch.manual_seed(seed)
    with use_backend(backend):
        y = dora_linear(
            inputs["x"],
            inputs["weight"] if weight is None else weight,
            inputs["bias"],
            inputs["lora_A"],
            inputs["lora_B"],
            inputs["magnitude"],
            scaling,
            dropout_p,
            training=True,
        )
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(y.dtype)
        wrt = [inputs[name] for name in ("x", "bias", "lora_A", "lora_B", "magnitude") if inputs[name] is not None]
        grads = torch.autograd.grad(y, wrt, dy)
    return y, grads, dy


def drawn_rng(seed=3):
    torch.manual_seed(seed)
    return torch.randint(0, SEED_HIGH, (2,), dtype=torch.int64)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_dora_linear_matches_peft_formula(backend, dtype, dropout_p, bias):
    inputs = make_inputs(dtype, bias=bias)
    y, grads, dy = run(inputs, 1.5, dropout_p, backend)
    x = inputs["x"]
    x_dropped = x
    if dropout_p:
        x_dropped = lora_ref.dropout(x.reshape(-1, x.shape[-1]), dropout_p, drawn_rng()).view(x.shape)
    expected = eager_dora(
        x, inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], inputs["magnitude"], 1.5, x_dropped
    )
    wrt = [inputs[name] for name in ("x", "bias", "lora_A", "lora_B", "magnitude") if inputs[name] is not None]
    expected_grads = torch.autograd.grad(expected, wrt, dy.to(torch.float64))
    tol = TOLERANCES[dtype]
    assert y.dtype == dtype
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(y.double() / scale, expected / scale, **tol)
    for got, want, t in zip(grads, expected_grads, wrt):
        assert got.dtype == t.dtype
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double() / scale, want.double() / scale, **tol)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_native_equals_reference_in_fp32(dropout_p):
    inputs = make_inputs(torch.float32, out_features=70, in_features=33, rows=(2, 19))
    y_ref, grads_ref, _ = run(inputs, 0.7, dropout_p, "reference")
    y_nat, grads_nat, _ = run(inputs, 0.7, dropout_p, "native")
    torch.testing.assert_close(y_nat, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_nat, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_triton_composition_under_the_interpreter(dropout_p):
    inputs = make_inputs(torch.float32, out_features=32, in_features=32, rows=(2, 8))
    y_ref, grads_ref, _ = run(inputs, 2.0, dropout_p, "reference")
    y_tri, grads_tri, _ = run(inputs, 2.0, dropout_p, "triton")
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads_tri, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_gradcheck_fp64(backend, dropout_p):
    inputs = make_inputs(torch.float64, out_features=6, in_features=5, r=2, rows=(2, 3))
    names = ("x", "bias", "lora_A", "lora_B", "magnitude")
    weight = inputs["weight"]
    # the norm is detached (PEFT's rule): hold it fixed so gradcheck's perturbations of A and B see the same function
    norm = dora_weight_norm(weight, inputs["lora_A"], inputs["lora_B"], 1.3)

    def fn(*tensors):
        args = dict(zip(names, tensors))
        torch.manual_seed(4)
        return dora_linear(
            args["x"],
            weight,
            args["bias"],
            args["lora_A"],
            args["lora_B"],
            args["magnitude"],
            1.3,
            dropout_p,
            training=True,
            weight_norm=norm,
        )

    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, tuple(inputs[name] for name in names))


def nf4_and_int8_bases(weight):
    """[(lora_linear's weight argument, its dense fp32 value)] for an NF4 and an LLM.int8 copy of the fp32 weight
    (LLM.int8's product also quantizes x, so only the NF4 product equals the dense one's)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    nf4 = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    int8 = Linear8bitLt.from_linear(linear, threshold=0.0)
    return [
        ((nf4.weight, nf4.quant_state), nf4.dequantize().float()),
        ((int8.weight, int8.SCB, 0.0), int8.dequantize(torch.float32)),
    ]


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_quantized_bases_match_their_dequantized_weight(backend, dropout_p):
    inputs = make_inputs(torch.float32, out_features=96, in_features=64)
    (nf4, nf4_dense), (int8, _) = nf4_and_int8_bases(inputs["weight"])
    for quantized, oracle, oracle_backend in ((nf4, nf4_dense, "reference"), (int8, int8, "reference")):
        y, grads, _ = run(inputs, 1.2, dropout_p, backend, weight=quantized)
        y_oracle, grads_oracle, _ = run(inputs, 1.2, dropout_p, oracle_backend, weight=oracle)
        torch.testing.assert_close(y, y_oracle, rtol=1e-4, atol=1e-4)
        for got, want in zip(grads, grads_oracle):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_tiled_norm_equals_the_dense_formula(monkeypatch, dtype):
    monkeypatch.setattr(dora_ops, "NORM_TILE_BYTES", 3 * 4 * 48)  # 3-row tiles: a partial last tile
    inputs = make_inputs(dtype, out_features=40, in_features=48)
    adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lora_A, lora_B = inputs["lora_A"].detach().to(adapter_dtype), inputs["lora_B"].detach().to(adapter_dtype)
    weight = inputs["weight"]
    want = torch.linalg.vector_norm(weight.double() + 0.9 * (lora_B.double() @ lora_A.double()), dim=1)
    for quantized, dense in [(weight, weight)] + (nf4_and_int8_bases(weight.float()) if dtype != torch.float64 else []):
        want = torch.linalg.vector_norm(dense.double() + 0.9 * (lora_B.double() @ lora_A.double()), dim=1)
        for backend in ("reference", "native"):
            with use_backend(backend):
                got = dora_weight_norm(quantized, lora_A, lora_B, 0.9)
            assert got.dtype == adapter_dtype and not got.requires_grad
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_native_kernels_on_every_instruction_set(isa, dtype):
    generator = torch.Generator().manual_seed(0)
    c = torch.float64 if dtype == torch.float64 else torch.float32
    z, dy = (torch.randn(37, 83, generator=generator).to(dtype) for _ in range(2))
    scale, row = torch.rand(83, generator=generator).to(c), torch.randn(83, generator=generator).to(dtype)
    weight = torch.randn(83, 70, generator=generator).to(dtype)
    lora_A, lora_B = torch.randn(5, 70, generator=generator).to(c), torch.randn(83, 5, generator=generator).to(c)
    with cpu_isa(isa):
        got = {}
        for backend in ("native", "reference"):
            with use_backend(backend):
                got[backend] = (
                    torch.ops.pyfastpeft.dora_scale(z, scale, None),
                    torch.ops.pyfastpeft.dora_scale(z, scale, row),
                    torch.ops.pyfastpeft.dora_scale(z, scale, dy),
                    *torch.ops.pyfastpeft.dora_grad(dy, z, scale),
                    torch.ops.pyfastpeft.dora_norm(weight, lora_A, lora_B, 0.7),
                )
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for index, (native, reference) in enumerate(zip(got["native"], got["reference"])):
        if index < 4:  # elementwise: one rounding of the same fp32 value
            torch.testing.assert_close(native, reference, rtol=0, atol=0)
        else:
            torch.testing.assert_close(native, reference, **tol)


def _elementwise_passes(z, dy, scale, row, threads):
    torch.set_num_threads(threads)
    with use_backend("native"):
        return (
            torch.ops.pyfastpeft.dora_scale(z, scale, None),
            torch.ops.pyfastpeft.dora_scale(z, scale, row),
            torch.ops.pyfastpeft.dora_scale(z, scale, dy),
            *torch.ops.pyfastpeft.dora_grad(dy, z, scale),
        )


@pytest.mark.parametrize("bf16_stores", CPU_BF16)
@pytest.mark.parametrize(
    "dtype, shape",
    # 16 MiB of output and more go out by streaming stores (on AVX-512): 4096 columns keep each row's stores aligned,
    # 4100 misalign most of them; the small shape has a short tail in every row
    [
        (torch.bfloat16, (2048, 4096)),
        (torch.bfloat16, (2048, 4100)),
        (torch.float32, (1024, 4100)),
        (torch.float16, (33, 77)),
    ],
)
def test_elementwise_passes_are_the_same_bits_on_every_isa_and_thread_count(dtype, shape, bf16_stores):
    """dora_scale and dora_grad, column sums included, whatever the instruction set, the bf16 stores and the thread
    count: each column's sum runs in row order on one thread."""
    generator = torch.Generator().manual_seed(0)
    z, dy = (torch.randn(shape, generator=generator).to(dtype) for _ in range(2))
    scale, row = torch.rand(shape[1], generator=generator), torch.randn(shape[1], generator=generator).to(dtype)
    threads = torch.get_num_threads()
    try:
        with cpu_isa("scalar"):
            want = _elementwise_passes(z, dy, scale, row, 1)
        for isa in CPU_ISAS:
            with cpu_isa(isa), cpu_avx512_bf16(bf16_stores):
                for count in (1, 2):
                    for got, expected in zip(_elementwise_passes(z, dy, scale, row, count), want):
                        assert torch.equal(got, expected), (isa, count)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 83), (64, 256), (1, 5)])
def test_triton_passes_under_the_interpreter_equal_the_reference(dtype, shape):
    generator = torch.Generator().manual_seed(0)
    z, dy, full = (torch.randn(*shape, generator=generator).to(dtype) for _ in range(3))
    scale, row = torch.rand(shape[1], generator=generator), torch.randn(shape[1], generator=generator).to(dtype)
    results = {}
    for backend in ("triton", "reference"):
        with use_backend(backend):
            results[backend] = (
                *(torch.ops.pyfastpeft.dora_scale(z, scale, addend) for addend in (None, row, full)),
                *torch.ops.pyfastpeft.dora_grad(dy, z, scale),
            )
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_opcheck_every_dora_op():
    z = torch.randn(5, 7)
    scale = torch.rand(7)
    rng = torch.tensor([3, 11])
    samples = [
        (torch.ops.pyfastpeft.dora_scale, (z, scale, None)),
        (torch.ops.pyfastpeft.dora_scale, (z, scale, torch.randn(7))),
        (torch.ops.pyfastpeft.dora_scale, (z.bfloat16(), scale, torch.randn(5, 7).bfloat16())),
        (torch.ops.pyfastpeft.dora_grad, (torch.randn(5, 7), z, scale)),
        (torch.ops.pyfastpeft.dora_dropout, (z, rng, 0.3)),
        (torch.ops.pyfastpeft.dora_norm, (torch.randn(7, 6).bfloat16(), torch.randn(2, 6), torch.randn(7, 2), 0.5)),
    ]
    for op, args in samples:
        for backend in ("reference", "native"):
            with use_backend(backend):
                torch.library.opcheck(op, args)


def test_dora_linear_compiles_fullgraph():
    inputs = make_inputs(torch.float32, out_features=16, in_features=8, rows=(4,))
    norm = dora_weight_norm(inputs["weight"], inputs["lora_A"], inputs["lora_B"], 2.0)

    def fn(x):
        return dora_linear(
            x,
            inputs["weight"],
            inputs["bias"],
            inputs["lora_A"],
            inputs["lora_B"],
            inputs["magnitude"],
            2.0,
            weight_norm=norm,
        )

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = inputs["x"].detach()
    torch.testing.assert_close(compiled(x), fn(x))


# ---- against PEFT's layers and models ----------------------------------------------------------------------------


def peft_dora_layer(base, r=4, alpha=8, dropout=0.0, seed=0):
    from peft.tuners.lora import Linear as PeftLinear

    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True)
    layer = PeftLinear(base, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=generator))
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.mul_(torch.rand(magnitude.shape, generator=generator) + 0.5)
    return layer


def ours_from(layer, dropout=0.0):
    ours = LoRALinear(
        copy.deepcopy(layer.base_layer),
        r=layer.r["default"],
        lora_alpha=layer.lora_alpha["default"],
        lora_dropout=dropout,
        use_dora=True,
    )
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
        ours.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector["default"].weight)
    return ours


class SameMaskDropout(nn.Module):
    """PEFT's dropout module replaced by our mask for the (seed, offset) a seeded run draws, so both layers drop the
    same elements."""

    def __init__(self, p, rng):
        super().__init__()
        self.p, self.rng = p, rng

    def forward(self, x):
        return lora_ref.dropout(x.reshape(-1, x.shape[-1]), self.p, self.rng).view(x.shape)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_with_dora_equals_peft_layer(dropout, bias):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias).requires_grad_(False)
    theirs = peft_dora_layer(base, dropout=dropout)
    ours = ours_from(theirs, dropout)
    if dropout:
        theirs.lora_dropout["default"] = SameMaskDropout(dropout, drawn_rng())
    theirs.train(), ours.train()
    x = torch.randn(3, 5, 24, requires_grad=True)
    outputs = []
    for layer in (theirs, ours):
        torch.manual_seed(3)
        y = layer(x)
        params = [
            layer.lora_A["default"].weight,
            layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight,
        ]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum(), [x, *params])
        outputs.append((y, *grads))
    for got, want in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_layer_with_fp32_adapters_stays_close_to_peft():
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16).requires_grad_(False)
    theirs = peft_dora_layer(base)
    theirs.lora_A["default"].float(), theirs.lora_B["default"].float(), theirs.lora_magnitude_vector.float()
    ours = ours_from(theirs)
    assert ours.lora_magnitude_vector["default"].weight.dtype == torch.float32
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want = theirs(x).double()
        got = ours(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def gemma_tiny(seed=0):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    return GemmaForCausalLM(GemmaConfig(**TINY_DECODER, head_dim=16)).eval()


MODELS = {"llama": tiny_llama, "gemma": gemma_tiny}


def peft_dora_model(name, dropout=0.0, seed=0):
    model = peft.get_peft_model(
        MODELS[name](seed),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=dropout,
            use_dora=True,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj", "down_proj"],
        ),
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            if "lora_magnitude_vector" in parameter_name:
                parameter.mul_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model


def input_ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_from_peft_keeps_logits_gradients_and_trainable_parameters(name):
    theirs = peft_dora_model(name)
    ours = copy.deepcopy(theirs)
    model = pyfastpeft.from_peft(ours)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.use_dora["default"]
    results = []
    for peft_model in (theirs, ours):
        peft_model.train()
        out = peft_model(input_ids=input_ids(), labels=input_ids())
        out.loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        results.append((out.logits, grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert sorted(results[1][1]) == sorted(results[0][1])
    assert any("lora_magnitude_vector" in n for n in results[0][1])
    for key, want in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_adapters_round_trip_between_peft_and_pyfastpeft(name, tmp_path):
    theirs = peft_dora_model(name)
    with torch.no_grad():
        want = theirs(input_ids=input_ids()).logits
    theirs.save_pretrained(tmp_path / "peft")
    fresh = MODELS[name](0)
    loaded = pyfastpeft.load_adapter(fresh, tmp_path / "peft")
    assert len(loaded) == 6
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=input_ids()).logits, want, rtol=1e-5, atol=1e-5)
    pyfastpeft.save_adapter(fresh, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    back = peft.PeftModel.from_pretrained(MODELS[name](0), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=input_ids()).logits, want, rtol=1e-5, atol=1e-5)


def test_merge_equals_peft_merge_and_unmerge_restores_the_weight():
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True).requires_grad_(False)
    theirs = peft_dora_layer(base)
    ours = ours_from(theirs)
    original = ours.base_layer.weight.detach().clone()
    x = torch.randn(7, 24)
    with torch.no_grad():
        before = ours(x)
        ours.merge()
        theirs.merge()
        torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)
        ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, original, rtol=1e-5, atol=1e-6)
    assert not ours._merged_norms


def test_nf4_base_dora_over_linear4bit_equals_the_dense_dequantized_layer():
    torch.manual_seed(0)
    nf4 = Linear4bit.from_linear(nn.Linear(64, 48, bias=False), compute_dtype=torch.float32)
    dequantized = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        dequantized.weight.copy_(nf4.dequantize().float())
    ours = LoRALinear(nf4, r=4, use_dora=True)
    reference = LoRALinear(dequantized, r=4, use_dora=True)
    with torch.no_grad():
        nn.init.normal_(ours.lora_B["default"].weight, std=0.1)
        reference.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        reference.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    torch.testing.assert_close(
        ours.lora_magnitude_vector["default"].weight,
        reference.lora_magnitude_vector["default"].weight,
        rtol=1e-6,
        atol=1e-6,
    )
    x = torch.randn(5, 64, requires_grad=True)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_nf4", [False, True])
def test_a_dora_training_run_lowers_the_loss(use_nf4):
    model = tiny_llama()
    settings = pyfastpeft.LoraSettings(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.1)
    report = pyfastpeft.prepare_model(model, quant="nf4" if use_nf4 else None, lora=settings)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in name for name in trainable), report
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = train_steps(model, ids, 12, lr=1e-2)
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0] - 0.1, losses


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_bad_arguments_name_themselves():
    inputs = make_inputs(torch.float32)
    args = [inputs[n] for n in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")]
    with pytest.raises(ValueError, match="magnitude has 39 elements, out_features is 40"):
        dora_linear(*args[:5], inputs["magnitude"][:39], 1.0)
    with pytest.raises(ValueError, match="weight_norm has 3 elements"):
        dora_linear(*args, 1.0, weight_norm=torch.ones(3))
    with pytest.raises(TypeError, match="magnitude"):
        dora_linear(*args[:5], "m", 1.0)
    with pytest.raises(ValueError, match="requires grad"):
        dora_linear(args[0], args[1].clone().requires_grad_(), *args[2:], 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        dora_linear(*args, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match="lora_B is .*expected \\[40, 4\\]"):
        dora_weight_norm(inputs["weight"], inputs["lora_A"], inputs["lora_B"][:20], 1.0)
    z = torch.randn(4, 6)
    with pytest.raises(ValueError, match="scale has shape"):
        torch.ops.pyfastpeft.dora_scale(z, torch.ones(5), None)
    with pytest.raises(TypeError, match="scale"):
        torch.ops.pyfastpeft.dora_scale(z, torch.ones(6, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="addend has shape"):
        torch.ops.pyfastpeft.dora_scale(z, torch.ones(6), torch.ones(4))
    with pytest.raises(ValueError, match="dy has shape"):
        torch.ops.pyfastpeft.dora_grad(torch.ones(3, 6), z, torch.ones(6))
    with pytest.raises(ValueError, match="rng must be"):
        torch.ops.pyfastpeft.dora_dropout(z, torch.ones(3, dtype=torch.int64), 0.1)


def test_corrupt_quantized_bases_never_reach_the_norm_kernel():
    """What a corrupt checkpoint hands the norm ops: short absmax or statistics, a wrong code table, a packed weight
    too small for the shape. Each is an exception naming the argument, on every backend."""
    from pyfastpeft.quant import quantize_nf4

    weight = torch.randn(40, 48)
    lora_A, lora_B = torch.randn(4, 48), torch.randn(40, 4)
    packed, state = quantize_nf4(weight, blocksize=64)
    absmax, code = state.dequantized_absmax(), state.code.float()
    codes = torch.randint(-127, 128, (40, 48), dtype=torch.int8)
    stats = torch.rand(40) + 0.1
    nf4_op, int8_op = torch.ops.pyfastpeft.dora_norm_nf4, torch.ops.pyfastpeft.dora_norm_int8
    for backend in ("native", "reference"):
        with use_backend(backend):
            with pytest.raises(ValueError, match="absmax"):
                nf4_op(packed, absmax[:-1], code, lora_A, lora_B, 64, 40, 48, 1.0)
            with pytest.raises(ValueError, match="code"):
                nf4_op(packed, absmax, code[:8], lora_A, lora_B, 64, 40, 48, 1.0)
            with pytest.raises(ValueError, match="packed"):
                nf4_op(packed[:-4], absmax, code, lora_A, lora_B, 64, 40, 48, 1.0)
            with pytest.raises(ValueError, match="lora_B"):
                nf4_op(packed, absmax, code, lora_A, lora_B[:, :3], 64, 40, 48, 1.0)
            with pytest.raises(ValueError, match="weight_stats"):
                int8_op(codes, stats[:-1], lora_A, lora_B, 0.0, 1.0)
            with pytest.raises(ValueError, match="lora_A"):
                int8_op(codes, stats, lora_A[:, :47], lora_B, 0.0, 1.0)


def saved_dora_adapter(path):
    model = peft_dora_model("llama")
    model.save_pretrained(path)
    return path / "adapter_model.safetensors"


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (
            lambda state: state.update({next(k for k in state if "magnitude" in k): torch.ones(5)}),
            ValueError,
            "is \\(5,\\), the layer has 64 output features",
        ),
        (lambda state: state.pop(next(k for k in state if "magnitude" in k)), ValueError, "lack lora_magnitude_vector"),
        (
            lambda state: state.update({next(k for k in state if "magnitude" in k): torch.ones(2, 64)}),
            ValueError,
            "a DoRA magnitude or B.s bias is 1-D",
        ),
        (
            lambda state: state.update({next(k for k in state if "magnitude" in k): torch.full((64,), float("nan"))}),
            ValueError,
            "non-finite",
        ),
    ],
)
def test_a_bad_dora_adapter_file_is_refused_before_the_model_changes(tmp_path, edit, error, message):
    from safetensors.torch import load_file, save_file

    weights = saved_dora_adapter(tmp_path)
    state = load_file(weights)
    edit(state)
    save_file(state, weights)
    model = tiny_llama()
    with pytest.raises(error, match=message):
        pyfastpeft.load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_magnitudes_without_use_dora_are_refused(tmp_path):
    saved_dora_adapter(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": False}))
    with pytest.raises(ValueError, match="does not set use_dora"):
        pyfastpeft.load_adapter(tiny_llama(), tmp_path)


def test_a_converted_dora_model_under_bf16_autocast_keeps_peft_loss_and_gradients():
    """What Trainer(bf16=True) runs: the forward under torch.autocast(bf16); the loss equals PEFT's to bf16
    rounding and the adapters' gradients agree to a few bf16 ulps of their largest element."""
    theirs = peft_dora_model("llama")
    ours = copy.deepcopy(theirs)
    pyfastpeft.from_peft(ours)
    results = []
    for peft_model in (theirs, ours):
        peft_model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = peft_model(input_ids=input_ids(), labels=input_ids())
        out.loss.backward()
        results.append((out.loss.item(), {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}))
    (loss, grads), (want_loss, want_grads) = results[1], results[0]
    assert abs(loss - want_loss) <= 1e-3 * abs(want_loss)
    assert sorted(grads) == sorted(want_grads)
    for name, want in want_grads.items():
        scale = want.abs().max().item() + 1e-12
        torch.testing.assert_close(grads[name] / scale, want / scale, rtol=0, atol=5e-2)
