"""Benchmark cases, one function per op family, shapes from Llama-2-7B (hidden 4096, intermediate
11008, 32 query heads, head_dim 128; 8 KV heads, as in GQA models).

A family function takes the dtypes and whether the run is quick, and returns one Case per
(dtype, mode). A Case's build(device) makes the inputs, our implementation (the public function or
module) and the reference (the HF module or eager PyTorch), and builders of native "into" kernel
calls (none in the `model` family, whose cases are whole training steps). A new family adds one module here (its
cases function) and one entry in FAMILIES; the harness does not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyfastpeft.bench.cases._common import DTYPES, FamilyCases
from pyfastpeft.bench.cases.attention import attention_cases
from pyfastpeft.bench.cases.blockwise import blockwise_cases
from pyfastpeft.bench.cases.distill import distill_cases
from pyfastpeft.bench.cases.flce import flce_cases
from pyfastpeft.bench.cases.int8 import int8_cases
from pyfastpeft.bench.cases.lora import lora_cases
from pyfastpeft.bench.cases.methods import methods_cases
from pyfastpeft.bench.cases.model import (
    LORA_VS_DENSE,
    MODEL_LORA,
    QLORA_VS_BNB,
    QLORA_VS_DENSE,
    TRANSFORMERS_APPLY_ROTARY_POS_EMB,
    ModelShape,
    bitsandbytes_4bit_unusable,
    model_cases,
)
from pyfastpeft.bench.cases.nf4 import nf4_cases
from pyfastpeft.bench.cases.preference import preference_cases
from pyfastpeft.bench.cases.quantize import quantize_cases
from pyfastpeft.bench.cases.rmsnorm import rmsnorm_cases
from pyfastpeft.bench.cases.rope import rope_cases
from pyfastpeft.bench.cases.swiglu import swiglu_cases
from pyfastpeft.bench.harness import Case

FAMILIES: dict[str, FamilyCases] = {
    "rmsnorm": rmsnorm_cases,
    "swiglu": swiglu_cases,
    "rope": rope_cases,
    "attention": attention_cases,
    "nf4": nf4_cases,
    "int8": int8_cases,
    "quantize": quantize_cases,
    "lora": lora_cases,
    "flce": flce_cases,
    "distill": distill_cases,
    "preference": preference_cases,
    "blockwise": blockwise_cases,
    "methods": methods_cases,
    "model": model_cases,
}


SCOPES = ("quick", "headline", "full")


def select_cases(families: Sequence[str], dtypes: Sequence[torch.dtype], scope: str) -> list[Case]:
    """quick: every case at the small shapes; full: every case at the full shapes; headline (the default run): the
    cases marked headline at either size, each family's full-size ones first."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope != "headline":
        return [case for family in families for case in FAMILIES[family](dtypes, scope == "quick")]
    return [
        case
        for family in families
        for quick in (False, True)
        for case in FAMILIES[family](dtypes, quick)
        if case.headline
    ]


__all__ = [
    "DTYPES",
    "FAMILIES",
    "LORA_VS_DENSE",
    "MODEL_LORA",
    "QLORA_VS_BNB",
    "QLORA_VS_DENSE",
    "SCOPES",
    "TRANSFORMERS_APPLY_ROTARY_POS_EMB",
    "ModelShape",
    "bitsandbytes_4bit_unusable",
    "select_cases",
]
