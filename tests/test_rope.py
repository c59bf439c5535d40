import contextlib

import pytest
import torch
from helpers import (
    BACKENDS,
    CPU_BF16,
    CPU_ISAS,
    DEVICES,
    DTYPES,
    assert_close,
    assert_no_less_accurate,
    cpu_avx512_bf16,
    cpu_isa,
    grads_of,
    on_device_unsupported,
    run,
    skip_unsupported,
)
from transformers.models.llama import modeling_llama

import pyfastpeft
from pyfastpeft.functional import apply_rotary_pos_emb
from pyfastpeft.reference.rope import rotate_every_two


def hf_tables(batch, seq, rot, dtype, interleaved=False):
    """cos/sin [B, S, R] as HF builds them (halves duplicated, or pairs repeated for GPT-J)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = (torch.arange(seq).float()[None, :, None] + torch.arange(batch).float()[:, None, None]) * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def hf_layout(batch, heads, seq, dim, dtype):
    """q or k the way HF attention hands them over: a transposed view of [B, S, H, D]."""
    return torch.randn(batch, seq, heads, dim).to(dtype).transpose(1, 2)


def gptj_rope(x, cos, sin):
    rot = cos.shape[-1]
    c, s = cos[:, None], sin[:, None]
    return torch.cat((x[..., :rot] * c + rotate_every_two(x[..., :rot]) * s, x[..., rot:]), dim=-1)


CASES = [  # batch, q heads, k heads, seq, head_dim, rotary width
    (1, 4, 4, 5, 16, 16),
    (2, 8, 2, 7, 64, 64),  # GQA
    (2, 4, 1, 3, 32, 16),  # partial rotary
    (1, 2, 2, 1, 128, 128),  # one position
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_rope_forward_and_backward_match_reference(backend, dtype, interleaved, case):
    skip_unsupported(backend, dtype, 1)
    batch, hq, hk, seq, dim, rot = case
    q, k = hf_layout(batch, hq, seq, dim, dtype), hf_layout(batch, hk, seq, dim, dtype)
    cos, sin = hf_tables(batch, seq, rot, dtype, interleaved)
    dq, dk = torch.randn(q.shape).to(dtype), torch.randn(k.shape).to(dtype)
    results = {}
    for name in (backend, "reference"):
        qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
        q_out, k_out = run(name, apply_rotary_pos_emb, qg, kg, cos, sin, interleaved=interleaved)
        torch.autograd.backward((q_out, k_out), (dq, dk))
        results[name] = (q_out, k_out, qg.grad, kg.grad)
    for ours, ref in zip(results[backend], results["reference"]):
        assert_close(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_transformers(dtype):
    q, k = hf_layout(2, 8, 9, 64, dtype), hf_layout(2, 2, 9, 64, dtype)
    cos, sin = hf_tables(2, 9, 64, dtype)
    for ours, theirs in zip(apply_rotary_pos_emb(q, k, cos, sin), modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)):
        assert_close(ours, theirs)


# (backend, CPU ISA): the native kernels on each ISA, and the Triton kernel (the interpreter here; on a GPU its launch
# turns fp fusion off, which .ci/compile_gpu holds it to)
BITWISE_RUNS = [("native", isa) for isa in CPU_ISAS] + ([("triton", None)] if "triton" in BACKENDS else [])


@pytest.mark.parametrize("backend, isa", BITWISE_RUNS)
def test_rope_fp32_is_bitwise_transformers(backend, isa):
    # Both take each product, then the sum, in fp32 with one rounding each (no fused multiply-add): the same bits,
    # forward and backward (autograd's two gradient terms are the kernel's two products).
    q, k = hf_layout(2, 8, 19, 80, torch.float32), hf_layout(2, 2, 19, 80, torch.float32)
    cos, sin = hf_tables(2, 19, 80, torch.float32)
    dq, dk = torch.randn(q.shape), torch.randn(k.shape)
    results = []
    for fn in (apply_rotary_pos_emb, modeling_llama.apply_rotary_pos_emb):
        with cpu_isa(isa) if isa else contextlib.nullcontext(), pyfastpeft.use_backend(backend):
            qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
            q_out, k_out = fn(qg, kg, cos, sin)
            torch.autograd.backward((q_out, k_out), (dq, dk))
        results.append((q_out, k_out, qg.grad, kg.grad))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_rope_unsqueeze_dim_2_takes_bshd_layout():
    q, k = torch.randn(2, 6, 4, 32), torch.randn(2, 6, 2, 32)
    cos, sin = hf_tables(2, 6, 32, torch.float32)
    for ours, theirs in zip(
        apply_rotary_pos_emb(q, k, cos, sin, 2), modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    ):
        assert_close(ours, theirs)


def test_rope_keeps_the_transposed_layout_of_hf_views():
    q, k = hf_layout(1, 4, 8, 16, torch.float32), hf_layout(1, 2, 8, 16, torch.float32)
    cos, sin = hf_tables(1, 8, 16, torch.float32)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()


def test_rope_partial_rotary_passes_tail_through():
    q, k = hf_layout(1, 2, 4, 32, torch.float32), hf_layout(1, 2, 4, 32, torch.float32)
    cos, sin = hf_tables(1, 4, 8, torch.float32)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(q_out[..., 8:], q[..., 8:]) and torch.equal(k_out[..., 8:], k[..., 8:])
    ref_q, _ = modeling_llama.apply_rotary_pos_emb(q[..., :8], k[..., :8], cos, sin)
    assert_close(q_out[..., :8], ref_q)


def test_rope_interleaved_matches_gptj_formula():
    q, k = hf_layout(2, 4, 5, 16, torch.float32), hf_layout(2, 4, 5, 16, torch.float32)
    cos, sin = hf_tables(2, 5, 16, torch.float32, interleaved=True)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, interleaved=True)
    assert_close(q_out, gptj_rope(q, cos, sin))
    assert_close(k_out, gptj_rope(k, cos, sin))


def test_rope_position_ids_index_a_table():
    table_cos, table_sin = hf_tables(1, 32, 16, torch.float32)
    position_ids = torch.tensor([[3, 4, 5], [10, 0, 7]])
    q, k = hf_layout(2, 2, 3, 16, torch.float32), hf_layout(2, 2, 3, 16, torch.float32)
    ours = apply_rotary_pos_emb(q, k, table_cos[0], table_sin[0], position_ids=position_ids)
    theirs = modeling_llama.apply_rotary_pos_emb(q, k, table_cos[0][position_ids], table_sin[0][position_ids])
    for a, b in zip(ours, theirs):
        assert_close(a, b)


def test_rope_cos_of_shape_s_d_broadcasts_over_batch():
    q, k = hf_layout(3, 2, 4, 16, torch.float32), hf_layout(3, 1, 4, 16, torch.float32)
    cos, sin = hf_tables(1, 4, 16, torch.float32)
    ours = apply_rotary_pos_emb(q, k, cos[0], sin[0])
    theirs = modeling_llama.apply_rotary_pos_emb(q, k, cos.expand(3, -1, -1), sin.expand(3, -1, -1))
    for a, b in zip(ours, theirs):
        assert_close(a, b)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_rope_every_cpu_isa_agrees(isa, dtype):
    q, k = hf_layout(2, 3, 5, 48, dtype), hf_layout(2, 1, 5, 48, dtype)
    cos, sin = hf_tables(2, 5, 32, dtype)
    with cpu_isa(isa):
        ours = apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(ours, run("reference", apply_rotary_pos_emb, q, k, cos, sin)):
        assert_close(a, b)


def with_specials(x):
    """x with NaN, infinities, zeros of both signs and subnormal-sized values (whose products are subnormal in fp32
    and bf16) spread over it, so the vector loops, their masked tails and their rounding see each."""
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3e-39, -2e-39, 1e-40, 65000.0])
    flat = x.detach().clone().reshape(-1)
    picked = torch.arange(0, flat.numel(), max(1, flat.numel() // 40))
    flat[picked] = specials[torch.arange(len(picked)) % len(specials)].to(x.dtype)
    return flat.reshape(x.shape)


ISA_CASES = [  # batch, q heads, k heads, seq, head_dim, rotary width: whole vectors, masked tails, partial rotary
    (2, 3, 1, 19, 48, 32),
    (1, 2, 2, 21, 80, 80),
    (1, 4, 2, 9, 128, 128),
    (1, 2, 1, 17, 40, 38),
]


@pytest.mark.parametrize("bf16_stores", CPU_BF16)
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("case", ISA_CASES)
def test_rope_every_cpu_isa_gives_the_same_bits(isa, bf16_stores, dtype, interleaved, case):
    # The AVX-512 rows take the scalar loop's products and sum in its order, and its rounding; the backward's
    # contiguous grads into HF's transposed layout take the tiled order (more than one tile of positions here).
    batch, hq, hk, seq, dim, rot = case
    q = with_specials(hf_layout(batch, hq, seq, dim, dtype))
    k = with_specials(hf_layout(batch, hk, seq, dim, dtype))
    cos, sin = hf_tables(batch, seq, rot, dtype, interleaved)
    dq, dk = with_specials(torch.randn(q.shape).to(dtype)), with_specials(torch.randn(k.shape).to(dtype))
    results = []
    for setting in ((isa, bf16_stores), ("scalar", False)):
        with cpu_isa(setting[0]), cpu_avx512_bf16(setting[1]):
            qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
            q_out, k_out = apply_rotary_pos_emb(qg, kg, cos, sin, interleaved=interleaved)
            torch.autograd.backward((q_out, k_out), (dq, dk))
            results.append((q_out, k_out, qg.grad, kg.grad))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for ours, scalar in zip(*results):
        assert ours.stride() == scalar.stride()
        same = ours.contiguous().view(bits) == scalar.contiguous().view(bits)
        assert (same | (ours.isnan() & scalar.isnan())).all()


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gradcheck_float64(backend, interleaved):
    q, k = hf_layout(1, 2, 3, 8, torch.float64), hf_layout(1, 1, 3, 8, torch.float64)
    cos, sin = hf_tables(1, 3, 6, torch.float64)
    with pyfastpeft.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda a, b: apply_rotary_pos_emb(a, b, cos, sin, interleaved=interleaved),
            (q.detach().requires_grad_(), k.detach().requires_grad_()),
        )


def test_rope_gradient_flows_to_cos_and_sin_when_they_require_it():
    q, k = hf_layout(1, 2, 3, 8, torch.float64), hf_layout(1, 1, 3, 8, torch.float64)
    cos, sin = hf_tables(1, 3, 8, torch.float64)
    assert torch.autograd.gradcheck(
        lambda c, s: apply_rotary_pos_emb(q, k, c, s), (cos.requires_grad_(), sin.requires_grad_())
    )


def test_rope_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        q, k = hf_layout(2, 4, 3, 16, dtype), hf_layout(2, 2, 3, 16, dtype)
        cos, sin = hf_tables(2, 3, 12, dtype)
        for backward in (False, True):
            torch.library.opcheck(torch.ops.pyfastpeft.rope.default, (q, k, cos, sin, False, backward))
        contiguous = (list(q.contiguous().stride()), list(k.contiguous().stride()))
        torch.library.opcheck(torch.ops.pyfastpeft.rope.default, (q, k, cos, sin, False, True, *contiguous))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed"])
def test_rope_gradients_leave_in_the_forward_inputs_layout(backend, grad_layout):
    """Eager attention's dq is contiguous [B, H, S, D], SDPA's is q's transposed layout: either way the gradient
    reaching the projections is laid out as they are, so autograd copies nothing before q_proj's backward."""
    skip_unsupported(backend, torch.float32, 1)
    q_proj = torch.randn(2, 5, 4, 16, requires_grad=True)  # [B, S, H, D]
    k_proj = torch.randn(2, 5, 2, 16, requires_grad=True)
    cos, sin = hf_tables(2, 5, 16, torch.float32)
    with pyfastpeft.use_backend(backend):
        q_out, k_out = apply_rotary_pos_emb(q_proj.transpose(1, 2), k_proj.transpose(1, 2), cos, sin)
    assert q_out.stride() == q_proj.transpose(1, 2).stride()
    grads = [torch.randn(t.shape) for t in (q_out, k_out)]
    if grad_layout == "transposed":
        grads = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]
    with pyfastpeft.use_backend(backend):
        dq, dk = torch.autograd.grad((q_out, k_out), (q_proj, k_proj), grads)
    assert dq.stride() == q_proj.stride() and dk.stride() == k_proj.stride()
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(q_proj.transpose(1, 2), k_proj.transpose(1, 2), cos, sin)
    dq_ref, dk_ref = torch.autograd.grad((q_ref, k_ref), (q_proj, k_proj), grads)
    assert_close(dq, dq_ref)
    assert_close(dk, dk_ref)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_rope_op_writes_the_output_strides_it_is_given(backend):
    skip_unsupported(backend, torch.float32, 1)
    q, k = (torch.randn(2, h, 3, 8) for h in (4, 2))  # contiguous [B, H, S, D]
    cos, sin = hf_tables(2, 3, 8, torch.float32)
    q_strides = list(torch.empty(2, 3, 4, 8).transpose(1, 2).stride())
    k_strides = list(torch.empty(2, 2, 3, 8).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).stride())
    with pyfastpeft.use_backend(backend):
        q_out, k_out = torch.ops.pyfastpeft.rope(q, k, cos, sin, False, True, q_strides, k_strides)
        q_plain, k_plain = torch.ops.pyfastpeft.rope(q, k, cos, sin, False, True)
    assert list(q_out.stride()) == q_strides and list(k_out.stride()) == k_strides
    assert q_plain.is_contiguous() and k_plain.is_contiguous()
    assert torch.equal(q_out, q_plain) and torch.equal(k_out, k_plain)


