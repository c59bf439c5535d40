"""RoPE: custom op, backend table, autograd and the public function (transformers' signature).

Op (q [B, Hq, S, D], k [B, Hk, S, D] with any strides; cos, sin [Bc, S, R], Bc in (1, B), R even <= D):
  pyfastpeft::rope(q, k, cos, sin, interleaved, backward) -> (q_out, k_out)
q and k are rotated in one launch; outputs keep the inputs' memory layout (HF hands q and k as
transposed views of the projection output: the kernels take strides, nothing is copied).
backward=True applies the transposed rotation, which is the gradient. Math in reference/rope.py.
q_out_strides / k_out_strides (optional): the outputs' strides instead, any dense layout of q's / k's shape
with its last dim contiguous. The backward asks for the forward inputs' layout: a gradient that arrives
contiguous (eager attention's) then leaves in the projections' layout, and the copy into it that autograd
would make before q_proj's backward (a pass over q and k, into fresh memory) is not needed.
"""

from __future__ import annotations

import torch

from pyfastpeft import _native
from pyfastpeft.backend import carry_backend
from pyfastpeft.ops import _dtensor
from pyfastpeft.ops._checks import FLOAT_DTYPES, check_dtype, check_same_device, check_same_dtype, check_tensor
from pyfastpeft.ops._library import define_op, triton_module
from pyfastpeft.reference import rope as ref


def rope_into(q, k, q_out, k_out, cos, sin, interleaved: bool, backward: bool) -> None:
    """Native rotation into preallocated outputs. Every tensor's last dim contiguous, cos and sin
    with the same strides, one dtype."""
    batch, q_heads, seq, head_dim = q.shape
    args = (
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        list(q.stride()[:3]),
        list(k.stride()[:3]),
        list(q_out.stride()[:3]),
        list(k_out.stride()[:3]),
        0 if cos.shape[0] == 1 else cos.stride(0),
        cos.stride(1),
        batch,
        seq,
        q_heads,
        k.shape[1],
        head_dim,
        cos.shape[-1],
        q.dtype,
        interleaved,
        backward,
    )
    _native.launch("rope", q, *args)


