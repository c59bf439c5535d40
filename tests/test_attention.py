"""Scaled dot-product attention (pyfastpeft/ops/attention.py): the native kernel against the reference over shapes
(grouped-query heads, odd lengths, Sq != Sk under the causal mask), dtypes and layouts (HF's transposed views),
forward (out, lse) and backward; every CPU ISA; output layouts; fp64 gradcheck; opcheck; torch.compile; torch's
own SDPA; autocast; empty inputs; NaN; bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_BF16, CPU_ISAS, DTYPES, cpu_avx512_bf16, cpu_isa

import pyfastpeft
from pyfastpeft.functional import scaled_dot_product_attention
from pyfastpeft.ops.attention import AttentionFunction
from pyfastpeft.reference import attention as ref

NATIVE = "native"

# out, dq, dk and dv are sums over keys or queries (lse a log of one): the error bound is relative to the largest
# magnitude of the tensor, the dtype's rounding of the output and of the kernel's intermediates included, and to 1 at
# least: the inputs are of magnitude 1, and a gradient can cancel to 0 (dS = P (dP - delta) is 0 for a query that sees
# one key), leaving only the rounding of terms of that magnitude.
SCALED_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

GRID = [  # batch, heads, kv_heads, q_len, kv_len, head_dim
    (1, 4, 1, 7, 7, 8),
    (2, 4, 2, 65, 65, 64),
    (1, 3, 3, 1, 130, 80),  # one query
    (1, 4, 2, 130, 7, 24),  # more queries than keys
    (2, 3, 3, 7, 65, 128),
    (1, 4, 1, 65, 130, 128),
]


def assert_close_scaled(actual, expected, dtype):
    """max |actual - expected| <= tolerance(dtype) * max(max |expected|, 1), with NaN exactly where expected has it."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isnan(), expected.isnan())
    seen = ~expected.isnan()
    if seen.any():
        error = (actual - expected)[seen].abs().max().item()
        magnitude = expected[seen].abs().max().item()
        assert error <= SCALED_TOLERANCE[dtype] * max(magnitude, 1.0), (error, magnitude)


def make_inputs(case, dtype, layout="contiguous"):
    """q, k, v and an output gradient, in dtype; layout "hf": each a transposed view of [B, S, H, D], as HF's
    attention hands q, k and v over (and as SDPA's backward hands dout)."""
    batch, heads, kv_heads, q_len, kv_len, head_dim = case

    def make(heads, seq):
        if layout == "hf":
            return torch.randn(batch, seq, heads, head_dim).to(dtype).transpose(1, 2)
        return torch.randn(batch, heads, seq, head_dim).to(dtype)

    return make(heads, q_len), make(kv_heads, kv_len), make(kv_heads, kv_len), make(heads, q_len)


def expected_results(q, k, v, dout, scale, causal):
    """(out, lse, dq, dk, dv) of the reference in the compute dtype (fp32, fp64 for fp64) on the same inputs."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    out, lse = ref.attention_forward(q, k, v, scale, causal)
    return (out, lse, *ref.attention_backward(dout, q, k, v, out, lse, scale, causal))


def results_on(backend, q, k, v, dout, scale, causal):
    """(out, lse) of the forward op and (dq, dk, dv) through AttentionFunction's backward, on backend."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with pyfastpeft.use_backend(backend):
        out, lse = torch.ops.pyfastpeft.attention_forward(q, k, v, scale, causal)
        y = AttentionFunction.apply(*leaves, scale, causal)
        y.backward(dout)
    assert torch.equal(y.detach(), out)
    return (out, lse, *(t.grad for t in leaves))


