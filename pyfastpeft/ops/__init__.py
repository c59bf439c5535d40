"""Custom ops, backend dispatch and autograd, one file per op family (rmsnorm, swiglu, rope, nf4, lora)."""
from pyfastpeft.ops import lora, nf4, rmsnorm, rope, swiglu  # noqa: F401  (defines the torch.library ops)