def _out_like(t):
    """An output for t: t's memory layout when its last dim is contiguous (HF's transposed views
    stay transposed), else a contiguous tensor. The fake impl and every backend agree on this."""
    return torch.empty_like(t) if t.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _kernel_inputs(q, k, cos, sin):
    """Inputs as the kernels take them: last dims contiguous, cos/sin sharing strides and q's dtype."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return q, k, cos, sin


def _outputs(q, k, q_out_strides, k_out_strides):
    """(q_out, k_out): the strides asked for (checked by _check_rope), else _out_like's layout. Every backend and
    the fake impl make their outputs here, so they agree on the layout."""

    def one(t, strides):
        if strides is None:
            return _out_like(t)
        return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)

    return one(q, q_out_strides), one(k, k_out_strides)


def _native_rope(q, k, cos, sin, interleaved, backward, q_out_strides=None, k_out_strides=None):
    if q.shape[0] * q.shape[2] and q.dtype == k.dtype:
        q_out, k_out = (_native.on_huge_pages(t) for t in _outputs(q, k, q_out_strides, k_out_strides))
        qc, kc, cc, sc = _kernel_inputs(q, k, cos, sin)
        rope_into(qc, kc, q_out, k_out, cc, sc, interleaved, backward)
        return q_out, k_out
    return _reference_rope(q, k, cos, sin, interleaved, backward, q_out_strides, k_out_strides)


def _triton_rope(q, k, cos, sin, interleaved, backward, q_out_strides=None, k_out_strides=None):
    if q.shape[0] * q.shape[2] and q.dtype == k.dtype:
        q_out, k_out = _outputs(q, k, q_out_strides, k_out_strides)
        qc, kc, cc, sc = _kernel_inputs(q, k, cos, sin)
        triton_module("rope").rope(qc, kc, q_out, k_out, cc, sc, interleaved, backward)
        return q_out, k_out
    return _reference_rope(q, k, cos, sin, interleaved, backward, q_out_strides, k_out_strides)


def _reference_rope(q, k, cos, sin, interleaved, backward, q_out_strides=None, k_out_strides=None):
    q_ref, k_ref = ref.rope(q, k, cos.to(q.dtype), sin.to(q.dtype), interleaved, backward)
    q_out, k_out = _outputs(q, k, q_out_strides, k_out_strides)
    return q_out.copy_(q_ref), k_out.copy_(k_ref)


def _fake_rope(q, k, cos, sin, interleaved, backward, q_out_strides=None, k_out_strides=None):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "rope: q and k must be 4-D")
    torch._check(cos.dim() == 3 and cos.shape == sin.shape, lambda: "rope: cos and sin must be [Bc, S, R]")
    return _outputs(q, k, q_out_strides, k_out_strides)


def _check_out_strides(op: str, name: str, shape, strides) -> None:
    """strides: four non-negative ints laying out `shape` densely without overlap, the last dim contiguous (the
    kernels write every element once through them, in parallel)."""
    if not isinstance(strides, (list, tuple)) or len(strides) != 4 or any(type(s) is not int for s in strides):
        raise TypeError(f"{op}: {name} must be None or four ints, got {strides!r}")
    if any(s < 0 for s in strides):
        raise ValueError(f"{op}: {name} must be non-negative, got {list(strides)}")
    if shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"{op}: {name} must keep the last dim contiguous (stride 1), got {list(strides)}")
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(strides, shape) if n > 1):
        if stride != expected:
            raise ValueError(
                f"{op}: {name} {list(strides)} is not a dense layout of shape {tuple(shape)} without overlap"
            )
        expected *= size


def _check_rope(q, k, cos, sin, interleaved, backward, q_out_strides=None, k_out_strides=None):
    """q [B, Hq, S, D], k [B, Hk, S, D] of one float dtype; cos, sin [Bc, S, R] float, Bc in (1, B), R even <= D;
    output strides None or a dense layout of q's / k's shape."""
    op = "rope"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_dtype(op, name, t, FLOAT_DTYPES)
    check_dtype(op, "k", k, (q.dtype,))
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q and k must be 4-D [B, H, S, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, _, seq, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"{op}: k has shape {tuple(k.shape)}, incompatible with q's {tuple(q.shape)}")
    if cos.dim() != 3 or cos.shape != sin.shape:
        raise ValueError(
            f"{op}: cos and sin must be [Bc, S, R] of one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if cos.shape[0] not in (1, batch) or cos.shape[1] != seq or cos.shape[2] % 2 or cos.shape[2] > head_dim:
        raise ValueError(
            f"{op}: cos has shape {tuple(cos.shape)}, expected [1 or {batch}, {seq}, R] with R even and <= {head_dim}"
        )
    for name, t, strides in (("q_out_strides", q, q_out_strides), ("k_out_strides", k, k_out_strides)):
        if strides is not None:
            _check_out_strides(op, name, t.shape, strides)


rope_op = define_op(
    "rope",
    "(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved, bool backward, SymInt[]? q_out_strides=None, "
    "SymInt[]? k_out_strides=None) -> (Tensor, Tensor)",
    family="rope",
    fake=_fake_rope,
    reference=_reference_rope,
    native=_native_rope,
    triton=_triton_rope,
    check=_check_rope,
)


@carry_backend
class RopeFunction(torch.autograd.Function):
    """(q_out, k_out) = rope(q, k); the gradient is the transposed rotation of (dq_out, dk_out), made in the
    layout of the forward's outputs, which is q's and k's own (HF's transposed views of the projections)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved: bool):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        q_out, k_out = rope_op(q, k, cos, sin, interleaved, False)
        ctx.out_strides = (list(q_out.stride()), list(k_out.stride()))
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = rope_op(dq, dk, cos, sin, ctx.interleaved, True, *ctx.out_strides)
        return dq_in, dk_in, None, None, None


