"""Multi-adapter LoRA batches (lora_linear_multi): against a per-row loop of lora_linear on every backend and
base, the row-indexed dropout kernel against the reference mask, dropout identities with lora_linear, gradcheck,
opcheck and bad input."""

import math

import pytest
import torch
from helpers import BACKENDS, CPU_ISAS, TOLERANCES, cpu_isa

import pyfastpeft
from pyfastpeft.functional import lora_linear, lora_linear_multi
from pyfastpeft.ops import lora_multi as lora_multi_ops
from pyfastpeft.quant import quantize_int8_weight, quantize_nf4
from pyfastpeft.reference import lora as ref

MULTI_BACKENDS = ["reference"] + BACKENDS
RANKS = (1, 8, 16)
IN_FEATURES, OUT_FEATURES = 37, 21


def make_base(base, dtype, out_features=OUT_FEATURES, in_features=IN_FEATURES):
    dense = torch.randn(out_features, in_features) / math.sqrt(in_features)
    return {
        "dense": lambda: dense.to(dtype),
        "nf4": lambda: quantize_nf4(dense.to(dtype), blocksize=64),
        "int8": lambda: quantize_int8_weight(dense),
    }[base]()


def make_adapters(dtype, ranks=RANKS, out_features=OUT_FEATURES, in_features=IN_FEATURES):
    """(lora_A, lora_B, scaling) per rank, leaves requiring grad; scalings exact in fp32."""
    adapters = []
    for index, rank in enumerate(ranks):
        lora_A = (torch.randn(rank, in_features) / math.sqrt(in_features)).to(dtype).requires_grad_()
        lora_B = (torch.randn(out_features, rank) / math.sqrt(rank)).to(dtype).requires_grad_()
        adapters.append((lora_A, lora_B, 0.5 * (index + 1)))
    return adapters


def leaves_of(x, bias, adapters):
    """x, bias (when given) and every adapter's A, B."""
    return [x] + ([] if bias is None else [bias]) + [t for lora_A, lora_B, _ in adapters for t in (lora_A, lora_B)]


def run_multi(backend, x, weight, bias, adapters, adapter_ids, dropout_p=0.0, seed=1):
    """(y, grads of x, bias, A_0, B_0, A_1, ...) of one forward and backward with the generator seeded."""
    leaves = leaves_of(x, bias, adapters)
    for leaf in leaves:
        leaf.grad = None
    torch.manual_seed(seed)
    with pyfastpeft.use_backend(backend):
        y = lora_linear_multi(x, weight, bias, adapters, adapter_ids, dropout_p, training=True)
        y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape).to(y.dtype))
    return [y.detach()] + [leaf.grad for leaf in leaves]


def per_row_loop(x, weight, bias, adapters, row_ids):
    """The obvious oracle, in fp32 on fp32 copies of the inputs (so the grads summed over rows by autograd stay
    accurate): lora_linear (reference backend) on each row alone with its adapter, base-only rows with scaling 0.
    Returns what run_multi does, in fp32."""
    x = x.detach().float().requires_grad_()
    weight = weight.float() if isinstance(weight, torch.Tensor) else weight
    bias = bias.detach().float().requires_grad_()
    adapters = [(a.detach().float().requires_grad_(), b.detach().float().requires_grad_(), s) for a, b, s in adapters]
    x2d = x.reshape(-1, x.shape[-1])
    dy = torch.linspace(-1, 1, x2d.shape[0] * OUT_FEATURES).view(x2d.shape[0], OUT_FEATURES)
    rows = []
    with pyfastpeft.use_backend("reference"):
        for row, adapter in enumerate(row_ids.tolist()):
            lora_A, lora_B, scaling = adapters[max(adapter, 0)]
            y_row = lora_linear(x2d[row : row + 1], weight, bias, lora_A, lora_B, scaling if adapter >= 0 else 0.0)
            y_row.backward(dy[row : row + 1])
            rows.append(y_row.detach())
    return [torch.cat(rows).view(*x.shape[:-1], OUT_FEATURES)] + [leaf.grad for leaf in leaves_of(x, bias, adapters)]


