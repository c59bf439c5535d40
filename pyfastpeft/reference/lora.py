"""LoRA reference in PyTorch: the counter-based dropout mask every backend shares, and the forward and
backward of a LoRA linear over a frozen base (the oracle of the tests and the fallback on any device).

Shapes (PEFT's): x [M, in] (leading dims flattened), W [out, in] frozen, A [r, in], B [out, r], s = scaling.
    x_d = x * keep * (1 / (1 - p))        keep = u > fp32(p), u the dropout uniform below
    y   = x W^T + b + s * (x_d A^T) B^T   xa = x_d A^T [M, r] is kept for backward
Backward (no dW: W is frozen), g_B = dY B [M, r]:
    dX = dY W + s * (g_B A) * keep * (1 / (1 - p))
    dA = s * g_B^T x_d      dB = s * dY^T xa      (db = sum of dY over rows, in the autograd Function)

Dropout uniforms (Triton's tl.randint4x(seed, position >> 2) with an int64 position, bit for bit): element i
(row-major index into x [M, in]) sits at stream position s = offset + i, and four consecutive positions share one
Philox-4x32-10 block, each taking one of its four output words:
  key     = (seed mod 2^32, seed >> 32 mod 2^32)         seed: int64 >= 0
  counter = (n mod 2^32, n >> 32, 0, 0)                  n = s >> 2 (offset < 2^62, so s never wraps)
  word    = output word s mod 4 (c0, c1, c2, c3), read as int32 w;  u = fp32(w < 0 ? ~w : w) * fp32(4.6566127342e-10)
so u lies in [0, 1). An element is kept when u > fp32(p): strictly greater, so p = 0 keeps everything.
The (seed, offset) pair travels as an int64 tensor `rng` of 2 elements, drawn from torch's default
generator of x's device (see pyfastpeft.ops.lora); rng None means no dropout.

The products below run in x's dtype, as PEFT's eager modules do (each step rounds to x's dtype).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # the largest scale with (2^31 - 1) * scale < 1 in fp32 (Triton's)


def _mul_hi_lo(constant: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of constant * value for a constant and int64 values in [0, 2^32).

    Every intermediate stays below 2^49, so int64 never overflows: with value = h * 2^16 + l,
    mid = constant * h + (constant * l >> 16) = constant * value >> 16.
    """
    low_product = constant * (value & 0xFFFF)
    mid = constant * (value >> 16) + (low_product >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low_product & 0xFFFF)


def philox_uniform(rng: torch.Tensor, numel: int, device: torch.device | None = None) -> torch.Tensor:
    """fp32 [numel] dropout uniforms u[i] for element i; rng: int64 [2] = (seed, offset), both >= 0."""
    rng = rng.to(device=device if device is not None else rng.device, dtype=torch.int64)
    seed, offset = rng[0], rng[1]
    key0, key1 = seed & MASK32, (seed >> 32) & MASK32
    position = offset + torch.arange(numel, dtype=torch.int64, device=rng.device)
    n = position >> 2  # each element runs its own block's rounds and keeps its word: simple, no host sync
    c0, c1 = n & MASK32, n >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ key0, lo_b, hi_a ^ c3 ^ key1, lo_a
        key0 = (key0 + PHILOX_KEY_A) & MASK32
        key1 = (key1 + PHILOX_KEY_B) & MASK32
    words = torch.stack((c0, c1, c2, c3), dim=1).gather(1, (position & 3).unsqueeze(1)).squeeze(1)
    nonnegative = torch.where(words >= 1 << 31, words ^ MASK32, words)  # ~w of the int32 reading, for w < 0
    return nonnegative.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=rng.device)


def keep_threshold(dropout_p: float) -> torch.Tensor:
    """fp32(p), the value every backend compares the uniforms with (keep = u > it)."""
    return torch.tensor(dropout_p, dtype=torch.float32)


def keep_mask(rng: torch.Tensor, shape, dropout_p: float, device: torch.device) -> torch.Tensor:
    """bool mask of `shape` (row-major element order): True where the element is kept."""
    numel = 1
    for size in shape:
        numel *= size
    return (philox_uniform(rng, numel, device) > keep_threshold(dropout_p).to(device)).view(shape)


def dropout(x: torch.Tensor, dropout_p: float, rng: torch.Tensor) -> torch.Tensor:
    """x * keep * fp32(1 / (1 - p)), computed in fp32 and rounded once to x's dtype (fp64 stays fp64);
    x itself when rng is None (no dropout)."""
    if rng is None:
        return x
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - dropout_p), dtype=torch.float32).to(device=x.device, dtype=compute)
    keep = keep_mask(rng, x.shape, dropout_p, x.device)
    return torch.where(keep, x.to(compute) * scale, torch.zeros((), dtype=compute, device=x.device)).to(x.dtype)


def dense_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b (bias None: none)."""
    return torch.nn.functional.linear(x2d, weight, bias)


def dense_grad_input(dy2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dY W."""
    return dy2d @ weight


def lora_forward(x, base_forward, bias, lora_A, lora_B, scaling: float, dropout_p: float, rng):
    """(y [..., out], xa [M, r]) with base_forward(x2d, bias) = x W^T + b for the frozen base."""
    in_features = lora_A.shape[1]
    x2d = x.reshape(-1, in_features)
    xa = dropout(x2d, dropout_p, rng) @ lora_A.t()
    y = base_forward(x2d, bias) + (xa @ lora_B.t()) * scaling
    return y.view(*x.shape[:-1], lora_B.shape[0]), xa


