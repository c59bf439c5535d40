"""Under torch.autocast (Trainer's bf16=True over an fp32 model) every op follows the rule of the torch op it
replaces and returns what the unfused module returns: products follow F.linear (inputs cast to the autocast
dtype), and nothing crashes on the mixed dtypes autocast produces inside a layer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfastpeft import backend
from pyfastpeft.functional import lora_linear, nf4_linear, rms_norm
from pyfastpeft.nn import Linear4bit, Linear8bitLt
from pyfastpeft.nn.lora import add_lora
from pyfastpeft.ops.flce import fused_linear_cross_entropy
from pyfastpeft.ops.int8 import int8_linear
from pyfastpeft.quant import quantize_nf4

BF16 = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.mark.parametrize("name", ["reference", "native"])
def test_lora_linear_over_fp32_tensors_follows_f_linear(name):
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(5, 32, generator=gen), torch.randn(24, 32, generator=gen)
    lora_A = torch.randn(4, 32, generator=gen).requires_grad_()
    lora_B = torch.randn(24, 4, generator=gen).requires_grad_()
    bias = torch.randn(24, generator=gen)
    with backend.use_backend(name), autocast():
        y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5)
        expected = F.linear(x, weight, bias) + F.linear(F.linear(x, lora_A), lora_B) * 0.5
    assert y.dtype == expected.dtype == BF16
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-1)
    y.float().sum().backward()
    assert lora_A.grad.dtype == torch.float32 and lora_B.grad.dtype == torch.float32
    assert lora_A.grad.abs().sum() > 0


def _peft_style_forward(linear, lora_A, lora_B, scaling, x):
    """PEFT's LoraLayer.forward without dropout: base_layer(x) + lora_B(lora_A(x)) * scaling, in the base's
    result dtype."""
    result = linear(x)
    return (result + lora_B(lora_A(x)) * scaling).to(result.dtype)


def test_lora_module_over_fp32_linear_returns_what_peft_returns_under_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24))
    add_lora(model, target_modules=["0"], r=4, lora_alpha=8)
    layer = model[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 32)
    with autocast():
        y = model(x)
        expected = _peft_style_forward(
            layer.base_layer, layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"], x
        )
    assert y.dtype == expected.dtype == BF16
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=1e-1)
    y.float().pow(2).mean().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_lora_module_over_quantized_base_runs_under_autocast(base):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    if base == "nf4":
        quantized = Linear4bit.from_linear(linear, compute_dtype=None)
    else:
        quantized = Linear8bitLt.from_linear(linear)
    model = nn.Sequential(quantized)
    add_lora(model, target_modules=["0"], r=4, lora_alpha=8)
    nn.init.normal_(model[0].lora_B["default"].weight)
    x = torch.randn(4, 64)
    with autocast():
        y = model(x)
    without = model(x)
    assert y.dtype == x.dtype  # bitsandbytes' layers return the input dtype
    torch.testing.assert_close(y, without, rtol=5e-2, atol=2e-1)
    y.sum().backward()
    assert model[0].lora_A["default"].weight.grad is not None


def test_nf4_and_int8_linear_follow_f_linear_under_autocast():
    x = torch.randn(3, 64)
    packed, state = quantize_nf4(torch.randn(16, 64))
    with autocast():
        assert nf4_linear(x, packed, state).dtype == BF16
        assert int8_linear(x, torch.ones(16, 64, dtype=torch.int8), torch.ones(16)).dtype == BF16


def test_fused_cross_entropy_under_autocast_matches_f_linear_then_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 16, generator=gen)
    weight = torch.randn(40, 16, generator=gen).requires_grad_()
    labels = torch.randint(0, 40, (6,), generator=gen)
    with autocast():
        loss = fused_linear_cross_entropy(hidden, weight, labels)
        expected = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    loss.backward()
    assert weight.grad.dtype == torch.float32


def test_rms_norm_under_autocast_keeps_hf_casting():
    x, weight = torch.randn(4, 32, dtype=BF16), torch.randn(32)
    with autocast():
        y = rms_norm(x, weight)
    variance = x.float().pow(2).mean(-1, keepdim=True)
    expected = weight * (x.float() * torch.rsqrt(variance + 1e-6)).to(BF16)
    assert y.dtype == expected.dtype
    torch.testing.assert_close(y, expected)