def assert_matches_reference(ours, q, k, v, dout, scale, causal):
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    assert [t.dtype for t in ours] == [q.dtype, compute, q.dtype, k.dtype, v.dtype]
    for got, want in zip(ours, expected_results(q, k, v, dout, scale, causal)):
        assert_close_scaled(got, want, q.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", GRID)
def test_attention_forward_and_backward_match_reference(dtype, causal, case):
    q, k, v, dout = make_inputs(case, dtype)
    scale = case[-1] ** -0.5
    ours = results_on("native", q, k, v, dout, scale, causal)
    assert_matches_reference(ours, q, k, v, dout, scale, causal)


@pytest.mark.parametrize("backend", ["reference", NATIVE])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", [(2, 4, 2, 9, 9, 16), (1, 6, 2, 5, 12, 40), (1, 2, 1, 12, 5, 24)])
def test_attention_matches_torch_sdpa(backend, causal, case):
    q, k, v, dout = make_inputs(case, torch.float32, layout="hf")
    for scale in (None, 0.3):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with pyfastpeft.use_backend(backend):
            out = scaled_dot_product_attention(*leaves, is_causal=causal, scale=scale)
            grads = torch.autograd.grad(out, leaves, dout)
        theirs = F.scaled_dot_product_attention(*leaves, is_causal=causal, scale=scale, enable_gqa=True)
        for got, want in zip((out, *grads), (theirs, *torch.autograd.grad(theirs, leaves, dout))):
            assert_close_scaled(got, want, torch.float32)


def ops_on(backend, q, k, v, dout, scale, causal):
    """(out, lse, dq, dk, dv) of the two ops called directly (autograd's AccumulateGrad would relayout a .grad)."""
    with pyfastpeft.use_backend(backend):
        out, lse = torch.ops.pyfastpeft.attention_forward(q, k, v, scale, causal)
        return (out, lse, *torch.ops.pyfastpeft.attention_backward(dout, q, k, v, out, lse, scale, causal))


@pytest.mark.parametrize("backend", ["reference", NATIVE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_takes_hf_views_and_writes_their_layout(backend, dtype, causal):
    """q, k, v and dout as transposed views of [B, S, H, D]: out and dq leave in q's layout, dk and dv in k's and
    v's, so HF's later out.transpose(1, 2).contiguous() and the projections' backward copy nothing."""
    q, k, v, dout = make_inputs((2, 4, 2, 13, 21, 32), dtype, layout="hf")
    out, lse, dq, dk, dv = ops = ops_on(backend, q, k, v, dout, 32**-0.5, causal)
    assert out.stride() == q.stride() and dq.stride() == q.stride()
    assert dk.stride() == k.stride() and dv.stride() == v.stride()
    assert lse.is_contiguous() and out.transpose(1, 2).is_contiguous()
    assert_matches_reference(ops, q, k, v, dout, 32**-0.5, causal)
    assert_matches_reference(results_on(backend, q, k, v, dout, 32**-0.5, causal), q, k, v, dout, 32**-0.5, causal)


@pytest.mark.parametrize("backend", ["reference", NATIVE])
def test_attention_outputs_of_inputs_without_a_dense_layout_are_contiguous(backend):
    """A last dim that is not contiguous (read through a copy), k broadcast over heads (stride 0), v's rows with gaps
    after them (both read in place): the outputs like them are contiguous."""
    q = torch.randn(1, 4, 16, 6).transpose(2, 3)  # head_dim stride 6
    k = torch.randn(1, 1, 6, 16).expand(1, 2, 6, 16)  # two kv heads, one storage
    v = torch.randn(1, 2, 6, 32)[..., :16]
    dout = torch.randn(1, 4, 6, 16)
    ops = ops_on(backend, q, k, v, dout, 0.25, True)
    for t in ops:
        assert t.is_contiguous()
    assert_matches_reference(ops, q, k, v, dout, 0.25, True)


@pytest.mark.parametrize("backend", ["reference", NATIVE])
def test_attention_reads_only_its_views(backend):
    """Inputs as views into storages whose other elements are NaN: no NaN reaches the results, no input changes."""
    batch, heads, kv_heads, seq, dim = 2, 4, 2, 11, 24
    q_storage = torch.full((batch, heads, seq, dim + 5), float("nan"))
    kv_storage = torch.full((batch, seq, 2 * kv_heads + 1, dim), float("nan"))  # a fused kv projection, one more head
    dout_storage = torch.full((batch, seq, heads, 2 * dim), float("nan"))
    q = q_storage[..., 2 : dim + 2]  # rows with gaps around them
    k, v = kv_storage[:, :, 1 : kv_heads + 1].transpose(1, 2), kv_storage[:, :, kv_heads + 1 :].transpose(1, 2)
    dout = dout_storage[..., ::2].transpose(1, 2)  # every other element
    for t in (q, k, v, dout):
        t.copy_(torch.randn(t.shape))
    storages = (q_storage, kv_storage, dout_storage)
    before = [t.clone() for t in storages]
    ops = ops_on(backend, q, k, v, dout, dim**-0.5, True)
    for results in (ops, results_on(backend, q, k, v, dout, dim**-0.5, True)):
        for t in results:
            assert not t.isnan().any()
        assert_matches_reference(results, q, k, v, dout, dim**-0.5, True)
    for t, saved in zip(storages, before):
        assert torch.equal(t.isnan(), saved.isnan()) and torch.equal(t.nan_to_num(), saved.nan_to_num())


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_attention_every_cpu_isa_agrees(isa, dtype):
    for case, causal in (((2, 4, 2, 33, 33, 80), True), ((1, 3, 1, 19, 70, 24), False), ((1, 2, 2, 70, 9, 64), True)):
        q, k, v, dout = make_inputs(case, dtype)
        with cpu_isa(isa):
            ours = results_on("native", q, k, v, dout, case[-1] ** -0.5, causal)
        assert_matches_reference(ours, q, k, v, dout, case[-1] ** -0.5, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_bits_do_not_depend_on_the_thread_count(dtype):
    """Each query block (forward) and query head (backward) is one thread's, and dk, dv sum their group's heads in
    head order: 1, 3 and 8 threads give the same bits, also with more threads than heads."""
    inputs = [make_inputs(case, dtype) for case in ((1, 2, 1, 130, 130, 24), (2, 8, 2, 70, 70, 64))]
    previous = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 3, 8):
            torch.set_num_threads(threads)
            results[threads] = [results_on("native", *tensors, 0.125, True) for tensors in inputs]
    finally:
        torch.set_num_threads(previous)
    for threads in (3, 8):
        for ours, first in zip(results[threads], results[1]):
            assert all(torch.equal(got, want) for got, want in zip(ours, first)), threads


@pytest.mark.parametrize("pairs", CPU_BF16)
def test_attention_bf16_products_with_and_without_avx512_bf16_pairs(pairs):
    """bf16 q k^T and dout v^T go by vdpbf16ps where the CPU has it (head dims odd and even, partial key blocks),
    and by fp32 FMAs otherwise: both within the bf16 tolerance of the reference."""
    for case, causal in (((1, 4, 2, 70, 70, 33), True), ((2, 2, 1, 9, 130, 64), False), ((1, 2, 2, 65, 65, 7), True)):
        q, k, v, dout = make_inputs(case, torch.bfloat16)
        with cpu_avx512_bf16(pairs):
            ours = results_on("native", q, k, v, dout, case[-1] ** -0.5, causal)
        assert_matches_reference(ours, q, k, v, dout, case[-1] ** -0.5, causal)


@pytest.mark.parametrize("backend", ["reference", NATIVE])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", [(1, 4, 2, 3, 5, 8), (2, 2, 1, 5, 3, 4), (1, 3, 3, 4, 4, 6)])
def test_attention_gradcheck_float64(backend, causal, case):
    q, k, v, _ = make_inputs(case, torch.float64, layout="hf")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c: AttentionFunction.apply(a, b, c, 0.7, causal), leaves)


@pytest.mark.parametrize("backend", ["reference", NATIVE])
def test_attention_opcheck(backend):
    with pyfastpeft.use_backend(backend):
        for dtype in (torch.float32, torch.bfloat16):
            for causal in (False, True):
                q, k, v, dout = make_inputs((2, 4, 2, 5, 7, 16), dtype, layout="hf")
                out, lse = torch.ops.pyfastpeft.attention_forward(q, k, v, 0.25, causal)
                torch.library.opcheck(torch.ops.pyfastpeft.attention_forward.default, (q, k, v, 0.25, causal))
                torch.library.opcheck(
                    torch.ops.pyfastpeft.attention_backward.default, (dout, q, k, v, out, lse, 0.25, causal)
                )


@pytest.mark.parametrize("backend", ["reference", NATIVE])
def test_attention_compiles_fullgraph(backend):
    q, k, v, dout = make_inputs((1, 4, 2, 6, 6, 16), torch.float32, layout="hf")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    fn = torch.compile(
        lambda a, b, c: scaled_dot_product_attention(a, b, c, is_causal=True), fullgraph=True, backend="aot_eager"
    )
    with pyfastpeft.use_backend(backend):
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, dout)
    eager = results_on("reference", q, k, v, dout, 16**-0.5, True)
    for got, want in zip((out, *grads), (eager[0], *eager[2:])):
        assert_close_scaled(got, want, torch.float32)


@pytest.mark.parametrize("backend", ["reference", NATIVE])
def test_attention_under_autocast_casts_like_torch_sdpa(backend):
    q, k, v, dout = make_inputs((1, 4, 2, 7, 7, 16), torch.float32, layout="hf")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16), pyfastpeft.use_backend(backend):
        out = scaled_dot_product_attention(*leaves, is_causal=True)
        theirs = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    assert out.dtype == theirs.dtype == torch.bfloat16
    assert_close_scaled(out, theirs, torch.bfloat16)
    grads = torch.autograd.grad(out, leaves, dout.bfloat16())
    assert all(g.dtype == torch.float32 for g in grads)
    for got, want in zip(grads, torch.autograd.grad(theirs, leaves, dout.bfloat16())):
        assert_close_scaled(got, want, torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "native"])  # native hands empty inputs to the reference
