"""Custom ops, backend dispatch and autograd, one file per op family (rmsnorm, swiglu, rope)."""
from pyfastpeft.ops import rmsnorm, rope, swiglu  # noqa: F401  (defines the torch.library ops)