def lora_backward(
    dy, x, base_grad_input, lora_A, lora_B, xa, scaling: float, dropout_p: float, rng, needs_input_grad: bool
):
    """(dx, dA, dB) with base_grad_input(dy2d) = dY W; dx is empty unless needs_input_grad."""
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    dy2d = dy.reshape(-1, out_features)
    x2d = x.reshape(-1, in_features)
    grad_xa = dy2d @ lora_B
    grad_A = (grad_xa.t() @ dropout(x2d, dropout_p, rng)) * scaling
    grad_B = (dy2d.t() @ xa) * scaling
    if not needs_input_grad:
        return x.new_empty(0), grad_A, grad_B
    dx = base_grad_input(dy2d) + dropout(grad_xa @ lora_A, dropout_p, rng) * scaling
    return dx.view(x.shape), grad_A, grad_B


# ---- multi-adapter batches ---------------------------------------------------------------------------------
# n adapters packed: A_cat [R, in] and B_cat [out, R] with R = sum r_i, adapter i in rows (columns of B_cat)
# o_i .. o_{i+1} of rank_offsets int64 [n + 1]; s_i = scalings[i] (fp32 [n]). row_adapter int64 [M]: the
# adapter of each row of x [M, in], -1 for base-only rows. rows_i = the rows of adapter i in increasing order;
# row_order = cat(rows_{-1}, rows_0, ..., rows_{n-1}) (the stable argsort of row_adapter), and adapter i's rows
# sit at positions segment_offsets[i] .. segment_offsets[i + 1] of it (segment_offsets int64 [n + 1], the last M).
#     x_d = dropout(x) over the whole [M, in] x: a row keeps the mask of its own position, wherever it is gathered
#     y[rows_i] = x[rows_i] W^T + b + s_i * (x_d[rows_i] A_i^T) B_i^T           (base-only rows: x W^T + b)
#     xa [M, max_rank] in row_order: xa[segment i, :r_i] = x_d[rows_i] A_i^T, zeros elsewhere
# Backward, g_i = dY[rows_i] B_i [|rows_i|, r_i]:
#     dX = dY W,  then dX[rows_i] += s_i * (g_i A_i) * keep * (1 / (1 - p))
#     dA_i = s_i * g_i^T x_d[rows_i]      dB_i = s_i * dY[rows_i]^T xa_i      (zero for an adapter without rows)


def adapter_groups(row_adapter: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_order int64 [M], segment_offsets int64 [n + 1]) of row_adapter, one nonzero() per adapter id."""
    groups = [(row_adapter == adapter).nonzero().view(-1) for adapter in range(-1, num_adapters)]
    sizes = torch.tensor([group.numel() for group in groups], dtype=torch.int64, device=row_adapter.device)
    return torch.cat(groups), sizes.cumsum(0)  # cumsum[i] = base-only rows + rows of adapters 0 .. i - 1


def lora_multi_forward(
    x, base_forward, bias, lora_A, lora_B, rank_offsets, scalings, row_adapter, max_rank: int, dropout_p: float, rng
):
    """(y [..., out], xa [M, max_rank], row_order [M], segment_offsets [n + 1]): a loop over the adapters."""
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    x2d = x.reshape(-1, in_features)
    x_dropped = dropout(x2d, dropout_p, rng)
    row_order, segment_offsets = adapter_groups(row_adapter, scalings.numel())
    y = base_forward(x2d, bias)
    xa = x2d.new_zeros(x2d.shape[0], max_rank)
    for adapter in range(scalings.numel()):
        low, high = rank_offsets[adapter].item(), rank_offsets[adapter + 1].item()
        start, end = segment_offsets[adapter].item(), segment_offsets[adapter + 1].item()
        rows = row_order[start:end]
        xa_rows = x_dropped[rows] @ lora_A[low:high].t()
        xa[start:end, : high - low] = xa_rows
        y[rows] = y[rows] + (xa_rows @ lora_B[:, low:high].t()) * scalings[adapter].item()
    return y.view(*x.shape[:-1], out_features), xa, row_order, segment_offsets


def lora_multi_backward(
    dy,
    x,
    base_grad_input,
    lora_A,
    lora_B,
    rank_offsets,
    scalings,
    xa,
    row_order,
    segment_offsets,
    dropout_p: float,
    rng,
    needs_input_grad: bool,
):
    """(dx, dA_cat, dB_cat): a loop over the adapters; dx is empty unless needs_input_grad."""
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    dy2d = dy.reshape(-1, out_features)
    x2d = x.reshape(-1, in_features)
    x_dropped = dropout(x2d, dropout_p, rng)
    grad_A, grad_B = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    adapter_grad_input = torch.zeros_like(x2d)  # g_i A_i at rows_i, before the mask and s_i
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    row_scaling = torch.zeros(x2d.shape[0], 1, dtype=compute, device=x.device)
    for adapter in range(scalings.numel()):
        low, high = rank_offsets[adapter].item(), rank_offsets[adapter + 1].item()
        start, end = segment_offsets[adapter].item(), segment_offsets[adapter + 1].item()
        rows, scaling = row_order[start:end], scalings[adapter].item()
        grad_xa = dy2d[rows] @ lora_B[:, low:high]
        grad_A[low:high] = (grad_xa.t() @ x_dropped[rows]) * scaling
        grad_B[:, low:high] = (dy2d[rows].t() @ xa[start:end, : high - low]) * scaling
        adapter_grad_input[rows] = grad_xa @ lora_A[low:high]
        row_scaling[rows] = scaling
    if not needs_input_grad:
        return x.new_empty(0), grad_A, grad_B
    adapter_part = (dropout(adapter_grad_input, dropout_p, rng) * row_scaling).to(x.dtype)
    dx = base_grad_input(dy2d) + adapter_part
    return dx.view(x.shape), grad_A, grad_B