def assert_all_close(actual, expected, dtype, looseness=1):
    assert len(actual) == len(expected)
    tolerance = {name: looseness * value for name, value in TOLERANCES[dtype].items()}
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want.to(got.dtype), **tolerance)


def mixed_ids(per, batch=4, seq=5):
    """Every adapter and -1 present; per sequence [batch] or per token [batch, seq]."""
    if per == "sequence":
        return torch.tensor([2, -1, 0, 1])
    ids = torch.arange(batch * seq).remainder(len(RANKS) + 1).sub(1).view(batch, seq)
    return ids[:, torch.randperm(seq)]


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
@pytest.mark.parametrize("base", ["dense", "nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per", ["sequence", "token"])
def test_matches_per_row_loop_of_lora_linear(backend, base, dtype, per):
    x = torch.randn(4, 5, IN_FEATURES).to(dtype).requires_grad_()
    weight, adapters = make_base(base, dtype), make_adapters(dtype)
    bias = torch.randn(OUT_FEATURES).to(dtype).requires_grad_()
    adapter_ids = mixed_ids(per)
    row_ids = adapter_ids[:, None].expand(4, 5).reshape(-1) if per == "sequence" else adapter_ids.reshape(-1)
    expected = per_row_loop(x, weight, bias, adapters, row_ids)
    looseness = 1 if dtype == torch.float32 else 2  # the fp32 oracle rounds once; ours (and PEFT) per product
    assert_all_close(run_multi(backend, x, weight, bias, adapters, adapter_ids), expected, dtype, looseness)


def test_adapter_without_rows_gets_zero_grads_and_base_only_rows_get_no_adapter():
    x = torch.randn(4, IN_FEATURES, requires_grad=True)
    weight, adapters = make_base("dense", torch.float32), make_adapters(torch.float32)
    y, dx, *adapter_grads = run_multi("native", x, weight, None, adapters, torch.tensor([-1, 0, 0, -1]))
    assert adapter_grads[0].abs().sum() > 0
    for grad in adapter_grads[2:]:
        assert torch.equal(grad, torch.zeros_like(grad))
    torch.testing.assert_close(y[[0, 3]], x.detach()[[0, 3]] @ weight.t())


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
@pytest.mark.parametrize("base", ["dense", "nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per", ["sequence", "token"])
def test_one_adapter_for_every_row_is_lora_linear_with_the_same_seed(backend, base, dtype, per):
    """Same seed, same mask, same results: the dropout element index is the row's position in x."""
    x = torch.randn(2, 6, IN_FEATURES).to(dtype).requires_grad_()
    weight, adapters = make_base(base, dtype), make_adapters(dtype, ranks=(8,))
    bias = torch.randn(OUT_FEATURES).to(dtype).requires_grad_()
    adapter_ids = torch.zeros(2, dtype=torch.int64) if per == "sequence" else torch.zeros(2, 6, dtype=torch.int64)
    multi = run_multi(backend, x, weight, bias, adapters, adapter_ids, dropout_p=0.3)
    lora_A, lora_B, scaling = adapters[0]
    for leaf in (x, bias, lora_A, lora_B):
        leaf.grad = None
    torch.manual_seed(1)
    with pyfastpeft.use_backend(backend):
        y = lora_linear(x, weight, bias, lora_A, lora_B, scaling, 0.3, True)
        y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape).to(y.dtype))
    single = [y.detach(), x.grad, bias.grad, lora_A.grad, lora_B.grad]
    assert_all_close(multi, single, dtype)
    if backend == "triton":  # lora_linear runs its fused Triton kernel, lora_linear_multi the native path
        return
    # natively, y and the gradients that do not see the mask are the same bits; lora_linear's dX and dA come from one
    # fused pass that rounds dY B A once where the multi-adapter path rounds it to the dtype first
    for name, got, want in zip(("y", "dx", "dbias", "dA", "dB"), multi, single):
        assert name in ("dx", "dA") or torch.equal(got, want), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_dropout_keeps_each_rows_mask_and_matches_reference(backend, dtype):
    """Rows of adapter i equal lora_linear over the whole x with adapter i (same seed): each row's mask is that
    of its position in x; and every grad equals the reference backend's."""
    x = torch.randn(4, 6, IN_FEATURES).to(dtype).requires_grad_()
    weight, adapters = make_base("dense", dtype), make_adapters(dtype)
    bias = torch.randn(OUT_FEATURES).to(dtype).requires_grad_()
    adapter_ids = torch.tensor([[0, 1, 2, -1, 2, 0], [1, 1, 0, 2, -1, 0], [2, 2, 2, 2, 1, 1], [-1, 0, 1, 2, 0, 0]])
    multi = run_multi(backend, x, weight, bias, adapters, adapter_ids, dropout_p=0.4)
    assert_all_close(multi, run_multi("reference", x, weight, bias, adapters, adapter_ids, dropout_p=0.4), dtype)
    for adapter, (lora_A, lora_B, scaling) in enumerate(adapters):
        torch.manual_seed(1)
        with torch.no_grad(), pyfastpeft.use_backend("reference"):
            single = lora_linear(x, weight, bias, lora_A, lora_B, scaling, 0.4, True)
        rows = adapter_ids == adapter
        torch.testing.assert_close(multi[0][rows], single[rows], **TOLERANCES[dtype])