def test_rope_compiles_fullgraph():
    q, k = hf_layout(1, 4, 6, 16, torch.float32), hf_layout(1, 2, 6, 16, torch.float32)
    cos, sin = hf_tables(1, 6, 16, torch.float32)
    q.requires_grad_()
    fn = torch.compile(lambda a, b: apply_rotary_pos_emb(a, b, cos, sin), fullgraph=True, backend="aot_eager")
    q_out, k_out = fn(q, k)
    q_out.sum().backward()
    assert_close(q_out, apply_rotary_pos_emb(q, k, cos, sin)[0])


@pytest.mark.slow
def test_rope_compiles_with_inductor():
    q, k = hf_layout(1, 4, 6, 16, torch.float32), hf_layout(1, 2, 6, 16, torch.float32)
    cos, sin = hf_tables(1, 6, 16, torch.float32)
    fn = torch.compile(lambda a, b: apply_rotary_pos_emb(a, b, cos, sin), fullgraph=True)
    assert_close(fn(q, k)[0], apply_rotary_pos_emb(q, k, cos, sin)[0])


# --- bad input -------------------------------------------------------------------------------------


def test_rope_rejects_cos_wider_than_head_dim():
    q, k = hf_layout(1, 2, 3, 8, torch.float32), hf_layout(1, 2, 3, 8, torch.float32)
    cos, sin = hf_tables(1, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="width 16 must be even and <= head_dim 8"):
        apply_rotary_pos_emb(q, k, cos, sin)