@pytest.mark.parametrize(
    "case",
    [(0, 4, 2, 5, 5, 8), (1, 4, 2, 0, 5, 8), (1, 4, 2, 5, 0, 8), (1, 4, 2, 5, 5, 0), (1, 0, 2, 3, 3, 8)],
    ids=["no batch", "no queries", "no keys", "no head_dim", "no query heads"],
)
def test_attention_of_empty_inputs_gives_empty_results(backend, case):
    """Shapes, and values as torch's SDPA gives them (no keys: zeros)."""
    q, k, v, dout = make_inputs(case, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with pyfastpeft.use_backend(backend):
        out = scaled_dot_product_attention(*leaves, is_causal=True)
        grads = torch.autograd.grad(out, leaves, dout)
    theirs = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    assert out.shape == q.shape and torch.equal(out, theirs)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


@pytest.mark.parametrize("backend", ["reference", NATIVE])
def test_attention_nan_reaches_the_rows_that_see_it(backend):
    q, k, v, _ = make_inputs((1, 4, 2, 9, 9, 16), torch.float32)
    q[0, 1, 3, 5] = float("nan")  # query head 1, position 3
    k[0, 0, 6, 2] = float("nan")  # kv head 0 (query heads 0 and 1), position 6: queries 6.. see it under the mask
    v[0, 1, 4, 0] = float("nan")  # kv head 1 (query heads 2 and 3), position 4
    with pyfastpeft.use_backend(backend):
        out, lse = torch.ops.pyfastpeft.attention_forward(q, k, v, 0.25, True)
        out_unmasked, _ = torch.ops.pyfastpeft.attention_forward(q, k, v, 0.25, False)
    nan_rows = torch.zeros(1, 4, 9, dtype=torch.bool)
    nan_rows[0, 1, 3] = True
    nan_rows[0, :2, 6:] = True
    assert torch.equal(lse.isnan(), nan_rows)  # v does not enter lse
    nan_rows[0, 2:, 4:] = True
    # Rows that see v's NaN are NaN; those the mask hides it from may be either (0 * NaN in a dense P v product).
    specified = torch.ones(1, 4, 9, dtype=torch.bool)
    specified[0, 2:, :4] = False
    assert torch.equal(out.isnan().any(-1)[specified], nan_rows[specified])
    assert out_unmasked.isnan().any(-1).all()  # without the mask every query sees key 6 or key 4
    want, want_lse = ref.attention_forward(q, k, v, 0.25, True)
    assert_close_scaled(lse, want_lse, torch.float32)
    finite = specified & ~nan_rows
    assert_close_scaled(out[finite], want[finite], torch.float32)


# --- bad input -------------------------------------------------------------------------------------


def _qkv(heads=4, kv_heads=2, q_len=5, kv_len=7, dim=8, dtype=torch.float32):
    return torch.randn(2, heads, q_len, dim, dtype=dtype), *(
        torch.randn(2, kv_heads, kv_len, dim, dtype=dtype) for _ in range(2)
    )


def _backward_args(dtype=torch.float32, **changes):
    q, k, v = _qkv(dtype=dtype)
    args = dict(dout=torch.randn_like(q), q=q, k=k, v=v, out=torch.randn_like(q), lse=torch.randn(2, 4, 5))
    if dtype == torch.float64:
        args["lse"] = args["lse"].double()
    args.update(changes)
    return (*args.values(), 0.25, True)


def _public(*tensors, **kwargs):
    return lambda: scaled_dot_product_attention(*tensors, **kwargs)


def _forward_op(q, k, v, scale=0.25, causal=True):
    return lambda: torch.ops.pyfastpeft.attention_forward(q, k, v, scale, causal)


def _backward_op(*args):
    return lambda: torch.ops.pyfastpeft.attention_backward(*args)


Q, K, V = _qkv()
BAD_INPUTS = {
    "query of ints": (_public(Q.int(), K, V), TypeError, r"scaled_dot_product_attention: query must have dtype in"),
    "key in fp16": (_public(Q, K.half(), V), TypeError, r"scaled_dot_product_attention: key has dtype torch.float16"),
    "value in fp64": (_public(Q, K, V.double()), TypeError, r"value has dtype torch.float64, query has"),
    "query not a tensor": (_public(Q.tolist(), K, V), TypeError, r"query must be a torch.Tensor, got list"),
    "query 3-D": (_public(Q[0], K, V), ValueError, r"scaled_dot_product_attention: query must be 4-D"),
    "value shorter than key": (_public(Q, K, V[:, :, :6]), ValueError, r"value has shape \(2, 2, 6, 8\), key has"),
    "key of another batch": (_public(Q, K[:1], V[:1]), ValueError, r"key has shape \(1, 2, 7, 8\), incompatible"),
    "key of another head_dim": (_public(Q, K[..., :4], V[..., :4]), ValueError, r"batch and head_dim must match"),
    "heads not a multiple": (_public(Q[:, :3], K, V), ValueError, r"query has 3 heads, not a multiple of key's 2"),
    "key without heads": (_public(Q, K[:, :0], V[:, :0]), ValueError, r"key has shape \(2, 0, 7, 8\), it needs"),
    "key on meta": (_public(Q, K.to("meta"), V), ValueError, r"key is on meta, query is on cpu"),
    "scale nan": (_public(Q, K, V, scale=math.nan), ValueError, r"attention: scale must be finite, got nan"),
    "scale inf": (_public(Q, K, V, scale=math.inf), ValueError, r"attention: scale must be finite, got inf"),
    "scale a bool": (_public(Q, K, V, scale=True), TypeError, r"scale must be a real number, got bool"),
    "is_causal a string": (_public(Q, K, V, is_causal="yes"), TypeError, r"is_causal must be a bool, got str"),
    "op: k of ints": (_forward_op(Q, K.int(), V), TypeError, r"attention_forward: k must have dtype in"),
    "op: v in bf16": (_forward_op(Q, K, V.bfloat16()), TypeError, r"attention_forward: v has dtype torch.bfloat16"),
    "op: q 5-D": (_forward_op(Q[None], K, V), ValueError, r"attention_forward: q must be 4-D"),
    "op: v of other shape": (_forward_op(Q, K, V[:, :1]), ValueError, r"attention_forward: v has shape"),
    "op: heads not a multiple": (_forward_op(Q, K[:, :1].expand(2, 3, 7, 8), V[:, :1].expand(2, 3, 7, 8)),
                                 ValueError, r"attention_forward: q has 4 heads, not a multiple of k's 3"),
    "op: scale nan": (_forward_op(Q, K, V, scale=math.nan), ValueError, r"attention_forward: scale must be finite"),
    "op: k on meta": (_forward_op(Q, K.to("meta"), V), ValueError, r"attention_forward: k is on meta, q is on cpu"),
    "backward: lse in bf16": (_backward_op(*_backward_args(lse=torch.randn(2, 4, 5).bfloat16())), TypeError,
                              r"attention_backward: lse must have dtype in \(float32\), got bfloat16"),
    "backward: lse fp32 of fp64": (_backward_op(*_backward_args(torch.float64, lse=torch.randn(2, 4, 5))), TypeError,
                                   r"attention_backward: lse must have dtype in \(float64\), got float32"),
    "backward: lse short": (_backward_op(*_backward_args(lse=torch.randn(2, 4, 4))), ValueError,
                            r"attention_backward: lse has shape \(2, 4, 4\), expected \[B, H, Sq\] = \(2, 4, 5\)"),
    "backward: lse flat": (_backward_op(*_backward_args(lse=torch.randn(40))), ValueError,
                           r"attention_backward: lse has shape \(40,\)"),
    "backward: dout of k's shape": (_backward_op(*_backward_args(dout=torch.randn(2, 2, 7, 8))), ValueError,
                                    r"attention_backward: dout has shape \(2, 2, 7, 8\), q has \(2, 4, 5, 8\)"),
    "backward: out in fp16": (_backward_op(*_backward_args(out=torch.randn(2, 4, 5, 8).half())), TypeError,
                              r"attention_backward: out must have dtype in \(float32\), got float16"),
    "backward: heads not a multiple": (_backward_op(*_backward_args(k=torch.randn(2, 3, 7, 8),
                                                                    v=torch.randn(2, 3, 7, 8))),
                                       ValueError, r"attention_backward: q has 4 heads, not a multiple of k's 3"),
    "backward: scale inf": (_backward_op(*_backward_args()[:-2], math.inf, True), ValueError,
                            r"attention_backward: scale must be finite, got inf"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_attention_bad_input_raises_naming_the_argument(name):
    call, error, pattern = BAD_INPUTS[name]
    with pytest.raises(error, match=pattern):
        call()


def test_attention_valid_bad_input_templates_run():
    """The arguments the bad-input cases alter are valid as they stand (each case fails for its one change)."""
    with pyfastpeft.use_backend("reference"):
        scaled_dot_product_attention(Q, K, V, is_causal=True, scale=0.5)
        _forward_op(Q, K, V)()
        _backward_op(*_backward_args())()
        _backward_op(*_backward_args(torch.float64))()