def test_dropout_draws_only_when_training_with_positive_p():
    x = torch.randn(5, IN_FEATURES)
    weight, adapters = make_base("dense", torch.float32), make_adapters(torch.float32)
    ids = torch.tensor([0, 1, 2, -1, 0])
    for dropout_p, training in ((0.0, True), (0.5, False)):
        state = torch.get_rng_state()
        lora_linear_multi(x, weight, None, adapters, ids, dropout_p, training)
        assert torch.equal(torch.get_rng_state(), state)


# ---- the row-indexed dropout kernel --------------------------------------------------------------------


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_native_dropout_rows_gather_and_scatter_use_original_positions(isa, dtype):
    rng, dropout_p = torch.tensor([2**40 + 7, 2**32 - 3000]), 0.3
    x = torch.randn(9, 1100).to(dtype)  # rows longer than the kernel's 1024-element chunks
    rows = torch.tensor([7, 2, 5, 0])
    x_dropped = ref.dropout(x, dropout_p, rng)
    gathered = torch.empty(4, 1100, dtype=dtype)
    with cpu_isa(isa):
        lora_multi_ops._dropout_rows(x, gathered, rows, rng, dropout_p, scatter=False)
    assert torch.equal(gathered, x_dropped[rows])
    g, base = torch.randn(4, 1100, dtype=torch.float64), torch.randn(9, 1100, dtype=torch.float64)
    scattered = base.clone()
    with cpu_isa(isa):
        lora_multi_ops._dropout_rows(g, scattered, rows, rng, dropout_p, scatter=True, alpha=0.5, accumulate=True)
    full = torch.zeros_like(base)
    full[rows] = g
    expected = base + 0.5 * ref.dropout(full, dropout_p, rng)
    torch.testing.assert_close(scattered, expected, rtol=1e-15, atol=1e-15)


# ---- gradcheck, opcheck, empty and bad input ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("base", ["dense", "nf4", "int8"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_gradcheck_float64(backend, base, dropout_p):
    """fp64 through the reference and the native path (C++ scalar dropout); reseeded per evaluation."""
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    weight = make_base(base, torch.float64, 7, 9)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    adapters = make_adapters(torch.float64, (1, 3), 7, 9)
    ids = torch.tensor([[1, -1, 0], [0, 1, 1]])

    def fn(x, bias, *adapter_tensors):
        torch.manual_seed(0)
        packed = [(adapter_tensors[2 * i], adapter_tensors[2 * i + 1], adapters[i][2]) for i in range(2)]
        return lora_linear_multi(x, weight, bias, packed, ids, dropout_p, True)

    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, bias, *[t for a in adapters for t in a[:2]]))


