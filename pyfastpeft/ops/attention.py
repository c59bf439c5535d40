"""Scaled dot-product attention: custom ops, backend table, autograd and the public function (torch's SDPA).

Ops (q [B, H, Sq, D]; k, v [B, Hkv, Sk, D] with H % Hkv == 0; any strides; one float dtype):
  pyfastpeft::attention_forward(q, k, v, scale, causal) -> (out, lse)
  pyfastpeft::attention_backward(dout, q, k, v, out, lse, scale, causal) -> (dq, dk, dv)
out [B, H, Sq, D] in q's dtype; lse [B, H, Sq] = logsumexp of each query's visible scores, fp32 (fp64 for fp64),
contiguous. The math (grouped-query heads, top-left causal mask, the backward's formulas) is in
pyfastpeft/reference/attention.py.

Layouts: the kernels write through strides, so out is laid out as q, and dq, dk, dv as q, k, v (_like): HF hands q
as a transposed view of [B, S, H, D], and an out in that layout makes HF's later `out.transpose(1, 2).contiguous()`
free. Inputs are read through their strides; only one whose last dim is not contiguous is copied first.

Backends: the native CPU kernel; the reference everywhere else (no Triton or CUDA kernel: on CUDA, torch's own flash
SDPA is the fast path, see pyfastpeft/backend.py), and for empty inputs on the CPU.
"""

from __future__ import annotations

import math

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops._autocast import autocast_dtype
from pyfastpeft.ops._checks import (
    check_bool,
    check_dtype,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from pyfastpeft.ops._library import define_op
from pyfastpeft.reference import attention as ref
from pyfastpeft.reference._common import accumulate_dtype


def _like(t: torch.Tensor) -> torch.Tensor:
    """An output of t's shape and dtype, as rope's outputs are made: empty_like keeps t's strides where t is dense
    without overlap (HF's transposed views stay transposed) and is contiguous elsewhere; a last dim that is not
    contiguous gives a contiguous output. The fake impls and every backend agree on this."""
    return torch.empty_like(t) if t.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _forward_outputs(q):
    lse = torch.empty(q.shape[:3], dtype=accumulate_dtype(q.dtype), device=q.device)
    return _like(q), lse


def _is_empty(q, k) -> bool:
    """Any of B, H, Sq, Sk, D zero: nothing for a kernel to do (the reference makes the empty or zero results)."""
    return q.numel() == 0 or k.numel() == 0


def _kernel_input(t: torch.Tensor) -> torch.Tensor:
    """t as the kernels read it: any strides of (batch, head, position), the last dim contiguous."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _strides(t: torch.Tensor) -> list[int]:
    """Element strides of (batch, head, position)."""
    return list(t.stride()[:3])


def forward_into(q, k, v, out, lse, scale: float, causal: bool) -> None:
    """Native forward into preallocated out (any strides) and lse (contiguous); every last dim contiguous."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    args = (
        q,
        k,
        v,
        out,
        lse,
        *(_strides(t) for t in (q, k, v, out)),
        batch,
        heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim,
        q.dtype,
        scale,
        causal,
    )
    _native.launch("attention_forward", q, *args)


def backward_into(dout, q, k, v, out, lse, dq, dk, dv, scale: float, causal: bool) -> None:
    """Native backward into preallocated dq, dk, dv (any strides); lse contiguous, every last dim contiguous."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    args = (
        dout,
        q,
        k,
        v,
        out,
        lse,
        dq,
        dk,
        dv,
        *(_strides(t) for t in (dout, q, k, v, out, dq, dk, dv)),
        batch,
        heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim,
        q.dtype,
        scale,
        causal,
    )
    _native.launch("attention_backward", q, *args)


def _native_forward(q, k, v, scale, causal):
    if _is_empty(q, k):
        return _reference_forward(q, k, v, scale, causal)
    out, lse = (_native.on_huge_pages(t) for t in _forward_outputs(q))
    forward_into(*(_kernel_input(t) for t in (q, k, v)), out, lse, scale, causal)
    return out, lse


def _native_backward(dout, q, k, v, out, lse, scale, causal):
    if _is_empty(q, k):
        return _reference_backward(dout, q, k, v, out, lse, scale, causal)
    dq, dk, dv = (_native.on_huge_pages(_like(t)) for t in (q, k, v))
    inputs = (_kernel_input(t) for t in (dout, q, k, v, out))
    backward_into(*inputs, lse.contiguous(), dq, dk, dv, scale, causal)
    return dq, dk, dv


def _reference_forward(q, k, v, scale, causal):
    out_ref, lse_ref = ref.attention_forward(q, k, v, scale, causal)
    out, lse = _forward_outputs(q)
    return out.copy_(out_ref), lse.copy_(lse_ref)


def _reference_backward(dout, q, k, v, out, lse, scale, causal):
    grads = ref.attention_backward(dout, q, k, v, out, lse, scale, causal)
    return tuple(_like(t).copy_(grad) for t, grad in zip((q, k, v), grads))


def _fake_shapes(op: str, q, k, v) -> None:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: f"{op}: q, k and v must be 4-D")
    torch._check(k.shape == v.shape, lambda: f"{op}: k and v must have one shape")
    torch._check(
        k.shape[0] == q.shape[0] and k.shape[3] == q.shape[3], lambda: f"{op}: q and k must share batch and head_dim"
    )
    torch._check(k.shape[1] >= 1 and q.shape[1] % k.shape[1] == 0, lambda: f"{op}: q's heads must be a multiple of k's")


def _fake_forward(q, k, v, scale, causal):
    _fake_shapes("attention_forward", q, k, v)
    return _forward_outputs(q)


def _fake_backward(dout, q, k, v, out, lse, scale, causal):
    _fake_shapes("attention_backward", q, k, v)
    torch._check(dout.shape == q.shape and out.shape == q.shape, lambda: "attention_backward: dout, out like q")
    torch._check(lse.shape == q.shape[:3], lambda: "attention_backward: lse must be [B, H, Sq]")
    return tuple(_like(t) for t in (q, k, v))


def check_qkv(op: str, q, k, v, names=("q", "k", "v")) -> None:
    """q [B, H, Sq, D], k and v [B, Hkv, Sk, D] of one float dtype, Hkv >= 1 dividing H. names: the caller's names
    of q, k and v (the public function's are query, key and value)."""
    q_name, k_name, v_name = names
    for name, t in zip(names, (q, k, v)):
        check_tensor(op, name, t, dim=4)
    check_same_dtype(op, **{q_name: q, k_name: k, v_name: v})
    if k.shape != v.shape:
        raise ValueError(f"{op}: {v_name} has shape {tuple(v.shape)}, {k_name} has {tuple(k.shape)}; they must match")
    batch, heads, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"{op}: {k_name} has shape {tuple(k.shape)}, incompatible with {q_name}'s {tuple(q.shape)} "
            "(batch and head_dim must match)"
        )
    kv_heads = k.shape[1]
    if kv_heads < 1:
        raise ValueError(f"{op}: {k_name} has shape {tuple(k.shape)}, it needs at least one head")
    if heads % kv_heads:
        raise ValueError(
            f"{op}: {q_name} has {heads} heads, not a multiple of {k_name}'s {kv_heads} (grouped-query attention)"
        )


