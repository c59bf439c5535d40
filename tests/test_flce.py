"""Fused linear cross-entropy: every backend against F.cross_entropy(h W^T + b) computed in fp32, over dtypes,
reductions, ignored tokens, label smoothing, softcap and chunk boundaries; gradcheck, opcheck, compile,
memory, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, CPU_ISAS, cpu_isa, run

import pyfastpeft
from pyfastpeft.bench.harness import peak_cpu_bytes
from pyfastpeft.functional import fused_linear_cross_entropy
from pyfastpeft.ops import flce as flce_ops

ALL_BACKENDS = ["reference"] + BACKENDS
# Max error relative to the largest expected magnitude. fp32: the matmul's summation order. fp16/bf16: on CPU
# the logits round once to the input dtype (2^-11 / 2^-8 relative) before the fp32 softmax, and dz rounds to
# it for the dh matmul; the oracle computes the logits in fp32 from the same (rounded) inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
# (label_smoothing, softcap)
SETTINGS = [(0.0, None), (0.1, None), (0.0, 5.0), (0.2, 3.0)]
TOKENS, HIDDEN, VOCAB, CHUNK = 53, 32, 123, 16  # 53 tokens: 3 full chunks of 16 and a partial one; V % 16 != 0


def inputs(tokens=TOKENS, hidden=HIDDEN, vocab=VOCAB, dtype=torch.float32, bias=True, ignored=(3, 17, 40)):
    h = torch.randn(tokens, hidden).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden) * 2 * hidden**-0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, tokens.shape if isinstance(tokens, torch.Size) else (tokens,))
    labels.view(-1)[[i for i in ignored if i < labels.numel()]] = -100
    return h, w, b, labels


def oracle(
    h,
    w,
    b,
    labels,
    label_smoothing=0.0,
    softcap=None,
    reduction="mean",
    ignore_index=-100,
    chunk_size=None,
    class_weight=None,
    lse_square_scale=0.0,
):
    """F.cross_entropy on logits computed in fp32 (fp64 for fp64) from the same inputs, plus the z-loss
    s * lse^2 of the counted tokens (summed, or averaged over them, as Liger's)."""
    cd = torch.float64 if h.dtype == torch.float64 else torch.float32
    logits = h.to(cd) @ w.to(cd).t()
    if b is not None:
        logits = logits + b.to(cd)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits, flat = logits.reshape(-1, w.shape[0]), labels.reshape(-1)
    loss = F.cross_entropy(
        logits,
        flat,
        weight=None if class_weight is None else class_weight.to(cd),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    if lse_square_scale:
        counted = flat != ignore_index
        z = torch.where(counted, lse_square_scale * torch.logsumexp(logits, -1) ** 2, 0)
        loss = loss + {"none": z, "sum": z.sum(), "mean": z.sum() / counted.sum().clamp(min=1)}[reduction]
    return loss.reshape(labels.shape if reduction == "none" else ())


def leaves(h, w, b):
    return [t for t in (h, w, b) if t is not None and t.requires_grad]


def assert_close_scaled(actual, expected, tol):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert error <= tol * max(scale, 1e-30), (error, scale)


def check_against_oracle(backend, h, w, b, labels, tol, **kwargs):
    loss = run(backend, fused_linear_cross_entropy, h, w, labels, b, **kwargs)
    grad_out = torch.rand(loss.shape, dtype=loss.dtype) + 0.5
    grads = run(backend, torch.autograd.grad, loss, leaves(h, w, b), grad_out)
    expected = oracle(h, w, b, labels, **kwargs)
    expected_grads = torch.autograd.grad(expected, leaves(h, w, b), grad_out.to(expected.dtype))
    assert loss.dtype == expected.dtype
    assert_close_scaled(loss, expected, tol)
    for grad, expected_grad, leaf in zip(grads, expected_grads, leaves(h, w, b)):
        assert grad.dtype == leaf.dtype
        assert_close_scaled(grad, expected_grad.to(leaf.dtype), tol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("label_smoothing,softcap", SETTINGS)
def test_flce_matches_cross_entropy(backend, dtype, label_smoothing, softcap):
    h, w, b, labels = inputs(dtype=dtype)
    check_against_oracle(
        backend, h, w, b, labels, TOLERANCE[dtype], label_smoothing=label_smoothing, softcap=softcap, chunk_size=CHUNK
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_flce_reductions_with_smoothing_and_softcap(backend, reduction):
    h, w, b, labels = inputs()
    check_against_oracle(
        backend,
        h,
        w,
        b,
        labels,
        TOLERANCE[torch.float32],
        label_smoothing=0.1,
        softcap=4.0,
        reduction=reduction,
        chunk_size=CHUNK,
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_flce_3d_hidden_keeps_labels_shape(backend):
    h = torch.randn(2, 7, HIDDEN, requires_grad=True)
    _, w, b, _ = inputs()
    labels = torch.randint(0, VOCAB, (2, 7))
    labels[1, 3] = -100
    loss, lse = run(
        backend, fused_linear_cross_entropy, h, w, labels, b, reduction="none", return_lse=True, chunk_size=5
    )
    assert loss.shape == lse.shape == (2, 7) and loss[1, 3] == 0
    torch.testing.assert_close(lse, torch.logsumexp(h @ w.t() + b, -1), rtol=1e-5, atol=1e-5)
    check_against_oracle(backend, h, w, b, labels, TOLERANCE[torch.float32], reduction="none", chunk_size=5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flce_all_tokens_ignored_gives_zero_loss_and_grads(backend, reduction):
    h, w, b, labels = inputs(tokens=9, ignored=range(9))
    loss = run(backend, fused_linear_cross_entropy, h, w, labels, b, reduction=reduction)
    grads = run(backend, torch.autograd.grad, loss.sum(), [h, w, b])
    assert torch.equal(loss, torch.zeros_like(loss))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_flce_ignore_index_inside_vocab(backend):
    h, w, b, labels = inputs(ignored=())
    labels[::4] = 0
    check_against_oracle(
        backend, h, w, b, labels, TOLERANCE[torch.float32], ignore_index=0, label_smoothing=0.1, chunk_size=CHUNK
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_flce_huge_logits_do_not_overflow(backend):
    h, w, _, labels = inputs(bias=False)
    with torch.no_grad():
        h.mul_(1e4 / (h @ w.t()).abs().max())  # logits up to 1e4 in magnitude
    loss = run(backend, fused_linear_cross_entropy, h, w, labels, reduction="none", chunk_size=CHUNK)
    assert torch.isfinite(loss).all()
    # an fp32 logit near 1e4 is known to ~1e-3 (its ulp), so exp(c - lse) to ~1e-3 relative
    check_against_oracle(backend, h, w, None, labels, 2e-3, reduction="sum", chunk_size=CHUNK)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_flce_default_chunk_and_no_bias(backend):
    h, w, _, labels = inputs(bias=False)
    check_against_oracle(backend, h, w, None, labels, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_flce_gradcheck_float64(backend, reduction):
    h, w, b, labels = inputs(tokens=7, hidden=4, vocab=9, dtype=torch.float64, ignored=(2,))
    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda h, w, b: fused_linear_cross_entropy(
                h, w, labels, b, label_smoothing=0.15, softcap=2.5, reduction=reduction, chunk_size=3
            ),
            (h, w, b),
        )


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flce_every_cpu_isa_agrees(isa, dtype):
    h, w, b, labels = inputs(tokens=37, vocab=1000, dtype=dtype)
    with cpu_isa(isa):
        check_against_oracle(
            "native", h, w, b, labels, TOLERANCE[dtype], label_smoothing=0.1, softcap=10.0, chunk_size=16
        )


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_flce_opcheck(backend):
    h, w, b, labels = (t.detach() if t is not None else t for t in inputs())
    with pyfastpeft.use_backend(backend):
        for reduction in ("none", "mean", "sum"):
            for bias in (b, None):
                torch.library.opcheck(
                    flce_ops.flce_forward,
                    (h, w, labels, bias, None, -100, 0.1, 3.0, 0.0, reduction, True, True, True, bias is not None, 16),
                )
        torch.library.opcheck(
            flce_ops.flce_forward, (h, w, labels, b, None, -100, 0.0, 0.0, 0.0, "mean", False, False, True, False, 0)
        )
        grad_loss = torch.rand(TOKENS)
        torch.library.opcheck(
            flce_ops.flce_backward, (grad_loss, h, w, labels, b, None, -100, 0.0, 2.0, 0.0, True, True, True, 16)
        )


def test_flce_compiles_fullgraph():
    h, w, b, labels = inputs()

    def loss_fn(h, w, b, labels):
        loss, lse = fused_linear_cross_entropy(h, w, labels, b, label_smoothing=0.1, return_lse=True, chunk_size=16)
        return loss + 0.0 * lse.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(h, w, b, labels)
    grads = torch.autograd.grad(loss, [h, w, b])
    expected = loss_fn(h, w, b, labels)
    expected_grads = torch.autograd.grad(expected, [h, w, b])
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_flce_frozen_weight_computes_and_saves_no_weight_grad():
    h, w, _, labels = inputs(bias=False)
    w.requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fused_linear_cross_entropy(h, w, labels)
    counted = int((labels != -100).sum())  # ignored tokens skip the op: dh of the counted rows, no [V, H], no logits
    assert max(t.numel() for t in saved) == counted * h.shape[1] < h.numel()
    loss.backward()
    assert w.grad is None and h.grad is not None


def test_flce_peak_memory_stays_far_below_the_logits():
    tokens, vocab, hidden, chunk = 1024, 2048, 64, 64
    h, w, _, labels = inputs(tokens=tokens, hidden=hidden, vocab=vocab, bias=False)
    logits_bytes = tokens * vocab * 4

    def ours():
        loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk)
        loss.backward()
        return loss

    def eager():
        loss = F.cross_entropy(F.linear(h, w), labels)
        loss.backward()
        return loss

    peak = peak_cpu_bytes(ours)
    h.grad = w.grad = None
    # the chunk buffer (chunk x V fp32), dW's fp32 accumulator and dh, and small per-token vectors
    budget = 2 * chunk * vocab * 4 + 2 * (w.numel() + h.numel()) * 4 + 64 * tokens
    assert peak <= budget < logits_bytes / 2, (peak, budget, logits_bytes)
    assert peak_cpu_bytes(eager) >= logits_bytes


def test_flce_default_chunk_is_bounded_by_bytes_not_tokens():
    assert flce_ops.chunk_rows(100_000, 32000, 0) == 256  # 256 x 32000 x 4 B = 31 MiB
    assert flce_ops.chunk_rows(100_000, 152064, 0) == flce_ops.MIN_CHUNK_ROWS
    assert flce_ops.chunk_rows(10, 32000, 0) == 10
    assert flce_ops.chunk_rows(100, 32000, 7) == 7
    # on a GPU the floor keeps each pass over W compute-bound: 512 rows at a 128k vocabulary, not 64
    assert flce_ops.chunk_rows(100_000, 128256, 0, "cuda") == flce_ops.MIN_CHUNK_ROWS_CUDA == 512
    assert flce_ops.chunk_rows(100_000, 32000, 0, "cuda") == 512
    assert flce_ops.chunk_rows(300, 128256, 0, "cuda") == 300
    assert flce_ops.chunk_rows(100_000, 128256, 0, "cpu") == 64


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_flce_empty_input(backend):
    h, w, b, _ = inputs(tokens=0)
    labels = torch.empty(0, dtype=torch.int64)
    loss = run(backend, fused_linear_cross_entropy, h, w, labels, b)
    assert loss.shape == () and loss.item() == 0.0
    grads = run(backend, torch.autograd.grad, loss, [h, w, b])
    assert grads[0].shape == h.shape and not grads[1].any() and not grads[2].any()
    assert run(backend, fused_linear_cross_entropy, h, w, labels, b, reduction="none").shape == (0,)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_flce_out_of_range_label_is_nan_inside_the_kernels(backend):
    """The Python edge rejects such labels on CPU; past it (on GPUs, under compile) the row gets NaN, and
    nothing is read out of bounds."""
    h, w, b, labels = (t.detach() if t is not None else t for t in inputs(tokens=4, ignored=()))
    labels[1] = VOCAB
    loss, lse, *_ = run(
        backend, flce_ops.flce_forward, h, w, labels, b, None, -100, 0.0, 0.0, 0.0, "none", False, True, True, True, 0
    )
    assert loss[1].isnan() and loss[[0, 2, 3]].isfinite().all() and lse.isfinite().all()


def non_finite_rows(device="cpu"):
    """hidden, weight, labels whose logits (fp32 overflow of 1e30 * 1e30) hold, per row: nothing special, one
    +inf, one -inf (a masked token), two +inf, all NaN, two -inf; chunks of 2 rows put them in different chunks."""
    big = 1e30
    w = torch.zeros(VOCAB, 4)
    w[5, 0] = w[9, 2] = big
    w[:, 3] = torch.randn(VOCAB)
    h = torch.tensor(
        [
            [0.0, 0, 0, 1],
            [big, 0, 0, 1],
            [-big, 0, 0, 1],
            [big, 0, big, 1],
            [float("nan"), 0, 0, 1],
            [-big, 0, -big, 0.5],
        ]
    )
    return h.to(device), w.to(device), torch.tensor([1, 2, 3, 4, 9, 7], device=device)


def check_non_finite_rows(backend, device="cpu"):
    h, w, labels = non_finite_rows(device)
    logits = h @ w.t()
    for label_smoothing in (0.0, 0.1):
        args = (None, -100, label_smoothing, 0.0, 0.0, "none", False, True, True, False, 2)
        expected = run("reference", flce_ops.flce_forward, h, w, labels, None, *args)
        got = run(backend, flce_ops.flce_forward, h, w, labels, None, *args)
        torch.testing.assert_close(expected[1], torch.logsumexp(logits, -1), equal_nan=True)
        for name, actual, want in zip(("loss", "lse", "grad_hidden", "grad_weight"), got, expected):
            torch.testing.assert_close(actual, want, equal_nan=True, rtol=1e-5, atol=1e-5, msg=name)
        finite_rows = [0, 2, 5]  # torch agrees there; it gives NaN where a +inf logit is not the label, ours +inf
        torch.testing.assert_close(
            got[0][finite_rows],
            F.cross_entropy(
                logits[finite_rows], labels[finite_rows], label_smoothing=label_smoothing, reduction="none"
            ),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_lse_and_loss_on_infinite_and_nan_logits_match_the_reference(backend):
    """lse is torch.logsumexp: +inf with a +inf logit, NaN with a NaN, finite with a -inf (as is the loss, also
    without label smoothing)."""
    check_non_finite_rows(backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_flce_cuda_lse_and_loss_on_infinite_and_nan_logits_match_the_reference(backend):
    check_non_finite_rows(backend, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(label_smoothing=0.2, softcap=3.0, reduction="none"),
        dict(class_weight=True, lse_square_scale=0.05, label_smoothing=0.1),
        dict(class_weight=True, reduction="sum", softcap=5.0),
    ],
    ids=["plain", "smoothing-softcap-none", "class-weight-z-loss", "class-weight-sum"],
)
def test_flce_on_cuda_matches_cross_entropy(backend, dtype, settings):
    """The CUDA row kernels over chunks that split the tokens, every term on: loss and every gradient against
    the fp32 oracle on the CPU. bf16 inputs are the same rounded values on both sides."""
    h, w, b, labels = inputs(dtype=dtype)
    settings = dict(settings)
    if settings.pop("class_weight", False):
        settings["class_weight"] = class_weights()
    cuda = [t.detach().cuda().requires_grad_() for t in (h, w, b)]
    cuda_settings = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in settings.items()}
    loss = run(backend, fused_linear_cross_entropy, cuda[0], cuda[1], labels.cuda(), cuda[2], chunk_size=CHUNK,
               **cuda_settings)  # fmt: skip
    grad_out = torch.rand(loss.shape) + 0.5
    grads = run(backend, torch.autograd.grad, loss, cuda, grad_out.to(loss.dtype).cuda())
    expected = oracle(h, w, b, labels, **settings)
    expected_grads = torch.autograd.grad(expected, [h, w, b], grad_out.to(expected.dtype))
    assert_close_scaled(loss.cpu(), expected, TOLERANCE[dtype])
    for grad, want, leaf in zip(grads, expected_grads, cuda):
        assert grad.dtype == leaf.dtype and grad.is_cuda
        assert_close_scaled(grad.cpu(), want.to(leaf.dtype), TOLERANCE[dtype])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_flce_row_of_minus_infinity_has_lse_minus_infinity(backend):
    h, w, b, labels = (t.detach() for t in inputs(tokens=3, ignored=()))
    b = torch.full_like(b, float("-inf"))
    loss, lse, *_ = run(
        backend,
        flce_ops.flce_forward,
        h,
        w,
        labels,
        b,
        None,
        -100,
        0.0,
        0.0,
        0.0,
        "none",
        False,
        False,
        False,
        False,
        0,
    )
    assert (lse == float("-inf")).all() and loss.isnan().all()


def test_flce_rejects_bad_input():
    h, w, b, labels = inputs()
    with pytest.raises(ValueError, match="labels must have shape"):
        fused_linear_cross_entropy(h, w, labels[:-1])
    with pytest.raises(TypeError, match="labels must have dtype int64"):
        fused_linear_cross_entropy(h, w, labels.int())
    with pytest.raises(ValueError, match=r"weight is \[123, 31\], hidden's last dim is 32"):
        fused_linear_cross_entropy(h, w[:, :31], labels)
    with pytest.raises(ValueError, match="bias has 122 elements"):
        fused_linear_cross_entropy(h, w, labels, b[:-1])
    with pytest.raises(TypeError, match="weight has dtype"):
        fused_linear_cross_entropy(h, w.double(), labels)
    for smoothing in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            fused_linear_cross_entropy(h, w, labels, label_smoothing=smoothing)
    for softcap in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="softcap must be None or a finite number > 0"):
            fused_linear_cross_entropy(h, w, labels, softcap=softcap)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_linear_cross_entropy(h, w, labels, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size must be"):
        fused_linear_cross_entropy(h, w, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 123\)"):
        fused_linear_cross_entropy(h, w, torch.full_like(labels, 123))
    with pytest.raises(TypeError, match="hidden must have dtype"):
        fused_linear_cross_entropy(h.int(), w, labels)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_token_accuracy_is_the_argmax_hit_rate_over_counted_tokens(backend, reduction, softcap):
    """return_token_accuracy: the share of tokens (ignore_index left out) whose label is their logits' argmax,
    computed chunk by chunk (chunks that split the tokens) without changing loss, lse or gradients."""
    h, w, b, labels = inputs()
    logits = (h @ w.t() + b).detach()
    labels = labels.clone()
    labels[::4] = logits.argmax(-1)[::4]  # some hits whatever the random draw
    counted = labels != -100
    expected = (logits.argmax(-1) == labels)[counted].float().mean()
    kwargs = dict(reduction=reduction, softcap=softcap, chunk_size=CHUNK)
    loss, lse, accuracy = run(
        backend, fused_linear_cross_entropy, h, w, labels, b, return_lse=True, return_token_accuracy=True, **kwargs
    )
    assert accuracy.dtype == torch.float32 and accuracy.dim() == 0 and not accuracy.requires_grad
    torch.testing.assert_close(accuracy, expected)
    loss.sum().backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    plain_loss, plain_lse = run(backend, fused_linear_cross_entropy, h, w, labels, b, return_lse=True, **kwargs)
    plain_loss.sum().backward()
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    torch.testing.assert_close(lse, plain_lse, rtol=0, atol=0)
    for got, want in zip(grads, [t.grad for t in (h, w, b)]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_token_accuracy_of_all_ignored_tokens_is_zero_and_alone_with_the_loss(backend):
    h, w, b, labels = inputs(tokens=4, ignored=())
    loss, accuracy = run(
        backend, fused_linear_cross_entropy, h, w, torch.full_like(labels, -100), b, return_token_accuracy=True
    )
    assert accuracy.item() == 0.0 and loss.item() == 0.0


def class_weights(vocab=VOCAB, dtype=torch.float32):
    """Positive weights with some exact zeros (a class left out of the loss)."""
    weights = torch.rand(vocab, dtype=dtype) * 2 + 0.1
    weights[::7] = 0
    return weights


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing,softcap", SETTINGS)
def test_flce_class_weights_and_z_loss_match_torch_and_liger_formulas(
    backend, dtype, reduction, label_smoothing, softcap
):
    """F.cross_entropy(weight=class_weight) plus lse_square_scale * lse^2 over counted tokens, on chunks
    that split the tokens: loss and every gradient, also each term alone."""
    h, w, b, labels = inputs(dtype=dtype)
    common = dict(label_smoothing=label_smoothing, softcap=softcap, reduction=reduction, chunk_size=CHUNK)
    for extra in (
        dict(class_weight=class_weights()),
        dict(lse_square_scale=1e-3),
        dict(class_weight=class_weights(), lse_square_scale=0.05),
    ):
        check_against_oracle(backend, h, w, b, labels, TOLERANCE[dtype], **common, **extra)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_flce_z_loss_returned_alone_is_the_scaled_square_of_lse(backend, reduction):
    h, w, b, labels = inputs()
    scale = 1e-2
    loss, lse, z_loss = run(
        backend,
        fused_linear_cross_entropy,
        h,
        w,
        labels,
        b,
        reduction=reduction,
        lse_square_scale=scale,
        return_lse=True,
        return_z_loss=True,
        chunk_size=CHUNK,
    )
    counted = labels != -100
    per_token = torch.where(counted, scale * lse**2, 0)
    expected = per_token if reduction == "none" else per_token.sum() / counted.sum()
    assert not z_loss.requires_grad and z_loss.dtype == torch.float32
    torch.testing.assert_close(z_loss, expected)
    plain = run(backend, fused_linear_cross_entropy, h, w, labels, b, reduction=reduction, chunk_size=CHUNK)
    torch.testing.assert_close(loss, plain + expected)
    # no z-loss asked: the term is zero, and the loss is the plain one bit for bit
    got, zero = run(backend, fused_linear_cross_entropy, h, w, labels, b, reduction=reduction, return_z_loss=True)
    assert not zero.any() and torch.equal(
        got, run(backend, fused_linear_cross_entropy, h, w, labels, b, reduction=reduction)
    )


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_flce_class_weights_and_z_loss_gradcheck_float64(backend, reduction):
    h, w, b, labels = inputs(tokens=7, hidden=4, vocab=9, dtype=torch.float64, ignored=(2,))
    weights = class_weights(9, torch.float64)
    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda h, w, b: fused_linear_cross_entropy(
                h,
                w,
                labels,
                b,
                label_smoothing=0.15,
                softcap=2.5,
                reduction=reduction,
                chunk_size=3,
                class_weight=weights,
                lse_square_scale=0.1,
            ),
            (h, w, b),
        )


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_flce_opcheck_with_class_weights_and_z_loss(backend):
    h, w, b, labels = (t.detach() for t in inputs())
    weights = class_weights()
    with pyfastpeft.use_backend(backend):
        for reduction in ("none", "mean"):
            torch.library.opcheck(
                flce_ops.flce_forward,
                (h, w, labels, b, weights, -100, 0.1, 3.0, 1e-3, reduction, False, True, True, True, 16),
            )
        torch.library.opcheck(
            flce_ops.flce_backward,
            (torch.rand(TOKENS), h, w, labels, b, weights, -100, 0.1, 0.0, 1e-3, True, True, True, 16),
        )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_flce_class_weights_of_zero_on_every_counted_label_give_zero_mean(backend):
    """torch divides 0 by 0 there (NaN); ours, as its unweighted mean of no tokens, gives 0 and zero gradients."""
    h, w, b, labels = inputs(tokens=6, ignored=(1,))
    weights = torch.ones(VOCAB)
    weights[labels[labels != -100]] = 0
    loss = run(backend, fused_linear_cross_entropy, h, w, labels, b, class_weight=weights)
    grads = run(backend, torch.autograd.grad, loss, [h, w, b])
    assert loss.item() == 0.0 and all(not g.any() for g in grads)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_flce_loss_dtype_casts_the_returned_loss_only(backend):
    h, w, b, labels = inputs(dtype=torch.bfloat16)
    loss, z_loss = run(
        backend,
        fused_linear_cross_entropy,
        h,
        w,
        labels,
        b,
        lse_square_scale=1e-3,
        return_z_loss=True,
        loss_dtype=torch.bfloat16,
    )
    reference = run(backend, fused_linear_cross_entropy, h, w, labels, b, lse_square_scale=1e-3)
    assert loss.dtype == z_loss.dtype == torch.bfloat16 and reference.dtype == torch.float32
    assert torch.equal(loss, reference.to(torch.bfloat16))
    grads = run(backend, torch.autograd.grad, loss, [h, w, b])
    expected = run(backend, torch.autograd.grad, reference, [h, w, b])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_flce_rejects_bad_class_weights_and_z_loss_settings():
    h, w, b, labels = inputs()
    with pytest.raises(ValueError, match="class_weight has 122 elements, weight has 123 rows"):
        fused_linear_cross_entropy(h, w, labels, class_weight=torch.ones(VOCAB - 1))
    with pytest.raises(ValueError, match="class_weight must not require grad"):
        fused_linear_cross_entropy(h, w, labels, class_weight=torch.ones(VOCAB, requires_grad=True))
    with pytest.raises(TypeError, match="class_weight must have dtype"):
        fused_linear_cross_entropy(h, w, labels, class_weight=torch.ones(VOCAB, dtype=torch.int64))
    with pytest.raises(ValueError, match="class_weight must be 1-D"):
        fused_linear_cross_entropy(h, w, labels, class_weight=torch.ones(1, VOCAB))
    for scale in (-1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lse_square_scale must be a finite number >= 0"):
            fused_linear_cross_entropy(h, w, labels, lse_square_scale=scale)
    with pytest.raises(TypeError, match="lse_square_scale must be a real number"):
        fused_linear_cross_entropy(h, w, labels, lse_square_scale=True)
    with pytest.raises(TypeError, match="return_z_loss must be a bool"):
        fused_linear_cross_entropy(h, w, labels, return_z_loss=1)
    with pytest.raises(ValueError, match="loss_dtype must be None or a float dtype"):
        fused_linear_cross_entropy(h, w, labels, loss_dtype=torch.int32)
    with pytest.raises(TypeError, match=r"class_weight must have dtype in \(float32\)"):
        wrong = torch.ones(VOCAB, dtype=torch.float64)
        settings = (-100, 0.0, 0.0, 0.0, "mean", False, True, True, False, 0)
        torch.ops.pyfastpeft.flce_forward(h.detach(), w.detach(), labels, None, wrong, *settings)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ignored_tokens_skip_the_lm_head_matmuls(monkeypatch, reduction):
    # a third of the tokens ignored (a prompt, padding): only the counted ones reach the logits matmul, and the loss
    # (0 at ignored tokens for "none"), its z-loss, the token accuracy and the gradients are the oracle's
    h, w, b, labels = inputs(ignored=range(0, TOKENS, 3))
    rows = []
    real = flce_ops.logits_into
    monkeypatch.setattr(flce_ops, "logits_into", lambda x, weight, out: rows.append(len(x)) or real(x, weight, out))
    loss, z_loss, accuracy = fused_linear_cross_entropy(
        h, w, labels, b, reduction=reduction, chunk_size=8, lse_square_scale=1e-3, return_z_loss=True,
        return_token_accuracy=True,
    )  # fmt: skip
    counted = labels != -100
    assert sum(rows) == int(counted.sum()) < TOKENS
    expected = oracle(h, w, b, labels, reduction=reduction, lse_square_scale=1e-3)
    assert_close_scaled(loss, expected, 1e-5)
    expected_z = expected - oracle(h, w, b, labels, reduction=reduction)
    torch.testing.assert_close(z_loss, expected_z.detach(), rtol=1e-4, atol=1e-7)
    if reduction == "none":
        assert bool((loss[~counted] == 0).all())
    logits = h @ w.t() + b
    expected_accuracy = (logits.argmax(-1) == labels)[counted].float().mean()
    torch.testing.assert_close(accuracy, expected_accuracy)
    grads = torch.autograd.grad(loss.sum(), leaves(h, w, b))
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected.sum(), leaves(h, w, b))):
        assert_close_scaled(grad, expected_grad, 1e-5)
    assert bool((grads[0][~counted] == 0).all())
    # every token's lse is asked for: every row is computed
    rows.clear()
    fused_linear_cross_entropy(h, w, labels, b, return_lse=True, chunk_size=8)
    assert sum(rows) == TOKENS


@pytest.mark.parametrize("vocab", [4096, 5000, 9000])
def test_cpu_half_logits_in_column_blocks_equal_one_matmul(vocab):
    # CPU fp16/bf16 logits go through column blocks of a temporary (a smaller peak): each block is the matmul's
    h = torch.randn(24, 64).bfloat16()
    w = (torch.randn(vocab, 64) / 8).bfloat16()
    out = torch.empty(24, vocab)
    flce_ops.logits_into(h, w, out)
    torch.testing.assert_close(out, torch.mm(h, w.t()).float(), rtol=2**-7, atol=1e-3)  # a bf16 ulp


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("label_smoothing,softcap", SETTINGS)
@pytest.mark.parametrize("extra", [{}, {"class_weight": "weights", "lse_square_scale": 0.05}])
def test_cpu_bf16_logits_stay_bf16_through_the_row_pass(monkeypatch, isa, label_smoothing, softcap, extra):
    """Without a bias, native CPU bf16 logits are the chunk's buffer, widened row by row inside the row pass and
    left as dz rounded to bf16: the loss and every gradient equal the fp32-buffer path's bit for bit."""
    h, w, _, labels = inputs(dtype=torch.bfloat16, bias=False)
    kwargs = dict(label_smoothing=label_smoothing, softcap=softcap, reduction="sum", chunk_size=CHUNK)
    if extra:
        kwargs.update(class_weight=class_weights(), lse_square_scale=extra["lse_square_scale"])
    seen = []
    launch = flce_ops._native.launch

    def spy(name, like, *args):
        if name == "flce_rows":
            seen.append(like.dtype)
        return launch(name, like, *args)

    monkeypatch.setattr(flce_ops._native, "launch", spy)

    def loss_and_grads():
        with pyfastpeft.use_backend("native"), cpu_isa(isa):
            loss = fused_linear_cross_entropy(h, w, labels, **kwargs)
            return (loss, *torch.autograd.grad(loss, (h, w)))

    stored = loss_and_grads()
    assert set(seen) == {torch.bfloat16}
    monkeypatch.setattr(flce_ops, "_stores_bf16", lambda *args: False)
    seen.clear()
    widened = loss_and_grads()
    assert set(seen) == {torch.float32}
    # dW alone differs, by its roundings: one bf16 GEMM over every token's dz when stored (the test below) against
    # the chunks' bf16 products summed in fp32 when widened
    for a, b in zip(stored[:2], widened[:2], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(stored[2], widened[2], rtol=1.6e-2, atol=2e-2 * widened[2].abs().max().item())


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("with_grad", [False, True])
def test_cpu_row_pass_on_bf16_logits_is_the_fp32_pass_rounded(isa, softcap, with_grad):
    """The native row pass straight on a chunk (V % 16 != 0, a label out of range, an ignored row): over bf16 logits
    it leaves what it leaves over the same values in fp32, rounded to bf16 (the softcapped logits without a gradient,
    dz with one), with the same loss and lse; without a gradient the logits end softcapped."""
    generator = torch.Generator().manual_seed(7)
    logits = (torch.randn(6, VOCAB, generator=generator) * 4).to(torch.bfloat16)
    labels = torch.tensor([0, 5, VOCAB - 1, -100, VOCAB, 17])
    grad_weights = torch.rand(6, generator=generator) + 0.5 if with_grad else None
    results = []
    with cpu_isa(isa):
        for buffer in (logits.float(), logits.clone()):
            loss, lse = torch.empty(6), torch.empty(6)
            flce_ops.native_rows(buffer, labels, grad_weights, None, None, loss, lse, -100, 0.1, softcap)
            results.append((buffer, loss, lse))
    (wide, wide_loss, wide_lse), (stored, loss, lse) = results
    # the out-of-range label's row is NaN (its loss too)
    torch.testing.assert_close(stored, wide.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(loss, wide_loss, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(lse, wide_lse)
    if not with_grad:
        capped = softcap * torch.tanh(logits.float() / softcap) if softcap else logits.float()
        torch.testing.assert_close(wide, capped, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("hidden", [HIDDEN, 16])
def test_cpu_bf16_trained_lm_head_dw_is_one_gemm_over_every_tokens_dz(monkeypatch, hidden):
    """CPU bf16 without a bias: while T <= 2 H, every token's dz (the row pass's bf16 output) stays in one [T, V]
    buffer and dW is one bf16 GEMM over all tokens, rounded once as eager's, with no fp32 [V, H] accumulator.
    Past that (53 tokens over H = 16) the chunks' products are summed in fp32: the same dW to bf16 rounding."""
    h, w, _, labels = inputs(hidden=hidden, dtype=torch.bfloat16, bias=False)
    dz = []
    launch = flce_ops._native.launch

    def spy(name, like, *args):
        out = launch(name, like, *args)
        if name == "flce_rows":
            dz.append(like.clone())
        return out

    monkeypatch.setattr(flce_ops._native, "launch", spy)
    with pyfastpeft.use_backend("native"):
        loss = fused_linear_cross_entropy(h, w, labels, reduction="sum", chunk_size=CHUNK)
        dw = torch.autograd.grad(loss, w)[0]
    one_gemm = torch.mm(torch.cat(dz).t(), h.detach()[labels != -100])
    assert len(dz) > 1 and all(d.dtype == torch.bfloat16 for d in dz)
    if TOKENS <= 2 * hidden:
        assert torch.equal(dw, one_gemm)
    else:
        torch.testing.assert_close(dw, one_gemm, rtol=1.6e-2, atol=2e-2 * one_gemm.abs().max().item())


@pytest.mark.parametrize("logits_dtype", [torch.float16, torch.float64])
def test_cpu_row_kernel_refuses_logits_of_another_kind_than_bf16_over_fp32(logits_dtype):
    """The row kernel widens bf16 logits only; any other pairing with fp32 statistics is refused, not misread."""
    logits = torch.randn(3, 11).to(logits_dtype)
    labels = torch.tensor([0, 5, 10])
    loss, lse = torch.empty(3), torch.empty(3)
    with pytest.raises(ValueError, match="bf16 logits go with fp32 statistics"):
        flce_ops.native_rows(logits, labels, None, None, None, loss, lse, -100, 0.0, 0.0)