def test_rope_rejects_odd_rotary_width():
    q, k = hf_layout(1, 2, 3, 8, torch.float32), hf_layout(1, 2, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="must be even"):
        apply_rotary_pos_emb(q, k, torch.ones(1, 3, 5), torch.ones(1, 3, 5))


def test_rope_rejects_sequence_mismatch():
    q, k = hf_layout(1, 2, 3, 8, torch.float32), hf_layout(1, 2, 3, 8, torch.float32)
    cos, sin = hf_tables(1, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="sequence length 3"):
        apply_rotary_pos_emb(q, k, cos, sin)


def test_rope_rejects_k_with_other_head_dim():
    q, k = hf_layout(1, 2, 3, 8, torch.float32), hf_layout(1, 2, 3, 16, torch.float32)
    cos, sin = hf_tables(1, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="k has shape"):
        apply_rotary_pos_emb(q, k, cos, sin)


def test_rope_rejects_3d_q():
    with pytest.raises(ValueError, match="q must be 4-D"):
        apply_rotary_pos_emb(torch.randn(2, 3, 8), torch.randn(1, 2, 3, 8), torch.ones(3, 8), torch.ones(3, 8))


def test_rope_rejects_dtype_mismatch_between_q_and_k():
    q, k = hf_layout(1, 2, 3, 8, torch.float32), hf_layout(1, 2, 3, 8, torch.float16)
    cos, sin = hf_tables(1, 3, 8, torch.float32)
    with pytest.raises(TypeError, match="k has dtype"):
        apply_rotary_pos_emb(q, k, cos, sin)


