"""Scaled dot-product attention reference: softmax(scale * q k^T) v, grouped-query heads, an optional causal mask.

Layouts (any strides): q [B, H, Sq, D]; k, v [B, Hkv, Sk, D] with H % Hkv == 0, query head h reading kv head
h // (H // Hkv). causal: query i sees keys j <= i (torch's is_causal: top-left aligned, also when Sq != Sk).
Per (batch, head), in fp32 (fp64 for fp64 inputs):
  forward   S = scale * q k^T [Sq, Sk], -inf where causal hides key j from query i
            lse = logsumexp_j S [Sq] (natural log)        P = exp(S - lse)        out = P v [Sq, D]
  backward  given dout [Sq, D] and the forward's out and lse:
            dv = P^T dout        dP = dout v^T        delta = rowsum(dout * out)        dS = P * (dP - delta)
            dq = scale * dS k    dk = scale * dS^T q
dk and dv sum over the H // Hkv query heads that share a kv head. out and the gradients leave in their input's
dtype, lse in the compute dtype.
"""

from __future__ import annotations

import torch

from pyfastpeft.reference._common import accumulate_dtype


def _per_query_head(t: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """k or v [B, Hkv, Sk, D] as [B, H, Sk, D] in dtype: each kv head repeated for the query heads that read it."""
    return t.to(dtype).repeat_interleave(heads // t.shape[1], dim=1)


def _per_kv_head(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A gradient [B, H, Sk, D] summed over the query heads of each group: [B, Hkv, Sk, D]."""
    batch, heads, seq, dim = t.shape
    return t.reshape(batch, kv_heads, heads // kv_heads, seq, dim).sum(2)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """scale * q k^T [B, H, Sq, Sk], -inf where causal hides key j from query i (j > i)."""
    scores = scale * (q @ k.transpose(-1, -2))
    if causal:
        q_len, kv_len = scores.shape[-2:]
        hidden = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def attention_forward(q, k, v, scale: float, causal: bool):
    """(out [B, H, Sq, D] in q's dtype, lse [B, H, Sq] in the compute dtype) as new contiguous tensors."""
    dtype = accumulate_dtype(q.dtype)
    heads = q.shape[1]
    scores = _scores(q.to(dtype), _per_query_head(k, heads, dtype), scale, causal)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = probs @ _per_query_head(v, heads, dtype)
    return out.to(q.dtype), lse


def attention_backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    """(dq, dk, dv) in q's, k's and v's dtypes, as new contiguous tensors."""
    dtype = accumulate_dtype(q.dtype)
    heads, kv_heads = q.shape[1], k.shape[1]
    q32, dout32 = q.to(dtype), dout.to(dtype)
    k32, v32 = _per_query_head(k, heads, dtype), _per_query_head(v, heads, dtype)
    probs = torch.exp(_scores(q32, k32, scale, causal) - lse.to(dtype).unsqueeze(-1))
    dv = probs.transpose(-1, -2) @ dout32
    dprobs = dout32 @ v32.transpose(-1, -2)
    delta = (dout32 * out.to(dtype)).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta)
    dq = scale * (dscores @ k32)
    dk = scale * (dscores.transpose(-1, -2) @ q32)
    return dq.to(q.dtype), _per_kv_head(dk, kv_heads).to(k.dtype), _per_kv_head(dv, kv_heads).to(v.dtype)
