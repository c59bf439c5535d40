"""Preference losses (DPO, IPO, SimPO, ORPO) over a chunked lm_head: every backend against TRL's own loss code
(CPO's simpo, ORPO's odds ratio) or its formulas (DPO's sigmoid with conservative label smoothing, IPO) on
logits computed whole in fp32; the reference log-probabilities precomputed or from the reference model's
lm_head; rewards; a training run that widens the margin; bad input."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, run

import pyfastpeft
from pyfastpeft.functional import fused_linear_preference
from pyfastpeft.nn import FusedLinearCrossEntropyLoss, FusedLinearPreferenceLoss
from pyfastpeft.ops import flce as flce_ops
from pyfastpeft.ops import preference as preference_ops

ALL_BACKENDS = ["reference"] + BACKENDS
PAIRS, SEQ, HIDDEN, VOCAB, CHUNK = 3, 7, 16, 53, 5  # chunks of 5 tokens split the sequences


def inputs(seed=0):
    torch.manual_seed(seed)
    h = torch.randn(2 * PAIRS, SEQ, HIDDEN, requires_grad=True)
    w = (torch.randn(VOCAB, HIDDEN) * 2 * HIDDEN**-0.5).requires_grad_()
    labels = torch.randint(0, VOCAB, (2 * PAIRS, SEQ))
    labels[:, :2] = -100  # the prompt
    labels[1, -3:] = -100  # padding: the sequences' lengths differ
    labels[PAIRS + 2, -1] = -100
    ref_h = torch.randn(2 * PAIRS, SEQ, HIDDEN)
    ref_w = torch.randn(VOCAB, HIDDEN) * 2 * HIDDEN**-0.5
    return h, w, labels, ref_h, ref_w


def logps(h, w, labels):
    """Summed and averaged log-probabilities of the labels from the whole fp32 logits (TRL's get_batch_logps on
    already-shifted labels)."""
    logits = h.float() @ w.float().t()
    mask = labels != -100
    per_token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    total = (per_token * mask).sum(-1)
    return total, total / mask.sum(-1), -(per_token * mask)[:PAIRS].sum() / mask[:PAIRS].sum()


def oracle(loss, h, w, labels, ref_h, ref_w, beta, label_smoothing, gamma):
    total, average, nll = logps(h, w, labels)
    ref_total, _, _ = logps(ref_h, ref_w, labels)
    counts = (labels != -100).sum(-1)
    if loss == "dpo":
        d = (total[:PAIRS] - ref_total[:PAIRS]) - (total[PAIRS:] - ref_total[PAIRS:])
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
        return per_pair.mean(), beta * (total[:PAIRS] - ref_total[:PAIRS])
    if loss == "ipo":
        ratios = (total - ref_total) / counts
        per_pair = (ratios[:PAIRS] - ratios[PAIRS:] - 1 / (2 * beta)) ** 2
        return per_pair.mean(), beta * (total[:PAIRS] - ref_total[:PAIRS])
    # TRL's own simpo and odds-ratio code, imported here alone: DPO, IPO and the CUDA tests need no TRL
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    device = SimpleNamespace(device="cpu")
    if loss == "simpo":
        trainer = SimpleNamespace(
            alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing, loss_type="simpo",
            accelerator=device,
        )  # fmt: skip
        losses, chosen_rewards, _ = cpo.CPOTrainer.cpo_loss(trainer, average[:PAIRS], average[PAIRS:])
        return losses.mean(), chosen_rewards
    trainer = SimpleNamespace(beta=beta, accelerator=device)
    losses, chosen_rewards, *_ = orpo.ORPOTrainer.odds_ratio_loss(trainer, average[:PAIRS], average[PAIRS:])
    return nll - losses.mean(), chosen_rewards


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "loss,label_smoothing", [("dpo", 0.0), ("dpo", 0.2), ("ipo", 0.0), ("simpo", 0.0), ("simpo", 0.2), ("orpo", 0.0)]
)
def test_preference_loss_and_gradients_match_trl(backend, loss, label_smoothing):
    h, w, labels, ref_h, ref_w = inputs()
    beta, gamma = 0.3, 0.4
    reference = dict(ref_hidden=ref_h, ref_weight=ref_w) if loss in ("dpo", "ipo") else {}
    out = run(
        backend, fused_linear_preference, h, w, labels, loss=loss, beta=beta, label_smoothing=label_smoothing,
        simpo_gamma=gamma, chunk_size=CHUNK, **reference,
    )  # fmt: skip
    grads = run(backend, torch.autograd.grad, out.loss, [h, w])
    expected, expected_rewards = oracle(loss, h, w, labels, ref_h, ref_w, beta, label_smoothing, gamma)
    expected_grads = torch.autograd.grad(expected, [h, w])
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, expected_rewards.detach(), rtol=1e-5, atol=1e-6)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    assert out.reward_margins.shape == (PAIRS,) and 0 <= out.reward_accuracy <= 1
    torch.testing.assert_close(out.reward_margins, out.chosen_rewards - out.rejected_rewards)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dpo_with_precomputed_reference_logps_equals_the_in_pass_reference(backend):
    h, w, labels, ref_h, ref_w = inputs()
    ref_total, _, _ = logps(ref_h, ref_w, labels)
    in_pass = run(backend, fused_linear_preference, h, w, labels, ref_hidden=ref_h, ref_weight=ref_w)
    given = run(
        backend, fused_linear_preference, h, w, labels, ref_chosen_logps=ref_total[:PAIRS],
        ref_rejected_logps=ref_total[PAIRS:],
    )  # fmt: skip
    torch.testing.assert_close(in_pass.loss, given.loss)
    torch.testing.assert_close(in_pass.reward_margins, given.reward_margins)


def test_dpo_training_widens_the_chosen_rejected_margin():
    """A tiny policy (embedding + lm_head) trained with DPO against its frozen starting copy: the reward margin
    rises from 0 and the pairs come to prefer the chosen completion."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    head = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN) * 0.1)
    ids = torch.randint(0, VOCAB, (2 * PAIRS, SEQ))
    labels = torch.randint(0, VOCAB, (2 * PAIRS, SEQ))
    labels[:, :2] = -100
    with torch.no_grad():
        ref_h, ref_w = embedding(ids).clone(), head.clone()
    optimizer = torch.optim.Adam([*embedding.parameters(), head], lr=1e-2)
    first = None
    for _ in range(60):
        optimizer.zero_grad()
        out = fused_linear_preference(embedding(ids), head, labels, beta=0.1, ref_hidden=ref_h, ref_weight=ref_w)
        out.loss.backward()
        optimizer.step()
        first = out.reward_margins.mean().item() if first is None else first
    assert abs(first) < 1e-5 and out.reward_margins.mean() > 1.0 and out.reward_accuracy == 1.0


