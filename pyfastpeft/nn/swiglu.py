from torch import nn

from pyfastpeft.ops.swiglu import SwiGLUFunction


class SwiGLUMLP(nn.Module):
    """Drop-in for HF's LlamaMLP with SiLU: down_proj(silu(gate_proj(x)) * up_proj(x)), the gate fused."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_projections(cls, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> "SwiGLUMLP":
        """An MLP around existing projection modules (shared, not copied): how patch_model swaps an HF MLP."""
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate_proj, up_proj, down_proj
        mlp.hidden_size = getattr(gate_proj, "in_features", None)
        mlp.intermediate_size = getattr(gate_proj, "out_features", None)
        return mlp

    def forward(self, x):
        return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))