def test_rope_rejects_device_mismatch():
    q, k = hf_layout(1, 2, 3, 8, torch.float32), hf_layout(1, 2, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="cos is on meta"):
        apply_rotary_pos_emb(q, k, torch.ones(3, 8, device="meta"), torch.ones(3, 8))


def test_rope_non_contiguous_last_dim_is_handled():
    q = torch.randn(1, 2, 16, 3).transpose(2, 3)  # head_dim stride 3
    k = hf_layout(1, 2, 3, 16, torch.float32)
    cos, sin = hf_tables(1, 3, 16, torch.float32)
    for a, b in zip(apply_rotary_pos_emb(q, k, cos, sin), modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)):
        assert_close(a, b)


def test_rope_zero_length_sequence():
    q, k = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)
    q_out, k_out = apply_rotary_pos_emb(q, k, torch.ones(0, 8), torch.ones(0, 8))
    assert q_out.shape == q.shape and k_out.shape == k.shape


def test_rope_propagates_nan_like_reference():
    q, k = hf_layout(1, 2, 3, 8, torch.float32), hf_layout(1, 2, 3, 8, torch.float32)
    q[0, 1, 2, 0] = float("nan")
    cos, sin = hf_tables(1, 3, 8, torch.float32)
    for a, b in zip(apply_rotary_pos_emb(q, k, cos, sin), modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)):
        assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("case", [(1, 32, 8, 2048, 128, 128), (2, 4, 1, 7, 64, 32), (1, 3, 3, 1, 80, 80)])