def _as_table(fn: str, name: str, t, position_ids, batch: int, seq: int, unsqueeze_dim: int):
    """cos or sin as [Bc, S, R] (Bc 1 or batch)."""
    if position_ids is not None:
        if t.dim() != 2:
            raise ValueError(
                f"{fn}: with position_ids, {name} must be a [max_positions, R] table, got shape {tuple(t.shape)}"
            )
        if (
            not isinstance(position_ids, torch.Tensor)
            or position_ids.is_floating_point()
            or position_ids.dtype == torch.bool
        ):
            raise TypeError(
                f"{fn}: position_ids must be an integer tensor, got "
                f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}"
            )
        if position_ids.numel() and not torch.compiler.is_compiling():
            low, high = position_ids.min().item(), position_ids.max().item()
            if low < 0 or high >= t.shape[0]:
                raise ValueError(
                    f"{fn}: position_ids must lie in [0, {t.shape[0]}) ({name} has {t.shape[0]} "
                    f"positions), got values in [{low}, {high}]"
                )
        t = t[position_ids]
    if t.dim() == 4 and t.shape[unsqueeze_dim] == 1:
        t = t.squeeze(unsqueeze_dim)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"{fn}: {name} must be [S, R] or [B, S, R], got shape {tuple(t.shape)}")
    if t.shape[1] != seq or t.shape[0] not in (1, batch):
        raise ValueError(
            f"{fn}: {name} has shape {tuple(t.shape)}, expected [{batch} or 1, {seq}, R] for q's "
            f"batch {batch} and sequence length {seq}"
        )
    return t


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    *,
    position_ids: torch.Tensor | None = None,
    interleaved: bool = False,
):
    """transformers' apply_rotary_pos_emb, fused: returns (q_embed, k_embed).

    q [B, Hq, S, D] and k [B, Hk, S, D] (unsqueeze_dim=1) or [B, S, H, D] (unsqueeze_dim=2), any
    strides; k may have fewer heads (GQA). cos, sin [S, R] or [B, S, R] (or a [max_pos, R] table with
    position_ids); R < D rotates the leading R channels and passes the rest (partial rotary).
    interleaved=True uses the GPT-J layout (pairs (2j, 2j+1)) instead of rotate_half.
    """
    fn = "apply_rotary_pos_emb"
    if _dtensor.is_dtensor(q) or _dtensor.is_dtensor(k):  # tensor parallel: each rank's heads
        return _dtensor.rope(
            apply_rotary_pos_emb, q, k, cos, sin, unsqueeze_dim, position_ids=position_ids, interleaved=interleaved
        )
    for name, t in (("q", q), ("k", k)):
        check_tensor(fn, name, t, dim=4)
    check_tensor(fn, "cos", cos)
    check_tensor(fn, "sin", sin)
    check_same_device(fn, q=q, k=k, cos=cos, sin=sin)
    check_same_dtype(fn, q=q, k=k)
    if cos.shape != sin.shape:
        raise ValueError(f"{fn}: cos has shape {tuple(cos.shape)}, sin has shape {tuple(sin.shape)}")
    dim = unsqueeze_dim + 4 if unsqueeze_dim < 0 else unsqueeze_dim
    if dim not in (1, 2):
        raise ValueError(f"{fn}: unsqueeze_dim must be 1 ([B, H, S, D]) or 2 ([B, S, H, D]), got {unsqueeze_dim}")
    qv, kv = (q, k) if dim == 1 else (q.transpose(1, 2), k.transpose(1, 2))
    batch, _, seq, head_dim = qv.shape
    if kv.shape[0] != batch or kv.shape[2] != seq or kv.shape[3] != head_dim:
        raise ValueError(
            f"{fn}: k has shape {tuple(k.shape)}, incompatible with q's {tuple(q.shape)} "
            "(batch, sequence and head_dim must match)"
        )
    cos = _as_table(fn, "cos", cos, position_ids, batch, seq, dim)
    sin = _as_table(fn, "sin", sin, position_ids, batch, seq, dim)
    rot = cos.shape[-1]
    if rot % 2 or rot > head_dim:
        raise ValueError(f"{fn}: cos/sin width {rot} must be even and <= head_dim {head_dim}")
    out_dtype = torch.promote_types(q.dtype, cos.dtype)  # HF's q * cos promotes
    qv, kv, cos, sin = (t.to(out_dtype) for t in (qv, kv, cos, sin))
    if cos.requires_grad or sin.requires_grad:  # gradients w.r.t. the tables: the differentiable formula
        q_out, k_out = ref.rope(qv, kv, cos, sin, interleaved, False)
    else:
        q_out, k_out = RopeFunction.apply(qv, kv, cos, sin, interleaved)
    return (q_out, k_out) if dim == 1 else (q_out.transpose(1, 2), k_out.transpose(1, 2))