def test_preference_rejects_bad_input():
    h, w, labels, ref_h, ref_w = inputs()
    with pytest.raises(ValueError, match="loss must be one of"):
        fused_linear_preference(h, w, labels, loss="kto")
    with pytest.raises(ValueError, match="needs the reference model"):
        fused_linear_preference(h, w, labels, loss="dpo")
    with pytest.raises(ValueError, match="reference-free"):
        fused_linear_preference(h, w, labels, loss="simpo", ref_hidden=ref_h, ref_weight=ref_w)
    with pytest.raises(ValueError, match=r"first dim must be 2B > 0"):
        fused_linear_preference(h[:-1], w, labels[:-1], loss="orpo")
    with pytest.raises(ValueError, match="at least one token per sequence"):
        fused_linear_preference(h[:, :0], w, labels[:, :0], loss="orpo")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        fused_linear_preference(h, w, labels, loss="simpo", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        fused_linear_preference(h, w, labels, loss="orpo", beta=0.0)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must be a float tensor of shape \(3,\)"):
        fused_linear_preference(h, w, labels, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="pass both ref_chosen_logps and ref_rejected_logps"):
        fused_linear_preference(h, w, labels, ref_chosen_logps=torch.zeros(3))


def test_loss_modules_match_their_functions():
    h, w, labels, ref_h, ref_w = inputs()
    module = FusedLinearPreferenceLoss("simpo", beta=0.5, simpo_gamma=0.2)
    expected = fused_linear_preference(h, w, labels, loss="simpo", beta=0.5, simpo_gamma=0.2)
    torch.testing.assert_close(module(w, h, labels).loss, expected.loss)
    dpo = FusedLinearPreferenceLoss(beta=0.2)(w, h, labels, ref_hidden=ref_h, ref_weight=ref_w)
    torch.testing.assert_close(
        dpo.loss, fused_linear_preference(h, w, labels, beta=0.2, ref_hidden=ref_h, ref_weight=ref_w).loss
    )
    weights = torch.rand(VOCAB)
    ce = FusedLinearCrossEntropyLoss(class_weight=weights, lse_square_scale=1e-3)
    flat_h, flat_labels = h.reshape(-1, HIDDEN), labels.reshape(-1)
    expected_ce = (
        F.cross_entropy(flat_h @ w.t(), flat_labels, weight=weights)
        + 1e-3 * (torch.logsumexp(flat_h @ w.t(), -1)[flat_labels != -100] ** 2).mean()
    )
    torch.testing.assert_close(ce(w, flat_h, flat_labels), expected_ce)
    assert "loss='simpo'" in repr(module)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_preference_gradcheck_float64_with_bias_and_softcap(backend, loss):
    h, w, labels, ref_h, ref_w = inputs()
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b = torch.randn(VOCAB, dtype=torch.float64, requires_grad=True)
    refs = dict(
        ref_chosen_logps=torch.randn(PAIRS, dtype=torch.float64) - 20,
        ref_rejected_logps=torch.randn(PAIRS, dtype=torch.float64) - 20,
    )
    extra = refs if loss == "dpo" else {}
    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda h, w, b: (
                fused_linear_preference(
                    h, w, labels, b, loss=loss, beta=0.5, softcap=4.0, chunk_size=CHUNK, **extra
                ).loss
            ),
            (h, w, b),
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preference_chunked_backends_match_the_unchunked_reference(backend, dtype):
    """Chunks of one pair, two pairs and all of them, with a bias and a softcap, against the reference backend."""
    h, w, labels, ref_h, ref_w = inputs()
    h, w = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    b = torch.randn(VOCAB).to(dtype).requires_grad_()
    settings = dict(loss="simpo", beta=0.7, label_smoothing=0.1, softcap=3.0)
    expected = run("reference", fused_linear_preference, h, w, labels, b, **settings)
    expected_grads = torch.autograd.grad(expected.loss, [h, w, b])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    for chunk in (1, 2 * SEQ * 2, None):
        got = run(backend, fused_linear_preference, h, w, labels, b, chunk_size=chunk, **settings)
        torch.testing.assert_close(got.loss, expected.loss, **tol)
        torch.testing.assert_close(got.chosen_logps, expected.chosen_logps, **tol)
        for grad, want in zip(run(backend, torch.autograd.grad, got.loss, [h, w, b]), expected_grads):
            assert grad.dtype == dtype
            torch.testing.assert_close(grad.float(), want.float(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_pairs_longer_than_a_chunk_fold_as_they_go_with_a_frozen_lm_head(backend, dtype, loss):
    """W frozen: a pair in sub-chunks takes one logits matmul per token (its unit gradients folded into u W and the
    per-sequence bias sums at once, scaled when the pair's weights are known); the loss and the gradients of the
    hidden states and the bias equal the unchunked reference."""
    h, w, labels, ref_h, ref_w = inputs()
    h, w = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype)
    b = torch.randn(VOCAB).to(dtype).requires_grad_()
    settings = dict(loss=loss, beta=0.3, softcap=3.0, nll_weight=0.5 if loss == "orpo" else 0.0)
    if loss == "dpo":
        settings.update(ref_hidden=ref_h.to(dtype), ref_weight=ref_w.to(dtype))
    expected = run("reference", fused_linear_preference, h, w, labels, b, **settings)
    expected_grads = torch.autograd.grad(expected.loss, [h, b])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    for chunk in (1, 3, SEQ + 1):  # sub-chunks within a sequence, across the chosen/rejected boundary
        got = run(backend, fused_linear_preference, h, w, labels, b, chunk_size=chunk, **settings)
        torch.testing.assert_close(got.loss, expected.loss, **tol)
        torch.testing.assert_close(got.rejected_logps, expected.rejected_logps, **tol)
        for grad, want in zip(run(backend, torch.autograd.grad, got.loss, [h, b]), expected_grads):
            assert grad.dtype == dtype
            torch.testing.assert_close(grad.float(), want.float(), **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("loss", ["dpo", "simpo", "orpo"])
def test_preference_on_cuda_matches_the_reference(backend, loss):
    """CUDA inputs, a bias, the DPO reference model's lm_head in the pass; chunks shorter than a sequence (the
    two-pass path) and the default: every output and gradient against the reference backend on the CPU."""
    h, w, labels, ref_h, ref_w = inputs()
    b = torch.randn(VOCAB, requires_grad=True)
    settings = dict(loss=loss, beta=0.4, label_smoothing=0.1 if loss != "orpo" else 0.0, softcap=4.0)
    reference = dict(ref_hidden=ref_h, ref_weight=ref_w) if loss == "dpo" else {}
    expected = run("reference", fused_linear_preference, h, w, labels, b, **settings, **reference)
    expected_grads = torch.autograd.grad(expected.loss, [h, w, b])
    cuda = [t.detach().cuda().requires_grad_() for t in (h, w, b)]
    cuda_reference = {k: v.cuda() for k, v in reference.items()}
    for chunk in (CHUNK, None):
        got = run(backend, fused_linear_preference, *cuda[:2], labels.cuda(), cuda[2], chunk_size=chunk,
                  **settings, **cuda_reference)  # fmt: skip
        for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
            torch.testing.assert_close(getattr(got, name).cpu(), getattr(expected, name), rtol=1e-5, atol=1e-5)
        for grad, want in zip(run(backend, torch.autograd.grad, got.loss, cuda), expected_grads):
            assert grad.is_cuda
            torch.testing.assert_close(grad.cpu(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_preference_opcheck(backend):
    h, w, labels, _, _ = inputs()
    h, w = h.detach(), w.detach()
    refs = (torch.randn(PAIRS), torch.randn(PAIRS))
    with pyfastpeft.use_backend(backend):
        torch.library.opcheck(
            torch.ops.pyfastpeft.preference_forward,
            (h, w, labels, None, *refs, "dpo", 0.1, 0.1, 0.0, 0.0, -100, 0.0, True, True, False, CHUNK),
        )
        torch.library.opcheck(
            torch.ops.pyfastpeft.preference_forward,
            (h, w, labels, None, None, None, "orpo", 0.1, 0.0, 0.0, 1.0, -100, 2.0, True, False, False, 0),
        )


def test_preference_peak_memory_stays_far_below_the_logits_even_when_a_pair_outgrows_a_chunk():
    """2 pairs of 512 tokens at chunks of 64 rows: each pair goes in sub-chunks, so the buffer is 64 x V whatever
    the sequence length."""
    from pyfastpeft.bench.harness import peak_cpu_bytes

    pairs, seq, hidden, vocab, chunk = 2, 512, 32, 2048, 64
    h = torch.randn(2 * pairs, seq, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden) * hidden**-0.5
    labels = torch.randint(0, vocab, (2 * pairs, seq))
    refs = dict(ref_chosen_logps=torch.randn(pairs) - 4000, ref_rejected_logps=torch.randn(pairs) - 4000)
    logits_bytes = 2 * pairs * seq * vocab * 4

    def fused():
        out = fused_linear_preference(h, w, labels, chunk_size=chunk, **refs)
        out.loss.backward()
        return out.loss

    peak = peak_cpu_bytes(fused)
    budget = 2 * chunk * vocab * 4 + 4 * h.numel() * 4 + 64 * labels.numel()
    assert peak <= budget < logits_bytes / 4, (peak, budget, logits_bytes)


@pytest.mark.parametrize("chunk", [None, 3])
def test_only_counted_tokens_reach_the_lm_head_matmuls(monkeypatch, chunk):
    """The prompt, the padding and a wholly ignored pair take no part in either model's matmuls; the loss and the
    gradients stay the reference's (whose eager row pass sees every row)."""
    h, w, labels, ref_h, ref_w = inputs()
    labels[[0, PAIRS]] = -100  # the first pair counts nowhere
    expected = run("reference", fused_linear_preference, h, w, labels, ref_hidden=ref_h, ref_weight=ref_w)
    expected_grads = torch.autograd.grad(expected.loss, [h, w])
    rows = []
    for module in (preference_ops, flce_ops):
        real = module.logits_into
        monkeypatch.setattr(
            module, "logits_into", lambda x, weight, out, real=real: rows.append(len(x)) or real(x, weight, out)
        )
    got = run("native", fused_linear_preference, h, w, labels, ref_hidden=ref_h, ref_weight=ref_w, chunk_size=chunk)
    counted = int((labels != -100).sum())
    passes = 2 if chunk else 1  # a pair in sub-chunks with W trained goes twice
    assert sum(rows) == counted * (1 + passes)  # the reference model's pass, then the policy's
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.chosen_logps[0], torch.tensor(0.0))
    for grad, want in zip(torch.autograd.grad(got.loss, [h, w]), expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
