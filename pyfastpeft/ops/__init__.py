"""Custom ops, backend dispatch and autograd, one file per op family (rmsnorm, swiglu, rope, nf4, int8, lora, flce)."""
from pyfastpeft.ops import flce, int8, lora, nf4, rmsnorm, rope, swiglu  # noqa: F401  (defines the torch.library ops)