def op_samples(base):
    x = torch.randn(2, 3, 40)
    lora_A, lora_B = torch.randn(9, 40), torch.randn(24, 9)  # ranks 1 and 8
    rank_offsets, scalings = torch.tensor([0, 1, 9]), torch.tensor([0.5, 2.0])
    row_adapter = torch.tensor([1, -1, 0, 1, 1, 0])
    rng, no_rng = torch.tensor([9, 10]), None
    weight = torch.randn(24, 40)
    packed, state = quantize_nf4(weight)
    base_args = {
        "dense": (weight,),
        "nf4": (packed, state.dequantized_absmax(), state.code),
        "int8": quantize_int8_weight(weight),
    }[base]
    base_scalars = {"dense": (), "nf4": (64, 24, 40), "int8": (6.0,)}[base]
    row_order, segment_offsets = ref.adapter_groups(row_adapter, 2)
    xa, dy = torch.randn(6, 8), torch.randn(2, 3, 24)
    for bias, r in ((torch.randn(24), rng), (None, no_rng)):
        yield (
            "forward",
            (x, *base_args, bias, lora_A, lora_B, rank_offsets, scalings, row_adapter, *base_scalars, 8, 0.2, r),
        )
        for needs_dx in (True, False):
            yield (
                "backward",
                (
                    dy,
                    x,
                    *base_args,
                    lora_A,
                    lora_B,
                    rank_offsets,
                    scalings,
                    xa,
                    row_order,
                    segment_offsets,
                    *base_scalars,
                    0.2,
                    r,
                    needs_dx,
                ),
            )


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("base", ["dense", "nf4", "int8"])
def test_opcheck(backend, base):
    forward_op, backward_op = lora_multi_ops.MULTI_BASE_OPS[base]
    with pyfastpeft.use_backend(backend):
        for which, args in op_samples(base):
            torch.library.opcheck(forward_op if which == "forward" else backward_op, args)


