"""SwiGLU reference: HF LlamaMLP's `act_fn(gate) * up` with SiLU, in the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyfastpeft.reference._common import accumulate_dtype


def swiglu_forward(gate, up):
    return F.silu(gate) * up


def swiglu_backward(dy, gate, up):
    """(dgate, dup):  s = sigmoid(g);  dup = dy * g * s;  dgate = dy * up * s * (1 + g * (1 - s))."""
    cd = accumulate_dtype(gate.dtype)
    g, u, d = gate.to(cd), up.to(cd), dy.to(cd)
    s = torch.sigmoid(g)
    return (d * u * s * (1 + g * (1 - s))).to(gate.dtype), (d * g * s).to(up.dtype)
