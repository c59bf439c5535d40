"""8-bit optimizers: Adam / AdamW / Lion whose states are stored blockwise in 8 bits, one fused kernel per parameter.

    optimizer = pyfastpeft.optim.AdamW8bit(model.parameters(), lr=2e-4)
    trainer = Trainer(model, args, ..., optimizers=(optimizer, None))

Drop-ins for bitsandbytes' AdamW8bit / Adam8bit / Lion8bit, with their math (pyfastpeft/reference/blockwise.py has
the formulas) and their state: per parameter "step", "state1"/"state2" (uint8 codes of the parameter's shape),
"qmap1"/"qmap2" (the signed and unsigned dynamic maps), "absmax1"/"absmax2" (fp32, one per block of 256). A
parameter of fewer than `min_8bit_size` elements keeps fp32 states instead, as bitsandbytes does. So a state_dict
saved by either library loads into the other (load_state_dict also unwraps the nested form newer bitsandbytes
versions save). As in bitsandbytes, Adam8bit's weight decay is decoupled (p *= 1 - lr * weight_decay, after the
update), not torch.optim.Adam's L2 term.

The state memory is 2 bytes per element (Adam; 1 for Lion) plus 8 (4) bytes per 256 elements, against 8 (4) for
fp32 states. Each parameter's step is one pass over it: dequantize, update, requantize in registers.

Paged states (`is_paged=True`, or PagedAdamW8bit / PagedAdam8bit / PagedLion8bit, bitsandbytes' paged optimizers):
the states of CUDA parameters of at least PAGED_MIN_SIZE elements live in unified (managed) memory, which the
driver evicts to host memory when the GPU runs short instead of failing the step, and which each step prefetches
back to the device ahead of its kernels. The memory comes from a torch.cuda.MemPool over pyfastpeft._cuda's
cudaMallocManaged allocator. Same math, same states and state_dict as the unpaged optimizers; on the CPU (or
without pyfastpeft._cuda, with a warning) the states are ordinary tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch

from pyfastpeft.ops import blockwise as ops
from pyfastpeft.ops._dtensor import is_dtensor, local
from pyfastpeft.reference import blockwise as ref

__all__ = ["AdamW8bit", "Adam8bit", "Lion8bit", "PagedAdamW8bit", "PagedAdam8bit", "PagedLion8bit"]

# The key under which bitsandbytes >= 0.50 nests its quantization state in a saved state_dict (to hide it from FSDP).
BNB_WRAPPED_STATE_KEY = "__bnb_optimizer_quant_state__"
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PAGED_MIN_SIZE = 100_000  # bitsandbytes pages the states of parameters of at least this many elements
_PAGED_POOLS: dict = {}  # CUDA device index -> torch.cuda.MemPool of managed memory (None: warned of none)


def _paged_pool(device: torch.device):
    """The MemPool of managed memory on a CUDA device (made on first use), or None without pyfastpeft._cuda."""
    from pyfastpeft import _native

    if _native.cuda is None:
        if None not in _PAGED_POOLS:  # once
            _PAGED_POOLS[None] = None
            warnings.warn(
                f"pyfastpeft: paged optimizer states need pyfastpeft._cuda ({_native.cuda_error}); the states stay in "
                f"device memory",
                RuntimeWarning,
                stacklevel=4,
            )
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PAGED_POOLS:
        allocator = torch.cuda.memory.CUDAPluggableAllocator(
            _native.cuda.__file__, "pfp_managed_alloc", "pfp_managed_free"
        )
        _PAGED_POOLS[index] = torch.cuda.MemPool(allocator.allocator())
    return _PAGED_POOLS[index]


def _check_unit_interval(name: str, value, *, closed_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _check_non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _checked_defaults(lr, betas, eps, weight_decay) -> dict:
    """The parameter-group defaults, each checked: ValueError naming the argument."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return dict(
        lr=_check_non_negative("lr", lr),
        betas=(_check_unit_interval("betas[0]", betas[0]), _check_unit_interval("betas[1]", betas[1])),
        eps=_check_non_negative("eps", eps),
        weight_decay=_check_non_negative("weight_decay", weight_decay),
    )