def _check_forward(q, k, v, scale, causal):
    op = "attention_forward"
    check_qkv(op, q, k, v)
    check_real(op, "scale", scale)
    check_bool(op, "causal", causal)


def _check_backward(dout, q, k, v, out, lse, scale, causal):
    op = "attention_backward"
    check_qkv(op, q, k, v)
    for name, t in (("dout", dout), ("out", out)):
        check_tensor(op, name, t, dim=4)
        check_dtype(op, name, t, (q.dtype,))
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, q has {tuple(q.shape)}")
    check_dtype(op, "lse", lse, (accumulate_dtype(q.dtype),))
    if lse.shape != q.shape[:3]:
        raise ValueError(f"{op}: lse has shape {tuple(lse.shape)}, expected [B, H, Sq] = {tuple(q.shape[:3])}")
    check_real(op, "scale", scale)
    check_bool(op, "causal", causal)


attention_forward = define_op(
    "attention_forward",
    "(Tensor q, Tensor k, Tensor v, float scale, bool causal) -> (Tensor, Tensor)",
    family="attention",
    fake=_fake_forward,
    reference=_reference_forward,
    native=_native_forward,
    triton=_reference_forward,
    check=_check_forward,
)
attention_backward = define_op(
    "attention_backward",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, bool causal)"
    " -> (Tensor, Tensor, Tensor)",
    family="attention",
    fake=_fake_backward,
    reference=_reference_backward,
    native=_native_backward,
    triton=_reference_backward,
    check=_check_backward,
)


@carry_backend
class AttentionFunction(torch.autograd.Function):
    """out = softmax(scale * q k^T (causal-masked)) v; the backward recomputes P from the saved lse."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, causal: bool):
        out, lse = attention_forward(q, k, v, scale, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal = scale, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None


def _autocast(*tensors):
    """torch's SDPA is on autocast's lower-precision list: under autocast its fp32, fp16 and bf16 inputs run in the
    autocast dtype (fp64 ones stay, as autocast leaves fp64 alone)."""
    dtype = autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    return tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention without a mask or dropout, grouped-query heads built in
    (torch's enable_gqa=True): softmax(scale * query key^T) value.

    query [B, H, Sq, D], key and value [B, Hkv, Sk, D] with H a multiple of Hkv (query head h reads kv head
    h // (H // Hkv)); any strides (HF's transposed views of [B, S, H, D] are read in place, and the output takes
    query's layout). is_causal: query i sees keys j <= i (top-left aligned, as torch's is_causal, also when
    Sq != Sk). scale: None is 1 / sqrt(D). An attention mask or dropout is the caller's to route to torch's SDPA.
    Under autocast, fp32/fp16/bf16 inputs are cast to the autocast dtype first, as torch's SDPA does.
    """
    fn = "scaled_dot_product_attention"
    names = ("query", "key", "value")
    for name, t in zip(names, (query, key, value)):
        check_tensor(fn, name, t, dim=4)
    check_same_device(fn, query=query, key=key, value=value)
    query, key, value = _autocast(query, key, value)
    check_qkv(fn, query, key, value, names)
    check_bool(fn, "is_causal", is_causal)
    head_dim = query.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    scale = check_real(fn, "scale", scale)
    return AttentionFunction.apply(query, key, value, scale, is_causal)
