"""Triton kernels (installed as pyfastpeft.triton_kernels): one module per op family, each with its
@triton.jit kernels and host launchers that fill caller-allocated outputs. Dispatch lives in pyfastpeft/ops."""
