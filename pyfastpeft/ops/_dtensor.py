"""DTensor inputs (tensor- and sequence-parallel layers): the public functions run their kernels on each rank's local
shard and wrap the result back, as a DTensor of the input's mesh and placements.

A kernel is local where the shard holds everything one output element needs: RMSNorm a whole row (x sharded on any
dim but the last: sequence parallel), SwiGLU one element (any placement, gate and up alike), RoPE one (head,
position) row of q and k with the whole cos/sin table (q, k sharded on batch or heads: tensor parallel). An input
sharded otherwise, or Partial (an unreduced sum: no non-linear op may run on it), is redistributed first. A
replicated weight's gradient is Partial over the mesh dims the input is sharded on (each rank saw some of the rows).
LoRA linear layers are tensor parallel the two ways of Megatron's MLP (_ROLES); LoRALinear takes and returns plain
tensors around a sharded base the way torch's ColwiseParallel and RowwiseParallel do (module_input, module_output).
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


def copy_whole(t: torch.Tensor, value: torch.Tensor) -> None:
    """t.copy_(value) for a whole value; a DTensor t takes its own shard of value (sliced here, no collective)."""
    if is_dtensor(t):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(t.dtype), t.device_mesh, t.placements, src_data_rank=None)
    t.copy_(value)


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


def any_dtensor(*values) -> bool:
    """Whether any of values, or an element of a tuple among them (a quantized base's tensors), is a DTensor: the
    test every call of an op pays, so it looks no deeper."""
    for value in values:
        if type(value) is tuple:
            if any(type(v).__name__ == "DTensor" for v in value):
                return True
        elif type(value).__name__ == "DTensor":
            return True
    return False


def holds_dtensor(value) -> bool:
    """Whether value is a DTensor or holds one: a tuple or list of them, or a dataclass (a quantization state)."""
    import dataclasses

    if isinstance(value, (tuple, list)):
        return any(holds_dtensor(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(holds_dtensor(getattr(value, f.name)) for f in dataclasses.fields(value))
    return is_dtensor(value)


# The role a mesh dim plays in a LoRA linear, from the weight's placement on it (W [out, in]):
#   "column": W Shard(0), column (output) parallel: x whole, y sharded on its last dim; B and bias shard like W,
#             A is whole. Every rank sees all of x, so dx and dA come back Partial.
#   "row":    W Shard(1), row (input) parallel: x sharded on its last dim like W and A, B whole; y = sum over the
#             ranks of x_r W_r^T + s (x_r A_r^T) B^T is Partial (both terms are linear in the shard), so dB (from
#             the partial xa_r) is Partial too, and the bias is added once, after the sum.
#   "whole":  W Replicate (or plain, or a quantized base, whole on every rank): x may be sharded on any dim but its
#             last (data or sequence parallel); the replicated tensors' gradients are then Partial.
_ROLES = {0: "column", 1: "row"}


def _role(placement) -> str:
    return _ROLES[placement.dim % 2] if placement.is_shard() else "whole"


def _as_dtensor(fn: str, name: str, t, mesh):
    """t as a DTensor of mesh: a plain tensor is taken as whole on every rank, which is right only if it needs no
    gradient (each rank would get the gradient of its own share of the work, and nothing would sum them)."""
    from torch.distributed.tensor import DTensor, Replicate

    if is_dtensor(t):
        if t.device_mesh != mesh:
            raise ValueError(f"{fn}: {name} is a DTensor of another device mesh than x's")
        return t
    if t.requires_grad:
        raise ValueError(
            f"{fn}: {name} is a plain tensor that requires grad, x a DTensor: each rank would get the gradient of "
            f"its own share of the work. Make {name} a DTensor of x's mesh (Replicate, or sharded like the weight)"
        )
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _local(t, placements, split):
    """t's local shard laid out as placements; its gradient is Partial on the mesh dims in split where it is
    replicated (each rank computed it from its share of x's rows or of the weight)."""
    from torch.distributed.tensor import Partial

    t = t.redistribute(t.device_mesh, placements) if list(t.placements) != list(placements) else t
    grads = [Partial() if p.is_replicate() and s else p for p, s in zip(placements, split)]
    return t.to_local(grad_placements=grads)


def _layout(role: str, tensor: str):
    """The placement of tensor ("weight", "lora_A", "lora_B" or "bias") on a mesh dim of the given role."""
    from torch.distributed.tensor import Replicate, Shard

    sharded = {"column": ("weight", "lora_B", "bias"), "row": ("weight", "lora_A")}.get(role, ())
    return (Shard(0) if role == "column" else Shard(1)) if tensor in sharded else Replicate()


def lora_linear(kernel, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training):
    """LoRA linear over DTensors, tensor parallel the ways a base's weight is sharded (see _ROLES), data or sequence
    parallel on x's other dims; each rank runs kernel on its shards. A dense weight may be a DTensor; a quantized
    base must be whole on every rank (plain tensors). Dropout draws each rank's mask for its own shard of x: a valid
    dropout, and the one process's mask wherever the ranks are seeded alike and hold x whole (column parallel)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    fn = "lora_linear"
    if not is_dtensor(x):
        raise ValueError(f"{fn}: the weight, lora_A, lora_B or bias is a DTensor but x is not; pass x as a DTensor")
    mesh, last = x.device_mesh, x.dim() - 1
    dense_dtensor = isinstance(weight, torch.Tensor) and is_dtensor(weight)
    if dense_dtensor:
        weight = _as_dtensor(fn, "weight", weight, mesh)
        roles = ["whole" if p.is_partial() else _role(p) for p in weight.placements]
    elif holds_dtensor(weight):
        raise ValueError(
            f"{fn}: a quantized base must be whole on every rank (plain tensors); tensor parallelism shards dense "
            f"weights only"
        )
    else:
        roles = ["whole"] * mesh.ndim
    x_placements = [  # x's rows stay sharded where the weight is whole
        Shard(last) if r == "row" else p if r == "whole" and p.is_shard() and p.dim % x.dim() != last else Replicate()
        for r, p in zip(roles, x.placements)
    ]
    split = [r != "whole" or p.is_shard() for r, p in zip(roles, x_placements)]

    def local(name, t):
        return _local(_as_dtensor(fn, name, t, mesh), [_layout(r, name) for r in roles], split)

    rows_split = "row" in roles
    y = kernel(
        _local(x, x_placements, split),
        local("weight", weight) if dense_dtensor else weight,
        None if bias is None or rows_split else local("bias", bias),
        local("lora_A", lora_A),
        local("lora_B", lora_B),
        scaling,
        dropout_p,
        training,
    )
    out_placements = [
        Shard(last) if r == "column" else Partial() if r == "row" else p for r, p in zip(roles, x_placements)
    ]
    y = DTensor.from_local(y, mesh, out_placements, run_check=False)
    if bias is not None and rows_split:  # once, to the summed output
        bias = _as_dtensor(fn, "bias", bias, mesh)
        y = y + bias.redistribute(mesh, [_layout(r, "bias") for r in roles])
    return y


def adapter_placements(weight) -> tuple[list, list]:
    """(lora_A's placements, lora_B's) for a tensor-parallel base weight: A shards with a row-parallel weight's in,
    B with a column-parallel weight's out, as PEFT shards them; whole otherwise."""
    roles = [_role(p) for p in weight.placements]
    return [_layout(r, "lora_A") for r in roles], [_layout(r, "lora_B") for r in roles]


def module_input(x, weight):
    """A layer's plain input as the DTensor its tensor-parallel weight expects, the way torch's ColwiseParallel and
    RowwiseParallel take a local tensor: whole on every rank for a column-parallel weight, each rank's shard of the
    last dim for a row-parallel one."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placements = [Shard(x.dim() - 1) if _role(p) == "row" else Replicate() for p in weight.placements]
    return DTensor.from_local(x, weight.device_mesh, placements, run_check=False)


def module_output(y):
    """A layer's DTensor output as the local tensor the next plain layer takes (use_local_output): a column-parallel
    layer's shard of the features, a row-parallel layer's sum over the ranks."""
    from torch.distributed.tensor import Replicate

    if any(p.is_partial() for p in y.placements):
        y = y.redistribute(y.device_mesh, [Replicate() if p.is_partial() else p for p in y.placements])
    return y.to_local()
