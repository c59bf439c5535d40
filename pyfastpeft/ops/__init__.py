"""Custom ops, backend dispatch and autograd, one file per op family (rmsnorm, swiglu, rope, nf4, quantize)."""
from pyfastpeft.ops import nf4, quantize, rmsnorm, rope, swiglu  # noqa: F401  (defines the torch.library ops)
