import torch
from torch import nn

from pyfastpeft.ops.rmsnorm import RMSNormFunction
from pyfastpeft.reference.rmsnorm import CASTING_MODES


class RMSNorm(nn.Module):
    """Drop-in for HF's LlamaRMSNorm (same attribute names, so state dicts load unchanged).

    y = (offset + weight) * normalize(x) in the casting order of `casting_mode` ("llama", "gemma",
    "none"); Gemma's norm is RMSNorm(h, eps, offset=1.0, casting_mode="gemma"). The weight starts at
    1 - offset, so a fresh module scales by one.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        casting_mode: str = "llama",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if casting_mode not in CASTING_MODES:
            raise ValueError(f"RMSNorm: casting_mode must be one of {tuple(CASTING_MODES)}, got {casting_mode!r}")
        if hidden_size < 1:
            raise ValueError(f"RMSNorm: hidden_size must be >= 1, got {hidden_size}")
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.offset = offset
        self.casting_mode = casting_mode

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(
            hidden_states,
            self.weight,
            float(self.variance_epsilon),
            float(self.offset),
            self.casting_mode,
        )

    def extra_repr(self) -> str:
        return (
            f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, offset={self.offset}, "
            f"casting_mode={self.casting_mode!r}"
        )
