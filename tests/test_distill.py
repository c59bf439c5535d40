"""Fused linear distillation: every backend against TRL's generalized_jsd_loss (GKD) plus F.cross_entropy on
logits computed in fp32, over losses, betas, temperatures, hard-label weights, reductions, ignored tokens and
chunk boundaries; gradcheck, opcheck, memory, a training run, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, run

import pyfastpeft
from pyfastpeft.bench.harness import peak_cpu_bytes
from pyfastpeft.functional import fused_linear_distillation
from pyfastpeft.nn import FusedLinearDistillationLoss
from pyfastpeft.ops import distill as distill_ops

ALL_BACKENDS = ["reference"] + BACKENDS
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float64: 1e-10}
TOKENS, STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB, CHUNK = 37, 24, 40, 123, 8  # 4 full chunks and a partial one
# (loss, beta): the three losses, and the generalized JSD's two special cases reached through beta
LOSSES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0)]
BETA = {"kl": 0.0, "reverse_kl": 1.0}


def inputs(tokens=TOKENS, dtype=torch.float32, ignored=(3, 17, 30), bias=True):
    """Student (h, W, b) requiring grad, teacher (g, U, c) of another hidden size, and labels."""
    h = torch.randn(tokens, STUDENT_HIDDEN).to(dtype).requires_grad_()
    w = (torch.randn(VOCAB, STUDENT_HIDDEN) * 2 * STUDENT_HIDDEN**-0.5).to(dtype).requires_grad_()
    b = (torch.randn(VOCAB) * 0.5).to(dtype).requires_grad_() if bias else None
    g = torch.randn(tokens, TEACHER_HIDDEN).to(dtype)
    u = (torch.randn(VOCAB, TEACHER_HIDDEN) * 2 * TEACHER_HIDDEN**-0.5).to(dtype)
    c = (torch.randn(VOCAB) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, VOCAB, (tokens,))
    labels[[i for i in ignored if i < tokens]] = -100
    return (h, w, b), (g, u, c), labels


def logits(hidden, weight, bias):
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = hidden.to(cd) @ weight.to(cd).t()
    return z if bias is None else z + bias.to(cd)


def trl_gkd():
    """TRL's GKD trainer module, imported by the tests that compare with it alone: the CUDA and bad-input tests
    need no TRL."""
    return pytest.importorskip("trl.experimental.gkd.gkd_trainer")


def oracle(student, teacher, labels, loss, beta, temperature, hard, reduction):
    """a * F.cross_entropy + (1 - a) * TRL's generalized_jsd_loss (batchmean: over counted tokens)."""
    zs, zt = logits(*student), logits(*teacher)
    beta = BETA.get(loss, beta)
    trl_reduction = {"mean": "batchmean", "sum": "sum"}[reduction]
    kd = trl_gkd().GKDTrainer.generalized_jsd_loss(zs, zt, labels, beta, temperature, trl_reduction)
    if not hard:
        return kd
    return hard * F.cross_entropy(zs, labels, reduction=reduction) + (1 - hard) * kd


def leaves(student):
    return [t for t in student if t is not None]


def assert_close_scaled(actual, expected, tol):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert error <= tol * max(scale, 1e-30), (error, scale)


