"""The Triton LoRA forward at every rank PEFT allows: the rank is a loop of fixed tiles in both kernels, so
ranks far above the 256 that once sized its tiles by next_pow2(rank) (and overflowed shared memory on GPUs)
give the reference's results, rank tiles partly filled included. Resources per rank on sm_80/sm_90 are checked
by .ci/compile_gpu; here the CPU interpreter checks the values."""

import math

import pytest
import torch
from helpers import HAS_TRITON, TOLERANCES

import pyfastpeft
from pyfastpeft.functional import lora_linear
from pyfastpeft.quant import quantize_nf4

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def forward_backward(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    leaves = (x, bias, lora_A, lora_B)
    for leaf in leaves:
        leaf.grad = None
    torch.manual_seed(3)
    with pyfastpeft.use_backend(backend):
        y = lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training=True)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape).to(y.dtype))
    return [y.detach()] + [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("rank", [520, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_triton_lora_matches_reference_at_ranks_above_256(rank, dtype, dropout_p, base):
    in_features, out_features = 40, 24
    x = torch.randn(2, 5, in_features).to(dtype).requires_grad_()
    dense = torch.randn(out_features, in_features) / math.sqrt(in_features)
    weight = dense.to(dtype) if base == "dense" else quantize_nf4(dense.to(dtype), blocksize=64)
    bias = torch.randn(out_features).to(dtype).requires_grad_()
    lora_A = (torch.randn(rank, in_features) / math.sqrt(in_features)).to(dtype).requires_grad_()
    lora_B = (torch.randn(out_features, rank) / math.sqrt(rank)).to(dtype).requires_grad_()
    scaling = 16 / math.sqrt(rank)  # rsLoRA, the usual choice at high rank
    args = (x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    expected = forward_backward("reference", *args)
    for got, want in zip(forward_backward("triton", *args), expected):
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])
