"""Non-finite values through the native kernels: the same NaN / inf pattern as the reference, on every CPU
instruction set (the sanitizer build checks that no NaN reaches undefined behaviour on the way)."""

import pytest
import torch
from helpers import CPU_ISAS, cpu_isa, run

from pyfastpeft.functional import fused_linear_cross_entropy, swiglu

NON_FINITE = torch.tensor([float("nan"), float("inf"), float("-inf"), 100.0, -100.0, 88.5, -87.5, 0.5])


def _tiled(values, length=67):  # past one 16-lane block, with a tail
    return values.repeat(-(-length // values.numel()))[:length]


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_swiglu_exp_of_nan_and_inf_matches_the_reference(isa):
    """swiglu's sigmoid goes through exp_approx, whose NaN input once reached a float-to-int conversion."""
    gate, up, dy = _tiled(NON_FINITE), torch.randn(67), torch.randn(67)
    results = {}
    for backend in ("native", "reference"):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        with cpu_isa(isa):
            y = run(backend, swiglu, g, u)
            y.backward(dy)
        results[backend] = (y.detach(), g.grad, u.grad)
    for got, want in zip(results["native"], results["reference"]):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_softcapped_cross_entropy_of_nan_and_inf_logits_matches_the_reference(isa):
    """The softcap's tanh goes through exp_approx: tanh(+-inf) = +-1, tanh(NaN) = NaN. Logit 7 of row t is
    scale[t] * 1e30 plus a finite part: NaN (the whole row), +-inf (fp32 overflow), +-100, about 0."""
    scale = torch.tensor([float("nan"), 1e30, -1e30, 1e-28, -1e-28, 0.0, 1e30, -1e30]).repeat(2)
    hidden = torch.cat([scale[:, None], torch.randn(16, 7)], dim=1)
    weight = torch.randn(40, 8)
    weight[:, 0] = 0.0
    weight[7, 0] = 1e30
    labels = torch.arange(16) % 40
    results = {}
    for backend in ("native", "reference"):
        w = weight.clone().requires_grad_()
        with cpu_isa(isa):
            loss = run(
                backend, fused_linear_cross_entropy, hidden, w, labels, softcap=5.0, reduction="none", chunk_size=4
            )
            loss.backward(torch.ones_like(loss))
        results[backend] = (loss.detach(), w.grad)
    assert results["reference"][0].isnan().any() and results["reference"][0].isfinite().any()
    for got, want in zip(results["native"], results["reference"]):
        torch.testing.assert_close(got, want, equal_nan=True)
