"""Bad arguments to every op family (quantize, int8, LoRA, norms, RoPE, attention, flce) raise a clear exception naming
the function and the argument; mixed devices never reach a kernel; ops called directly are validated like the
public functions. Crash-prone cases run in a child process (tests/bad_input.py)."""

import math

import pytest
import torch
from bad_input import Cases, assert_raises_cleanly

from pyfastpeft import backend
from pyfastpeft.functional import (
    apply_rotary_pos_emb,
    lora_linear,
    lora_linear_multi,
    nf4_linear,
    rms_norm,
    scaled_dot_product_attention,
    swiglu,
)
from pyfastpeft.ops.flce import fused_linear_cross_entropy
from pyfastpeft.ops.int8 import int8_linear
from pyfastpeft.quant import (
    dequantize,
    fake_quantize,
    int8_mm_dequant,
    int8_vectorwise_quant,
    quantize,
    quantize_nf4,
)

cases = Cases(__file__)
META = torch.device("meta")


def _qt(**changes):
    qt = quantize(torch.randn(6, 10), bits=8, scheme="zeropoint", axis=0)
    for key, value in changes.items():
        setattr(qt, key, value)
    return qt


# ---- general quantization: a QuantizedTensor's fields are checked against each other --------------------------


@cases.add(ValueError, r"qt.scale has shape \(3,\).*need \(6,\)")
def dequantize_short_scale():
    dequantize(_qt(scale=_qt().scale[:3]))


@cases.add(ValueError, r"qt.zero_point has shape \(2,\), expected \(6,\)")
def dequantize_short_zero_point():
    dequantize(_qt(zero_point=_qt().zero_point[:2]))


@cases.add(ValueError, r"qt.scale has shape \(6,\).*blocksize=None.*need \(\)")
def dequantize_per_block_scales_without_blocksize():
    qt = quantize(torch.randn(6, 10), blocksize=10)
    qt.blocksize = None
    qt.scale = qt.scale[:6] if qt.scale.numel() >= 6 else qt.scale
    dequantize(qt)


@cases.add(TypeError, "qt.codes must be uint8")
def dequantize_int32_codes():
    dequantize(_qt(codes=_qt().codes.int()))


@cases.add(TypeError, "qt.codes must be int8")
def dequantize_float_codes():
    qt = quantize(torch.randn(6, 10))
    qt.codes = qt.codes.float()
    dequantize(qt)


@cases.add(ValueError, r"qt.zero_point must lie in \[0, 255\]")
def dequantize_zero_point_out_of_code_range():
    dequantize(_qt(zero_point=torch.full((6,), 2**40)))


@cases.add(ValueError, "scale has 2 elements, the quantization groups needs 6")
def dequantize_op_called_directly_with_short_scale():
    qt = _qt()
    torch.ops.pyfastpeft.dequantize_affine(qt.codes, qt.scale[:2], qt.zero_point, 0, 0, torch.float32)


@cases.add(ValueError, "axis must be in")
def quantize_static_op_with_axis_out_of_range():
    torch.ops.pyfastpeft.quantize_static(
        torch.randn(4, 4), torch.ones(4), torch.zeros(4, dtype=torch.int32), 8, True, 5, 0
    )


@cases.add(ValueError, r"zero_point must lie in \[0, 255\] for 8 bits, got values in \[1099511627776")
def fake_quantize_zero_point_beyond_int32():
    fake_quantize(torch.randn(8), 8, "zeropoint", scale=0.1, zero_point=2**40)


def test_dequantize_accepts_a_negative_axis_as_its_positive_twin():
    x = torch.randn(6, 10)
    qt = quantize(x, bits=8, scheme="zeropoint", axis=1)
    expected = dequantize(qt)
    qt.axis = -1
    torch.testing.assert_close(dequantize(qt), expected, rtol=0, atol=0)


# ---- devices: every tensor argument, not only the first ---------------------------------------------------------


@cases.add(ValueError, "nf4_linear: bias is on meta, x is on cpu")
def nf4_linear_bias_on_meta():
    packed, state = quantize_nf4(torch.randn(8, 64))
    nf4_linear(torch.randn(2, 64), packed, state, torch.zeros(8, device=META))