def ours(backend, student, teacher, labels, **kwargs):
    h, w, b = student
    g, u, c = teacher
    return run(backend, fused_linear_distillation, h, w, g, u, labels, student_bias=b, teacher_bias=c, **kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss,beta", LOSSES)
@pytest.mark.parametrize("temperature,hard", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.4), (0.7, 0.25)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_distillation_matches_trl_generalized_jsd(backend, loss, beta, temperature, hard, reduction):
    student, teacher, labels = inputs()
    settings = dict(loss=loss, beta=beta, temperature=temperature, hard_label_weight=hard, reduction=reduction)
    got = ours(backend, student, teacher, labels, chunk_size=CHUNK, **settings)
    grads = run(backend, torch.autograd.grad, got, leaves(student))
    expected = oracle(student, teacher, labels, loss, beta, temperature, hard, reduction)
    expected_grads = torch.autograd.grad(expected, leaves(student))
    assert got.dtype == torch.float32 and got.shape == ()
    assert_close_scaled(got, expected, TOLERANCE[torch.float32])
    for grad, expected_grad, leaf in zip(grads, expected_grads, leaves(student)):
        assert grad.dtype == leaf.dtype
        assert_close_scaled(grad, expected_grad, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss,beta", [("kl", 0.5), ("jsd", 0.3), ("reverse_kl", 0.5)])
def test_distillation_bf16_matches_trl_within_rounding(backend, loss, beta):
    student, teacher, labels = inputs(dtype=torch.bfloat16)
    got = ours(backend, student, teacher, labels, loss=loss, beta=beta, hard_label_weight=0.2, chunk_size=CHUNK)
    grads = run(backend, torch.autograd.grad, got, leaves(student))
    expected = oracle(student, teacher, labels, loss, beta, 1.0, 0.2, "mean")
    expected_grads = torch.autograd.grad(expected, leaves(student))
    assert_close_scaled(got, expected, TOLERANCE[torch.bfloat16])
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.bfloat16
        assert_close_scaled(grad, expected_grad, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,beta,hard", [("kl", 0.5, 0.0), ("jsd", 0.4, 0.3), ("reverse_kl", 0.5, 0.5)])
def test_distillation_per_token_losses_and_their_gradients_match_the_formula(backend, loss, beta, hard):
    """reduction none: the chunked backends against the reference's eager formula, with random output grads
    (the backward recomputes both logits chunk by chunk)."""
    student, teacher, labels = inputs()
    settings = dict(loss=loss, beta=beta, temperature=1.5, hard_label_weight=hard, reduction="none")
    expected = ours("reference", student, teacher, labels, **settings)
    got = ours(backend, student, teacher, labels, chunk_size=CHUNK, **settings)
    assert got.shape == labels.shape and (got[labels == -100] == 0).all()
    assert_close_scaled(got, expected, TOLERANCE[torch.float32])
    grad_out = torch.rand(TOKENS) + 0.5
    expected_grads = torch.autograd.grad(expected, leaves(student), grad_out)
    grads = run(backend, torch.autograd.grad, got, leaves(student), grad_out)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close_scaled(grad, expected_grad, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss,beta", [("kl", 0.5), ("jsd", 0.3), ("reverse_kl", 0.5)])
def test_distillation_gradcheck_float64(backend, reduction, loss, beta):
    student, teacher, labels = inputs(tokens=6, dtype=torch.float64, ignored=(2,))
    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda h, w, b: fused_linear_distillation(
                h,
                w,
                teacher[0],
                teacher[1],
                labels,
                loss=loss,
                beta=beta,
                temperature=1.3,
                hard_label_weight=0.3,
                student_bias=b,
                teacher_bias=teacher[2],
                reduction=reduction,
                chunk_size=4,
            ),
            student,
        )


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_distillation_opcheck(backend):
    (h, w, b), (g, u, c), labels = inputs()
    h, w, b = h.detach(), w.detach(), b.detach()
    with pyfastpeft.use_backend(backend):
        for reduction, beta, hard in (("mean", 0.0, 0.0), ("none", 0.5, 0.3), ("sum", 1.0, 0.0)):
            torch.library.opcheck(
                distill_ops.distill_forward,
                (h, w, g, u, labels, b, c, -100, beta, 2.0, hard, reduction, True, True, True, CHUNK),
            )
        torch.library.opcheck(
            distill_ops.distill_backward,
            (torch.rand(TOKENS), h, w, g, u, labels, None, c, -100, 0.5, 1.0, 0.2, True, True, False, CHUNK),
        )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_distillation_without_labels_counts_every_token(backend):
    student, teacher, labels = inputs(ignored=())
    without = ours(backend, student, teacher, None, loss="jsd", chunk_size=CHUNK)
    with_labels = ours(backend, student, teacher, labels, loss="jsd", chunk_size=CHUNK)
    torch.testing.assert_close(without, with_labels)
    ignored_everywhere = ours(backend, student, teacher, torch.full_like(labels, -100), loss="jsd")
    grads = run(backend, torch.autograd.grad, ignored_everywhere, leaves(student))
    assert ignored_everywhere.item() == 0.0 and all(not grad.any() for grad in grads)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_distillation_of_a_student_equal_to_its_teacher_is_zero(backend):
    (h, w, b), _, labels = inputs()
    teacher = (h.detach(), w.detach(), b.detach())
    for loss in ("kl", "reverse_kl", "jsd"):
        value = ours(backend, (h, w, b), teacher, labels, loss=loss, temperature=3.0)
        grads = run(backend, torch.autograd.grad, value, [h, w, b])
        assert abs(value.item()) < 1e-5
        assert all(grad.abs().max() < 1e-5 for grad in grads)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("loss,beta,hard", [("kl", 0.5, 0.0), ("jsd", 0.4, 0.3), ("reverse_kl", 0.5, 0.2)])
def test_distillation_on_cuda_matches_the_reference(backend, loss, beta, hard):
    student, teacher, labels = inputs()
    settings = dict(loss=loss, beta=beta, temperature=1.5, hard_label_weight=hard, reduction="none")
    expected = ours("reference", student, teacher, labels, **settings)
    grad_out = torch.rand(TOKENS) + 0.5
    expected_grads = torch.autograd.grad(expected, leaves(student), grad_out)
    cuda_student = [t.detach().cuda().requires_grad_() for t in student]
    cuda_teacher = [t.cuda() for t in teacher]
    got = ours(backend, cuda_student, cuda_teacher, labels.cuda(), chunk_size=CHUNK, **settings)
    grads = run(backend, torch.autograd.grad, got, cuda_student, grad_out.cuda())
    assert_close_scaled(got.cpu(), expected, 1e-4)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close_scaled(grad.cpu(), expected_grad, 1e-4)


def test_distillation_teacher_gets_no_gradient_and_the_module_matches_the_function():
    (h, w, b), (g, u, c), labels = inputs()
    g.requires_grad_()
    u.requires_grad_()
    module = FusedLinearDistillationLoss(loss="jsd", beta=0.3, temperature=2.0)
    value = module(w, h, u, g, labels, b, c)
    value.backward()
    assert g.grad is None and u.grad is None and h.grad is not None
    expected = fused_linear_distillation(h, w, g, u, labels, "jsd", 0.3, 2.0, student_bias=b, teacher_bias=c)
    torch.testing.assert_close(value, expected)
    assert "loss='jsd'" in repr(module)


def test_distillation_under_autocast_casts_each_lm_head_like_linear():
    student, teacher, labels = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours("native", student, teacher, labels, loss="kl")
    cast = lambda side: tuple(None if t is None else t.to(torch.bfloat16) for t in side)  # noqa: E731
    expected = ours("native", cast(student), cast(teacher), labels, loss="kl")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_distillation_peak_memory_stays_far_below_the_logits():
    tokens, vocab, hidden, chunk = 1024, 2048, 64, 64
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * hidden**-0.5).requires_grad_()
    g, u = torch.randn(tokens, hidden), torch.randn(vocab, hidden) * hidden**-0.5
    logits_bytes = tokens * vocab * 4
    gkd = trl_gkd()

    def fused():
        value = fused_linear_distillation(h, w, g, u, loss="jsd", chunk_size=chunk)
        value.backward()
        return value

    def eager():
        value = gkd.GKDTrainer.generalized_jsd_loss(h @ w.t(), g @ u.t())
        value.backward()
        return value

    peak = peak_cpu_bytes(fused)
    h.grad = w.grad = None
    # two chunk buffers (chunk x V fp32 each), dW's fp32 accumulator and dh, small per-token vectors
    budget = 3 * chunk * vocab * 4 + 2 * (w.numel() + h.numel()) * 4 + 64 * tokens
    assert peak <= budget < logits_bytes / 2, (peak, budget, logits_bytes)
    assert peak_cpu_bytes(eager) >= 2 * logits_bytes


@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd"])
def test_distillation_training_brings_the_student_to_the_teacher(loss):
    """A tiny student (embedding + lm_head) trained on the fused loss against a fixed tiny teacher: the KL
    between their distributions falls to a fraction of where it started."""
    torch.manual_seed(0)
    tokens, hidden, vocab = 64, 16, 50
    ids = torch.randint(0, 20, (tokens,))
    teacher_embedding, teacher_head = torch.randn(20, 24), torch.randn(vocab, 24) * 0.6
    embedding = torch.nn.Embedding(20, hidden)
    head = torch.nn.Parameter(torch.randn(vocab, hidden) * 0.1)
    optimizer = torch.optim.Adam([*embedding.parameters(), head], lr=3e-2)

    def kl():
        with torch.no_grad():
            zs, zt = embedding(ids) @ head.t(), teacher_embedding[ids] @ teacher_head.t()
            return F.kl_div(zs.log_softmax(-1), zt.log_softmax(-1), log_target=True, reduction="batchmean").item()

    start = kl()
    for _ in range(150):
        optimizer.zero_grad()
        fused_linear_distillation(embedding(ids), head, teacher_embedding[ids], teacher_head, loss=loss).backward()
        optimizer.step()
    assert kl() < 0.2 * start, (start, kl())


def test_distillation_rejects_bad_input():
    (h, w, b), (g, u, c), labels = inputs()
    with pytest.raises(ValueError, match="the vocabularies differ"):
        fused_linear_distillation(h, w, g, u[:-1], labels)
    with pytest.raises(ValueError, match="hard_label_weight > 0 needs labels"):
        fused_linear_distillation(h, w, g, u, None, hard_label_weight=0.5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fused_linear_distillation(h, w, g, u, labels, temperature=0.0)
    for name, value in (("beta", 1.5), ("hard_label_weight", -0.1)):
        with pytest.raises(ValueError, match=f"{name} must be a number in"):
            fused_linear_distillation(h, w, g, u, labels, **{name: value})
    with pytest.raises(ValueError, match="loss must be one of"):
        fused_linear_distillation(h, w, g, u, labels, loss="kld")
    with pytest.raises(ValueError, match="teacher_hidden has tokens"):
        fused_linear_distillation(h, w, g[:-1], u, labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        fused_linear_distillation(h, w, g, u, labels[:-1])
    with pytest.raises(ValueError, match=r"student_weight is \[123, 23\]"):
        fused_linear_distillation(h, w[:, :-1], g, u, labels)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 123\)"):
        fused_linear_distillation(h, w, g, u, torch.full_like(labels, VOCAB), hard_label_weight=0.5)
    with pytest.raises(ValueError, match="teacher_weight has 122 rows"):
        torch.ops.pyfastpeft.distill_forward(
            h.detach(), w.detach(), g, u[:-1], labels, None, None, -100, 0.0, 1.0, 0.0, "mean", True, True, False, 0
        )
    with pytest.raises(ValueError, match="temperature must be > 0"):
        torch.ops.pyfastpeft.distill_forward(
            h.detach(), w.detach(), g, u, labels, None, None, -100, 0.0, 0.0, 0.0, "mean", True, True, False, 0
        )


def test_ignored_tokens_skip_both_lm_heads(monkeypatch):
    # reduction none: the forward computes both models' logits of the counted tokens alone, and so does the backward
    # that recomputes them; the ignored tokens' losses and gradients are 0
    student, teacher, labels = inputs(ignored=range(0, TOKENS, 2))
    rows = []
    real = distill_ops.logits_into
    monkeypatch.setattr(distill_ops, "logits_into", lambda x, weight, out: rows.append(len(x)) or real(x, weight, out))
    got = ours("native", student, teacher, labels, loss="jsd", reduction="none", chunk_size=CHUNK)
    grads = torch.autograd.grad(got.sum(), leaves(student))
    counted = labels != -100
    assert sum(rows) == 4 * int(counted.sum()) < 4 * TOKENS
    assert bool((got[~counted] == 0).all()) and bool((grads[0][~counted] == 0).all())