class _Optimizer8bit(torch.optim.Optimizer):
    """The state handling both optimizers share: bitsandbytes' keys, fp32 states for small parameters, loading of
    either library's state_dict without the dtype casts torch.optim applies to floating-point state."""

    two_states: bool

    def __init__(self, params: Iterable, defaults: dict, min_8bit_size: int, is_paged: bool = False):
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        if not isinstance(is_paged, bool):
            raise ValueError(f"is_paged must be a bool, got {is_paged!r}")
        self.min_8bit_size, self.is_paged = min_8bit_size, is_paged
        super().__init__(params, defaults)

    def _pages(self, p: torch.Tensor) -> bool:
        return self.is_paged and p.is_cuda and p.numel() >= PAGED_MIN_SIZE

    def _state_zeros(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed state of p's shape: in managed memory where p's states are paged."""
        pool = _paged_pool(p.device) if self._pages(p) else None
        if pool is None:
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        with torch.cuda.use_mem_pool(pool, device=p.device):
            return torch.zeros(p.shape, dtype=dtype, device=p.device)

    def _prefetch(self, batch: list) -> None:
        """Ahead of the step's kernels, on the current stream: the paged states of batch's parameters to their
        device (pages the driver evicted under memory pressure come back in one transfer, not a fault per page)."""
        from pyfastpeft import _native

        if not self.is_paged or _native.cuda is None:
            return
        for p, _, state in batch:
            if self._pages(p):
                for name in ("state1", "state2"):
                    if name in state:
                        t = state[name]
                        _native.cuda.prefetch(t.data_ptr(), t.nbytes, t.device.index, _native.cuda_stream(t))

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of ours or of bitsandbytes' 8-bit optimizers (also the nested form bitsandbytes >= 0.50
        saves). Unlike torch.optim, no state tensor is cast to its parameter's dtype: uint8 codes, fp32 absmax and
        maps, and the fp32 states of small parameters keep their dtype; they only move to the parameter's device."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected a dict with 'state' and 'param_groups'")
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        tensors, skeleton = {}, {}
        for key, param_state in state_dict["state"].items():
            param_state = dict(param_state)
            param_state.update(param_state.pop(BNB_WRAPPED_STATE_KEY, {}))
            tensors[key] = {k: v for k, v in param_state.items() if isinstance(v, torch.Tensor) and k != "step"}
            skeleton[key] = {k: v for k, v in param_state.items() if k not in tensors[key]}
        super().load_state_dict({**state_dict, "state": skeleton})
        for key, saved in tensors.items():
            if key not in saved_ids:
                continue
            p = params[saved_ids.index(key)]
            self.state[p].update({k: v.to(device=local(p).device, copy=True) for k, v in saved.items()})
            self._check_state(p, self.state[p])
            if self._pages(local(p)):  # into managed memory, as the step would have made them
                for name in ("state1", "state2") if self.two_states else ("state1",):
                    value = self.state[p][name]
                    self.state[p][name] = self._state_zeros(local(p), value.dtype).copy_(value)

    def _check_state(self, parameter: torch.Tensor, state: dict) -> None:
        """A loaded state must fit its parameter before any kernel reads it (a corrupt or foreign checkpoint is
        a ValueError naming the key, never a crash)."""
        names = ("state1", "state2") if self.two_states else ("state1",)
        p = local(parameter)
        where = f"{type(self).__name__}.load_state_dict: parameter of shape {tuple(p.shape)}"
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            step = int(step.item())
            state["step"] = step
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: step must be an int >= 0, got {state.get('step')!r}")
        for name in names:
            value = state.get(name)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{where}: {name} is missing or not a tensor")
            if value.numel() != p.numel():
                raise ValueError(f"{where}: {name} has {value.numel()} elements, the parameter {p.numel()}")
            if value.dtype not in (torch.uint8, torch.float32):
                raise ValueError(f"{where}: {name} must be uint8 (8-bit) or float32, got {value.dtype}")
        quantized = state["state1"].dtype == torch.uint8
        if any((state[name].dtype == torch.uint8) != quantized for name in names):
            raise ValueError(f"{where}: the states mix uint8 and float32")
        if not quantized:
            return
        nblocks = -(-p.numel() // ref.OPTIMIZER_BLOCKSIZE)
        for index, name in enumerate(names, start=1):
            qmap, absmax = state.get(f"qmap{index}"), state.get(f"absmax{index}")
            if not isinstance(qmap, torch.Tensor) or qmap.dtype != torch.float32 or qmap.numel() != 256:
                raise ValueError(f"{where}: qmap{index} must be a float32 tensor of 256 values")
            if not bool(torch.isfinite(qmap).all()) or not bool((qmap[1:] >= qmap[:-1]).all()):
                raise ValueError(f"{where}: qmap{index} must be finite and sorted ascending")
            if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.numel() != nblocks:
                raise ValueError(f"{where}: absmax{index} must be a float32 tensor of {nblocks} values")
            shared = self._shared_map(index, p.device)
            state[f"qmap{index}"] = shared if torch.equal(qmap, shared) else qmap.contiguous()
            state[f"absmax{index}"] = absmax.contiguous()
            state[name] = state[name].reshape(p.shape).contiguous()

    def _shared_map(self, index: int, device: torch.device) -> torch.Tensor:
        """The dynamic map of state `index` (1: signed, 2: unsigned) on device, one tensor for all parameters: the
        step batches parameters by the identity of their maps."""
        maps = self.__dict__.setdefault("_maps", {})
        key = (index, torch.device(device))
        if key not in maps:
            maps[key] = (ref.SIGNED_MAP if index == 1 else ref.UNSIGNED_MAP).to(device, copy=True)
        return maps[key]

    def _init_state(self, parameter: torch.Tensor) -> dict:
        state, p = self.state[parameter], local(parameter)
        state["step"] = 0
        names = ("state1", "state2") if self.two_states else ("state1",)
        if p.numel() < self.min_8bit_size:
            for name in names:
                state[name] = self._state_zeros(p, torch.float32)
            return state
        nblocks = -(-p.numel() // ref.OPTIMIZER_BLOCKSIZE)
        for index, name in enumerate(names, start=1):
            state[name] = self._state_zeros(p, torch.uint8)
            state[f"qmap{index}"] = self._shared_map(index, p.device)
            state[f"absmax{index}"] = torch.zeros(nblocks, dtype=torch.float32, device=p.device)
        return state

    def _parameters_with_grad(self, group: dict):
        """(the tensor to update, its gradient, its state) of each parameter with a gradient. A DTensor parameter
        (FSDP2's shards) is updated through its local shard, with states of the shard's size."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(
                    f"{type(self).__name__}: parameters must be float32, float16 or bfloat16, got {p.dtype}"
                )
            if not is_dtensor(p) and not p.is_contiguous():  # the kernels update p in place
                p.data = p.data.contiguous()
            shard = local(p)
            if not shard.is_contiguous():
                raise ValueError(f"{type(self).__name__}: the local shard of a DTensor parameter must be contiguous")
            state = self.state[p] if self.state[p] else self._init_state(p)
            state["step"] += 1
            grad = local(p.grad)
            yield shard, grad if grad.dtype == shard.dtype else grad.to(shard.dtype), state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # 8-bit states: one kernel call per (dtype, step) over all of them; fp32 states (small parameters): one each
            batches: dict[tuple, list] = {}
            for p, grad, state in self._parameters_with_grad(group):
                if state["state1"].dtype == torch.uint8:
                    maps = (id(state["qmap1"]), id(state.get("qmap2")))
                    batches.setdefault((p.dtype, state["step"], maps), []).append((p, grad, state))
                else:
                    self._prefetch([(p, grad, state)])
                    self._update_fp32(group, p, grad, state)
            for (_, step, _), batch in batches.items():
                self._prefetch(batch)
                self._update_8bit(group, step, batch)
        return loss


class Adam8bit(_Optimizer8bit):
    """Adam with 8-bit blockwise states (bitsandbytes' Adam8bit). weight_decay is decoupled, applied after the
    update: p *= 1 - lr * weight_decay (bitsandbytes' kernel does the same)."""

    two_states = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
    ):
        super().__init__(params, _checked_defaults(lr, betas, eps, weight_decay), min_8bit_size, is_paged)

    @staticmethod
    def _constants(group: dict, step: int) -> tuple:
        beta1, beta2 = group["betas"]
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        step_size = -group["lr"] * correction2 / correction1
        return (step_size, correction2 * group["eps"], beta1, beta2, 1.0 - group["lr"] * group["weight_decay"])

    def _update_8bit(self, group: dict, step: int, batch: list) -> None:
        ops.adam8bit_step_multi(
            [p for p, _, _ in batch],
            [grad for _, grad, _ in batch],
            *([state[key] for _, _, state in batch] for key in ("state1", "state2", "absmax1", "absmax2")),
            batch[0][2]["qmap1"],
            batch[0][2]["qmap2"],
            *self._constants(group, step),
        )

    def _update_fp32(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        _adam_fp32(p, grad, state["state1"], state["state2"], *self._constants(group, state["step"]))


class AdamW8bit(Adam8bit):
    """AdamW with 8-bit blockwise states (bitsandbytes' AdamW8bit): Adam8bit with weight_decay 0.01 by default."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size, is_paged)


class Lion8bit(_Optimizer8bit):
    """Lion (Chen et al. 2023) with an 8-bit blockwise momentum (bitsandbytes' Lion8bit): p *= 1 - lr * wd;
    p -= lr * sign(beta1 * m + (1 - beta1) * g); m = beta2 * m + (1 - beta2) * g."""

    two_states = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
    ):
        # eps is unused by Lion; bitsandbytes' loader reads it from every saved parameter group.
        super().__init__(params, _checked_defaults(lr, betas, 1e-8, weight_decay), min_8bit_size, is_paged)

    @staticmethod
    def _constants(group: dict) -> tuple:
        beta1, beta2 = group["betas"]
        return (group["lr"], beta1, beta2, 1.0 - group["lr"] * group["weight_decay"])

    def _update_8bit(self, group: dict, step: int, batch: list) -> None:
        ops.lion8bit_step_multi(
            [p for p, _, _ in batch],
            [grad for _, grad, _ in batch],
            [state["state1"] for _, _, state in batch],
            [state["absmax1"] for _, _, state in batch],
            batch[0][2]["qmap1"],
            *self._constants(group),
        )

    def _update_fp32(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        _lion_fp32(p, grad, state["state1"], *self._constants(group))


class PagedAdam8bit(Adam8bit):
    """Adam8bit with paged states (bitsandbytes' PagedAdam8bit): see the module's docstring."""

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, min_8bit_size=4096):
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size, is_paged=True)


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit with paged states (bitsandbytes' PagedAdamW8bit, Trainer's optim="paged_adamw_8bit")."""

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=4096):
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size, is_paged=True)


class PagedLion8bit(Lion8bit):
    """Lion8bit with a paged momentum (bitsandbytes' PagedLion8bit)."""

    def __init__(self, params: Iterable, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, min_8bit_size=4096):
        super().__init__(params, lr, betas, weight_decay, min_8bit_size, is_paged=True)


# The fp32-state updates of small parameters: the formulas of the 8-bit kernels without the quantization.


def _adam_fp32(p, g, m, v, step_size, correction2_eps, beta1, beta2, decay) -> None:
    grad = g.reshape(p.shape).float()
    finite = torch.isfinite(grad)
    grad = torch.where(finite, grad, 0.0)
    v_new = v * beta2 + (1.0 - beta2) * grad * grad
    m_new = m * beta1 + (1.0 - beta1) * grad
    param = p.float()
    updated = param + step_size * (m_new / (v_new.double().sqrt().float() + correction2_eps))
    if decay != 1.0:
        updated = updated * decay
    v.copy_(torch.where(finite, v_new, 0.0))
    m.copy_(torch.where(finite, m_new, 0.0))
    p.copy_(torch.where(finite, updated, param))


def _lion_fp32(p, g, m, lr, beta1, beta2, decay) -> None:
    grad = g.reshape(p.shape).float()
    finite = torch.isfinite(grad)
    grad = torch.where(finite, grad, 0.0)
    param = p.float()
    updated = (param * decay if decay != 1.0 else param) - lr * torch.sign(m * beta1 + (1.0 - beta1) * grad)
    m.copy_(torch.where(finite, m * beta2 + (1.0 - beta2) * grad, 0.0))
    p.copy_(torch.where(finite, updated, param))