@cases.add(ValueError, "weight_stats is on meta")
def int8_linear_stats_on_meta():
    int8_linear(torch.randn(2, 16), torch.ones(4, 16, dtype=torch.int8), torch.ones(4, device=META))


@cases.add(ValueError, "col_stats is on meta")
def int8_mm_dequant_col_stats_on_meta():
    int8_mm_dequant(torch.ones(2, 3, dtype=torch.int32), torch.ones(2), torch.ones(3, device=META))


@cases.add(ValueError, "scale is on meta")
def quantize_static_scale_on_meta():
    torch.ops.pyfastpeft.quantize_static(
        torch.randn(4), torch.ones((), device=META), torch.empty(0, dtype=torch.int32), 8, False, -1, 0
    )


@cases.add(ValueError, "lora_B is on meta")
def lora_linear_lora_b_on_meta():
    lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2, device=META), 1.0)


@cases.add(ValueError, "weight is on meta, x is on cpu")
def rms_norm_op_called_directly_with_weight_on_meta():
    torch.ops.pyfastpeft.rms_norm_forward(torch.randn(2, 8), torch.ones(8, device=META), 1e-6, 0.0, "llama")


# ---- int8 ----------------------------------------------------------------------------------------------------


@cases.add(TypeError, "threshold must be a real number, got bool")
def int8_linear_threshold_true():
    int8_linear(torch.randn(2, 16), torch.ones(4, 16, dtype=torch.int8), torch.ones(4), threshold=True)


@cases.add(ValueError, "threshold must be finite, got nan")
def int8_linear_threshold_nan():
    int8_linear(torch.randn(2, 16), torch.ones(4, 16, dtype=torch.int8), torch.ones(4), threshold=math.nan)


@cases.add(ValueError, "weight_stats has 3 elements")
def int8_linear_op_called_directly_with_short_stats():
    torch.ops.pyfastpeft.int8_linear(torch.randn(2, 16), torch.ones(4, 16, dtype=torch.int8), torch.ones(3), None, 6.0)


@cases.add(ValueError, "row_stats has 1 elements, one per row of c needs 2")
def int8_mm_dequant_op_called_directly_with_short_row_stats():
    torch.ops.pyfastpeft.int8_mm_dequant(
        torch.ones(2, 3, dtype=torch.int32), torch.ones(1), torch.ones(3), None, torch.float32
    )


@cases.add(ValueError, "stats has 5 elements, one per row of q needs 4")
def int8_dequant_op_called_directly_with_short_stats():
    torch.ops.pyfastpeft.int8_vectorwise_dequant(torch.ones(4, 3, dtype=torch.int8), torch.ones(5), 0)


@cases.add(ValueError, r"their dim 1 \(K\) must match")
def int8_matmul_op_called_directly_with_mismatched_k():
    torch.ops.pyfastpeft.int8_matmul(torch.ones(2, 8, dtype=torch.int8), torch.ones(3, 9, dtype=torch.int8))


# ---- LoRA --------------------------------------------------------------------------------------------------


def _lora_args(rank=2, out_features=4, in_features=8):
    return (
        torch.randn(3, in_features),
        torch.randn(out_features, in_features),
        None,
        torch.randn(rank, in_features),
        torch.randn(out_features, rank),
    )


@cases.add(ValueError, "scaling must be finite, got nan")
def lora_scaling_nan():
    lora_linear(*_lora_args(), math.nan)


@cases.add(ValueError, "threshold must be finite, got nan")
def lora_over_int8_with_nan_threshold():
    x, _, _, lora_A, lora_B = _lora_args()
    lora_linear(x, (torch.ones(4, 8, dtype=torch.int8), torch.ones(4), math.nan), None, lora_A, lora_B, 1.0)


@cases.add(ValueError, "dropout_p must be < 1.0, got 1.0")
def lora_dropout_of_one():
    lora_linear(*_lora_args(), 1.0, dropout_p=1.0, training=True)