def test_native_groups_rows_as_the_reference_does():
    row_adapter = torch.tensor([2, -1, 0, 2, 1, -1, 0, 0, 2])
    native = lora_multi_ops._native_adapter_groups(row_adapter, 4)
    for got, want in zip(native, ref.adapter_groups(row_adapter, 4)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
def test_empty_rows_give_empty_results(backend):
    x = torch.randn(0, 4, IN_FEATURES, requires_grad=True)
    weight, adapters = make_base("dense", torch.float32), make_adapters(torch.float32)
    y, dx, *adapter_grads = run_multi(backend, x, weight, None, adapters, torch.empty(0, dtype=torch.int64), 0.2)
    assert y.shape == (0, 4, OUT_FEATURES) and dx.shape == x.shape
    for grad, leaf in zip(adapter_grads, [t for adapter in adapters for t in adapter[:2]], strict=True):
        assert torch.equal(grad, torch.zeros_like(leaf))


def bad_call(**change):
    args = dict(
        x=torch.randn(2, 5, 33),
        weight=torch.randn(17, 33),
        bias=None,
        adapters=[(torch.randn(4, 33), torch.randn(17, 4), 2.0), (torch.randn(8, 33), torch.randn(17, 8), 1.0)],
        adapter_ids=torch.tensor([0, 1]),
        dropout_p=0.1,
        training=True,
    )
    args.update(change)
    return lora_linear_multi(**args)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(adapter_ids=torch.tensor([0, 2])), ValueError, r"adapter_ids must lie in \[-1, 2\)"),
        (dict(adapter_ids=torch.tensor([-2, 0])), ValueError, "adapter_ids"),
        (dict(adapter_ids=torch.tensor([0, 1, 1])), ValueError, r"adapter_ids has shape \(3,\)"),
        (dict(adapter_ids=torch.zeros(5, 2, dtype=torch.int64)), ValueError, "adapter_ids has shape"),
        (dict(adapter_ids=torch.tensor([0, 1], dtype=torch.int32)), TypeError, "adapter_ids must have dtype int64"),
        (dict(adapter_ids=[0, 1]), TypeError, "adapter_ids must be a torch.Tensor"),
        (dict(adapters=[]), ValueError, "adapters must hold at least one"),
        (
            dict(adapters=[(torch.randn(4, 33), torch.randn(17, 3), 2.0)], adapter_ids=torch.tensor([0, 0])),
            ValueError,
            r"adapters\[0\]'s lora_B .* rank",
        ),
        (
            dict(
                adapters=[(torch.randn(4, 33), torch.randn(17, 4), 2.0), (torch.randn(4, 32), torch.randn(17, 4), 1.0)]
            ),
            ValueError,
            r"adapters\[1\]'s lora_A",
        ),
        (
            dict(adapters=[(torch.randn(4, 33), torch.randn(16, 4), 2.0)], adapter_ids=torch.tensor([0, 0])),
            ValueError,
            "out_features",
        ),
        (dict(adapters=[(torch.randn(4, 33), torch.randn(17, 4))]), TypeError, r"adapters\[0\] must be"),
        (
            dict(adapters=[(torch.randn(4, 33), torch.randn(17, 4), "2")], adapter_ids=torch.tensor([0, 0])),
            TypeError,
            r"adapters\[0\]'s scaling",
        ),
        (
            dict(adapters=[(torch.randn(4, 33).double(), torch.randn(17, 4), 2.0)], adapter_ids=torch.tensor([0, 0])),
            TypeError,
            r"adapters\[0\]'s lora_A",
        ),
        (dict(adapters=(torch.randn(4, 33), torch.randn(17, 4), 2.0)), TypeError, r"adapters\[0\] must be"),
        (dict(adapters={"a": 1}), TypeError, "adapters must be a list or tuple"),
        (dict(x=torch.randn(2, 5, 32)), ValueError, "in_features"),
        (dict(bias=torch.randn(16)), ValueError, "bias"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(training=1), TypeError, "training"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, error, message):
    with pytest.raises(error, match=message):
        bad_call(**change)


def test_per_token_ids_for_a_2d_x_and_per_sequence_ids_for_4d_x():
    weight, adapters = make_base("dense", torch.float32), make_adapters(torch.float32, (4, 8))
    x2d = torch.randn(6, IN_FEATURES)
    y = lora_linear_multi(x2d, weight, None, adapters, torch.tensor([1, 0, -1, 1, 0, 0]))
    assert y.shape == (6, OUT_FEATURES)
    x4d = torch.randn(2, 3, 2, IN_FEATURES)
    y4 = lora_linear_multi(x4d, weight, None, adapters, torch.tensor([1, -1]))
    expected = lora_linear_multi(x4d, weight, None, adapters, torch.tensor([1, -1])[:, None, None].expand(2, 3, 2))
    assert torch.equal(y4, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_native(dtype):
    """On CUDA tensors the ops run the reference loop (no segmented GPU kernel): the CPU native path's results
    (no dropout: CUDA draws its (seed, offset) from its own generator)."""
    x = torch.randn(4, 5, IN_FEATURES).to(dtype).requires_grad_()
    weight, adapters = make_base("dense", dtype), make_adapters(dtype)
    bias = torch.randn(OUT_FEATURES).to(dtype).requires_grad_()
    adapter_ids = mixed_ids("token")
    expected = run_multi("native", x, weight, bias, adapters, adapter_ids)
    on_gpu = [t.detach().cuda().requires_grad_() for t in leaves_of(x, bias, adapters)]
    cuda_adapters = [(on_gpu[2 + 2 * i], on_gpu[3 + 2 * i], adapters[i][2]) for i in range(len(adapters))]
    actual = run_multi("auto", on_gpu[0], weight.cuda(), on_gpu[1], cuda_adapters, adapter_ids.cuda())
    assert_all_close([t.cpu() for t in actual], expected, dtype)
