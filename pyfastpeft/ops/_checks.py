"""Argument checks for the public functions: clear TypeError/ValueError naming the argument."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(fn: str, name: str, t, *, dtypes=FLOAT_DTYPES, min_dim: int = 0, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{fn}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{fn}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{fn}: {name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(fn: str, **tensors) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, {first_name} is on {first.device}")


def check_same_dtype(fn: str, **tensors) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}, {first_name} has dtype {first.dtype}")


def check_op_devices(op: str, names, args) -> None:
    """Every tensor argument of op on the first tensor argument's device (a CPU/meta or CPU/CUDA mix would
    hand a kernel a pointer it cannot read)."""
    first_name, first_device = None, None
    for name, value in zip(names, args):  # every op call runs this: no list per argument, no name per tensor
        if isinstance(value, torch.Tensor):
            device = value.device
            if first_device is None:
                first_name, first_device = name, device
            elif device != first_device:
                raise ValueError(f"{op}: {name} is on {device}, {first_name} is on {first_device}")
        elif isinstance(value, (list, tuple)):  # a Tensor[] argument: each of its tensors (an optimizer's hundreds)
            for i, tensor in enumerate(value):
                if not isinstance(tensor, torch.Tensor):
                    continue
                device = tensor.device
                if first_device is None:
                    first_name, first_device = f"{name}[{i}]", device
                elif device != first_device:
                    raise ValueError(f"{op}: {name}[{i}] is on {device}, {first_name} is on {first_device}")


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes) -> None:
    if t.dtype not in dtypes:
        raise TypeError(
            f"{op}: {name} must have dtype in ({_dtype_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}"
        )


def check_numel(op: str, name: str, t: torch.Tensor, expected: int, why: str) -> None:
    """t holds exactly `expected` elements (why: what requires that many)."""
    if t.numel() != expected:
        raise ValueError(f"{op}: {name} has {t.numel()} elements, {why} needs {expected}")


def check_optional(op: str, name: str, t: torch.Tensor | None, expected: int, why: str) -> None:
    """An optional tensor argument (a `Tensor?` in the schema): None (absent) or exactly `expected` elements."""
    if t is not None and t.numel() != expected:
        raise ValueError(f"{op}: {name} has {t.numel()} elements, expected None or {expected} ({why})")


def check_last_dim(op: str, name: str, t: torch.Tensor, expected: int, why: str) -> None:
    if t.dim() == 0 or t.shape[-1] != expected:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, its last dim must be {expected} ({why})")


def check_int(op: str, name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """A Python int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{op}: {name} must be in {bounds}, got {value}")
    return value


def check_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_power_of_two(op: str, name: str, value, *, low: int = 1) -> int:
    check_int(op, name, value)
    if value < low or value & (value - 1):
        raise ValueError(f"{op}: {name} must be a power of two >= {low}, got {value}")
    return value


def check_real(
    op: str,
    name: str,
    value,
    *,
    finite: bool = True,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
) -> float:
    """A real number (not a bool), finite unless finite=False, in [low, high] (or [low, high))."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{op}: {name} must be {'finite' if finite else 'a number'}, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{op}: {name} must be >= {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{op}: {name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_features(op: str, name: str, t: torch.Tensor, what: str = "features") -> None:
    """t's last dim (the reduction length of a product, or a row's width) is at least 1: rows of no features
    have no rows to flatten to (x.reshape(-1, 0) is ambiguous), and no layer has them."""
    if t.dim() == 0 or t.shape[-1] < 1:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, its last dim ({what}) must be >= 1")


def check_layer_size(op: str, out_features: int, in_features: int) -> None:
    """A linear layer has at least one input and one output feature (nn.Linear allows 0, but no model has such a
    layer, and the flattened [-1, 0] views of its inputs or gradients would be ambiguous): a clear error on every
    backend alike instead of a torch-internal one on some."""
    if out_features < 1 or in_features < 1:
        raise ValueError(
            f"{op}: the layer is {out_features}x{in_features} (out_features x in_features); both must be >= 1"
        )