@cases.add(TypeError, "training must be a bool")
def lora_training_not_a_bool():
    lora_linear(*_lora_args(), 1.0, dropout_p=0.1, training="yes")


@cases.add(ValueError, "rng must be None")
def lora_op_called_directly_with_a_short_rng():
    x, weight, _, lora_A, lora_B = _lora_args()
    torch.ops.pyfastpeft.lora_forward(x, weight, None, lora_A, lora_B, 1.0, 0.1, torch.zeros(1, dtype=torch.int64))


@cases.add(ValueError, r"rng must be None \(no dropout\) or the int64 pair \(seed, offset\) of shape \[2\]")
def lora_op_called_directly_with_a_two_dimensional_rng():
    x, weight, _, lora_A, lora_B = _lora_args()
    torch.ops.pyfastpeft.lora_forward(x, weight, None, lora_A, lora_B, 1.0, 0.1, torch.tensor([[1, 2]]))


@cases.add(ValueError, r"keep must be a contiguous int64 \[3, 1\]")
def lora_op_called_directly_with_a_short_keep():
    x, weight, _, lora_A, lora_B = _lora_args()
    keep = torch.zeros(2, 1, dtype=torch.int64)
    torch.ops.pyfastpeft.lora_forward(x, weight, None, lora_A, lora_B, 1.0, 0.1, torch.tensor([1, 2]), keep)


@cases.add(TypeError, "keep")
def lora_backward_op_called_directly_with_an_int32_keep():
    x, weight, _, lora_A, lora_B = _lora_args()
    keep = torch.zeros(3, 1, dtype=torch.int32)
    rng = torch.tensor([1, 2])
    torch.ops.pyfastpeft.lora_backward(torch.randn(3, 4), x, weight, lora_A, lora_B, torch.randn(3, 2), 1.0, 0.1, rng,
                                       True, keep)  # fmt: skip


@cases.add(ValueError, r"keep must be a contiguous int64 \[3, 1\]")
def lora_backward_op_called_directly_with_a_strided_keep():
    x, weight, _, lora_A, lora_B = _lora_args()
    keep = torch.zeros(3, 2, dtype=torch.int64)[:, :1]
    rng = torch.tensor([1, 2])
    torch.ops.pyfastpeft.lora_backward(torch.randn(3, 4), x, weight, lora_A, lora_B, torch.randn(3, 2), 1.0, 0.1, rng,
                                       True, keep)  # fmt: skip


@cases.add(ValueError, "without dropout")
def lora_op_called_directly_with_keep_but_no_rng():
    x, weight, _, lora_A, lora_B = _lora_args()
    keep = torch.zeros(3, 1, dtype=torch.int64)
    torch.ops.pyfastpeft.lora_forward(x, weight, None, lora_A, lora_B, 1.0, 0.0, None, keep)


@cases.add(ValueError, r"xa has shape \(2, 2\), expected \[3, 2\]")
def lora_backward_op_called_directly_with_short_xa():
    x, weight, _, lora_A, lora_B = _lora_args()
    torch.ops.pyfastpeft.lora_backward(
        torch.randn(3, 4),
        x,
        weight,
        lora_A,
        lora_B,
        torch.randn(2, 2),
        1.0,
        0.0,
        None,
        True,
    )


@cases.add(ValueError, r"row_adapter must lie in \[-1, 1\)")
def lora_multi_op_called_directly_with_adapter_out_of_range():
    x, weight, _, lora_A, lora_B = _lora_args()
    torch.ops.pyfastpeft.lora_multi_forward(
        x,
        weight,
        None,
        lora_A,
        lora_B,
        torch.tensor([0, 2]),
        torch.ones(1),
        torch.tensor([0, 5, 0]),
        2,
        0.0,
        None,
    )


@cases.add(ValueError, "row_order must lie in")
def lora_multi_backward_op_called_directly_with_row_order_out_of_range():
    x, weight, _, lora_A, lora_B = _lora_args()
    torch.ops.pyfastpeft.lora_multi_backward(
        torch.randn(3, 4),
        x,
        weight,
        lora_A,
        lora_B,
        torch.tensor([0, 2]),
        torch.ones(1),
        torch.randn(3, 2),
        torch.tensor([0, 1, 99]),
        torch.tensor([0, 3]),
        0.0,
        None,
        True,
    )


