"""What several references share."""

from __future__ import annotations

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and statistics of `dtype` inputs run in: fp64 for fp64 (gradcheck), fp32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32