def test_rope_on_each_device_matches_reference(device, backend, dtype, interleaved, case):
    """q and k as attention hands them (transposed views), GQA and partial rotary; the output keeps q's strides."""
    batch, hq, hk, seq, dim, rot = case
    on_device_unsupported(device, backend, dtype, batch * seq * hq * dim)
    q = torch.randn(batch, seq, hq, dim, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, hk, dim, device=device).to(dtype).transpose(1, 2)
    cos, sin = (torch.randn(batch, seq, rot, device=device).to(dtype) for _ in range(2))
    dy = (torch.randn(q.shape, device=device).to(dtype), torch.randn(k.shape, device=device).to(dtype))
    fn = lambda a, b: apply_rotary_pos_emb(a, b, cos, sin, interleaved=interleaved)  # noqa: E731
    ours, ref = grads_of(backend, fn, (q, k), dy), grads_of("reference", fn, (q, k), dy)
    assert ours[0].stride() == q.stride()
    if dtype == torch.float32:  # each product and the sum rounded once on every backend and device: the same bits
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
        return
    # half precision: ours rounds once from fp32, the eager reference after each product, which loses more where
    # q cos and rotate(q) sin cancel; so no less accurate than it against the fp64 result
    exact_fn = lambda a, b: apply_rotary_pos_emb(  # noqa: E731
        a, b, cos.double(), sin.double(), interleaved=interleaved
    )
    exact = grads_of("reference", exact_fn, (q.double(), k.double()), tuple(t.double() for t in dy))
    for a, b, e in zip(ours, ref, exact):
        assert_no_less_accurate(a, b, e, dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dim, rot", [(128, 128), (96, 80)])
def test_rope_large_outputs_are_bitwise_the_small_ones(isa, dtype, interleaved, dim, rot):
    # From 16 MiB of output a call (q and k), the AVX-512 rows write by streaming stores where aligned: the same bits
    # as the same positions in small calls, which store plainly. 80 of 96 channels rotate (a 16-step and a tail).
    seq = (1024 if dtype == torch.float32 else 2048) * 128 // dim
    q, k = hf_layout(1, 32, seq, dim, dtype), hf_layout(1, 8, seq, dim, dtype)
    cos, sin = hf_tables(1, seq, rot, dtype, interleaved)
    with cpu_isa(isa):
        q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved)
        parts = [
            apply_rotary_pos_emb(q[:, :, s : s + 128], k[:, :, s : s + 128], cos[:, s : s + 128], sin[:, s : s + 128],
                                 interleaved=interleaved)
            for s in range(0, seq, 128)
        ]  # fmt: skip
    assert q_out.nbytes + k_out.nbytes >= 16 << 20
    assert torch.equal(q_out, torch.cat([p[0] for p in parts], dim=2))
    assert torch.equal(k_out, torch.cat([p[1] for p in parts], dim=2))