@cases.add(ValueError, "weight requires grad")
def lora_multi_with_a_trainable_dense_base():
    x, weight, _, lora_A, lora_B = _lora_args()
    lora_linear_multi(x, weight.requires_grad_(), None, [(lora_A, lora_B, 1.0)], torch.zeros(3, dtype=torch.int64))


def test_lora_trainable_dense_base_gets_its_gradient():
    x, weight, _, lora_A, lora_B = _lora_args()
    weight.requires_grad_()
    lora_linear(x, weight, None, lora_A, lora_B, 2.0).sum().backward()
    expected = torch.ones(3, 4).t() @ x
    torch.testing.assert_close(weight.grad, expected)


# ---- norms, SwiGLU, RoPE, flce ---------------------------------------------------------------------------------


@cases.add(ValueError, "rstd has 1 elements, one per row of x needs 2")
def rms_norm_backward_op_called_directly_with_short_rstd():
    torch.ops.pyfastpeft.rms_norm_backward(
        torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), torch.ones(1), 0.0, "llama", True
    )


@cases.add(ValueError, r"up has shape \(3, 5\), gate has \(3, 4\)")
def swiglu_op_called_directly_with_mismatched_shapes():
    torch.ops.pyfastpeft.swiglu_forward(torch.randn(3, 4), torch.randn(3, 5))


@cases.add(ValueError, "cos has shape")
def rope_op_called_directly_with_short_cos():
    q = torch.randn(1, 2, 4, 8)
    torch.ops.pyfastpeft.rope(q, q, torch.randn(1, 3, 8), torch.randn(1, 3, 8), False, False)


@cases.add(ValueError, r"q_out_strides \[32, 8, 8, 1\] is not a dense layout")
def rope_op_called_directly_with_overlapping_output_strides():
    q = torch.randn(1, 2, 4, 8)
    torch.ops.pyfastpeft.rope(q, q, torch.randn(1, 4, 8), torch.randn(1, 4, 8), False, True, [32, 8, 8, 1], None)


@cases.add(ValueError, "k_out_strides must keep the last dim contiguous")
def rope_op_called_directly_with_strided_last_dim_out():
    q = torch.randn(1, 2, 4, 8)
    torch.ops.pyfastpeft.rope(q, q, torch.randn(1, 4, 8), torch.randn(1, 4, 8), False, True, None, [128, 64, 16, 2])


@cases.add(ValueError, "position_ids")
def rope_position_ids_out_of_range():
    q = torch.randn(1, 2, 4, 8)
    table = torch.randn(16, 8)
    apply_rotary_pos_emb(q, q, table, table, position_ids=torch.tensor([[0, 1, 2, 16]]))


# ---- attention: every size a kernel indexes by (heads, lengths, head_dim, lse's rows) is checked against the data --


@cases.add(ValueError, "attention_forward: q has 4 heads, not a multiple of k's 3")
def attention_op_called_directly_with_heads_not_a_multiple_of_kv_heads():
    kv = torch.randn(1, 3, 5, 8)
    torch.ops.pyfastpeft.attention_forward(torch.randn(1, 4, 5, 8), kv, kv, 0.5, True)


@cases.add(ValueError, r"attention_forward: v has shape \(1, 2, 4, 8\), k has \(1, 2, 5, 8\)")
def attention_op_called_directly_with_short_v():
    torch.ops.pyfastpeft.attention_forward(
        torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8), 0.5, False
    )


@cases.add(ValueError, r"attention_backward: lse has shape \(1, 4, 3\), expected \[B, H, Sq\] = \(1, 4, 5\)")
def attention_backward_op_called_directly_with_short_lse():
    q, kv = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    torch.ops.pyfastpeft.attention_backward(q, q, kv, kv, q, torch.randn(1, 4, 3), 0.5, True)


