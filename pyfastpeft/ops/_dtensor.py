"""DTensor inputs (tensor- and sequence-parallel layers): the public functions run their kernels on each rank's local
shard and wrap the result back, as a DTensor of the input's mesh and placements.

A kernel is local where the shard holds everything one output element needs: RMSNorm a whole row (x sharded on any
dim but the last: sequence parallel), SwiGLU one element (any placement, gate and up alike), RoPE one (head,
position) row of q and k with the whole cos/sin table (q, k sharded on batch or heads: tensor parallel). An input
sharded otherwise, or Partial (an unreduced sum: no non-linear op may run on it), is redistributed first. A
replicated weight's gradient is Partial over the mesh dims the input is sharded on (each rank saw some of the rows).
"""

from __future__ import annotations

import torch


def is_dtensor(t) -> bool:
    """By type name: no import of torch.distributed, and cheap enough for every parameter of every optimizer step
    (an FSDP2 parameter is a Parameter whose type is DTensor)."""
    return type(t).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a DTensor's local shard (a view: writing it writes the DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def _keeping(x, local_dims: tuple[int, ...]):
    """x redistributed so that none of local_dims is sharded and nothing is Partial."""
    from torch.distributed.tensor import Replicate

    ndim = x.dim()
    dims = {d % ndim for d in local_dims}
    placements = [Replicate() if p.is_partial() or (p.is_shard() and p.dim % ndim in dims) else p for p in x.placements]
    return x if list(placements) == list(x.placements) else x.redistribute(x.device_mesh, placements)


def _replicated_local(fn: str, name: str, t, like):
    """t as a whole local tensor for a computation sharded like `like`; a DTensor is gathered, and its gradient
    is Partial over the mesh dims on which `like` is sharded."""
    from torch.distributed.tensor import Partial, Replicate

    if not is_dtensor(t):
        if t.requires_grad and any(p.is_shard() for p in like.placements):
            raise ValueError(
                f"{fn}: {name} is a plain tensor that requires grad, the input a sharded DTensor: each rank would "
                f"get the gradient of its own rows only. Make {name} a DTensor (Replicate) of the input's mesh"
            )
        return t
    full = t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim)
    grad_placements = [Partial() if p.is_shard() else Replicate() for p in like.placements]
    return full.to_local(grad_placements=grad_placements)


def _wrap(local, like):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False)


def rms_norm(kernel, x, weight, *args):
    if not is_dtensor(x):
        raise ValueError("rms_norm: weight is a DTensor but x is not; pass x as a DTensor of weight's mesh")
    x = _keeping(x, (-1,))
    return _wrap(kernel(x.to_local(), _replicated_local("rms_norm", "weight", weight, x), *args), x)


def swiglu(kernel, gate, up):
    if not (is_dtensor(gate) and is_dtensor(up)):
        raise ValueError("swiglu: gate and up must both be DTensors or both plain tensors")
    gate = _keeping(gate, ())
    up = up.redistribute(gate.device_mesh, gate.placements) if up.placements != gate.placements else up
    return _wrap(kernel(gate.to_local(), up.to_local()), gate)


def rope(kernel, q, k, cos, sin, *args, **kwargs):
    """q, k [B, H, S, D] or [B, S, H, D] (unsqueeze_dim picks): sharded on batch or heads they stay so."""
    if not (is_dtensor(q) and is_dtensor(k)):
        raise ValueError("apply_rotary_pos_emb: q and k must both be DTensors or both plain tensors")
    unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
    seq_dim = 2 if unsqueeze_dim % 4 == 1 else 1
    q, k = _keeping(q, (seq_dim, -1)), _keeping(k, (seq_dim, -1))
    tables = [_replicated_local("apply_rotary_pos_emb", name, t, q) for name, t in (("cos", cos), ("sin", sin))]
    position_ids = kwargs.get("position_ids")
    if is_dtensor(position_ids):
        kwargs = {**kwargs, "position_ids": _replicated_local("apply_rotary_pos_emb", "position_ids", position_ids, q)}
    q_out, k_out = kernel(q.to_local(), k.to_local(), *tables, *args, **kwargs)
    return _wrap(q_out, q), _wrap(k_out, k)