@cases.add(ValueError, r"scaled_dot_product_attention: key has shape \(1, 2, 5, 16\), incompatible with query's")
def attention_with_key_of_another_head_dim():
    kv = torch.randn(1, 2, 5, 16)
    scaled_dot_product_attention(torch.randn(1, 4, 5, 8), kv, kv)


def flce_settings(bias_grad: bool = False):
    """flce_forward's arguments after bias: no class weight, ignore_index -100, no smoothing, softcap or z-loss,
    mean, no predictions, dh and dW asked, dbias as given, the default chunk."""
    return (None, -100, 0.0, 0.0, 0.0, "mean", False, True, True, bias_grad, 0)


@cases.add(ValueError, "labels has 2 elements, one per row of hidden needs 3")
def flce_op_called_directly_with_short_labels():
    labels = torch.zeros(2, dtype=torch.int64)
    torch.ops.pyfastpeft.flce_forward(
        torch.randn(3, 8), torch.randn(10, 8), labels, None, *flce_settings(bias_grad=False)
    )


@cases.add(ValueError, "need_grad_bias is True but bias is None")
def flce_op_called_directly_asking_the_gradient_of_no_bias():
    labels = torch.zeros(3, dtype=torch.int64)
    torch.ops.pyfastpeft.flce_forward(
        torch.randn(3, 8), torch.randn(10, 8), labels, None, *flce_settings(bias_grad=True)
    )


@cases.add(ValueError, "labels must be in")
def flce_label_out_of_vocabulary():
    fused_linear_cross_entropy(torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 10, 2]))


@cases.add(ValueError, r"hidden size\) must be >= 1")
def rms_norm_of_rows_without_features():
    rms_norm(torch.randn(3, 0), torch.ones(0))


@cases.add(ValueError, r"both must be >= 1")
def lora_layer_without_input_features():
    lora_linear(torch.randn(3, 0), torch.randn(4, 0), None, torch.randn(2, 0), torch.randn(4, 2), 1.0)


@cases.add(ValueError, "weight must have at least one row")
def flce_op_called_directly_with_no_vocabulary():
    labels = torch.zeros(3, dtype=torch.int64)
    torch.ops.pyfastpeft.flce_forward(torch.randn(3, 8), torch.randn(0, 8), labels, None, *flce_settings())


@cases.add(ValueError, "student_weight must have at least one row")
def distill_op_called_directly_with_no_vocabulary():
    h, w, labels = torch.randn(3, 8), torch.randn(0, 8), torch.zeros(3, dtype=torch.int64)
    torch.ops.pyfastpeft.distill_forward(
        h, w, h, w, labels, None, None, -100, 0.5, 1.0, 0.0, "mean", True, False, False, 0
    )


@cases.add(ValueError, "weight must have at least one row")
def preference_op_called_directly_with_no_vocabulary():
    h, labels = torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.int64)
    settings = ("orpo", 0.1, 0.0, 0.0, 1.0, -100, 0.0, True, False, False, 0)
    torch.ops.pyfastpeft.preference_forward(h, torch.randn(0, 8), labels, None, None, None, *settings)


@pytest.mark.parametrize("name", cases.names())
def test_bad_argument_raises_cleanly(name):
    assert_raises_cleanly(cases, name)


def test_empty_inputs_give_empty_results():
    x = torch.randn(0, 8)
    torch.testing.assert_close(rms_norm(x, torch.ones(8)), x)
    torch.testing.assert_close(swiglu(x, x), x)
    torch.testing.assert_close(swiglu(x.t(), x.t()), x.t())


@pytest.mark.parametrize("name", ["reference", "native"])
def test_quantization_ops_are_not_differentiable_on_any_backend(name):
    x = torch.randn(4, 8, requires_grad=True)
    with backend.use_backend(name):
        _, stats, _ = int8_vectorwise_quant(x)
        qt = quantize(x)
        y = dequantize(qt)
    assert not stats.requires_grad and not qt.scale.requires_grad and not y.requires_grad
    y2 = fake_quantize(x)  # straight-through: the one quantizer with a gradient, on every backend
    y2.sum().backward()
    assert x.grad is not None and torch.all(x.grad == 1)
