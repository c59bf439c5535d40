"""Loss modules over an lm_head: the fused functions with their settings held, called with (weight, hidden, ...)
in the order of Liger-Kernel's loss modules (the lm_head weight first), so they drop in for them."""

from __future__ import annotations

import torch
from torch import nn

from pyfastpeft.ops.distill import fused_linear_distillation
from pyfastpeft.ops.flce import fused_linear_cross_entropy
from pyfastpeft.ops.preference import fused_linear_preference


class FusedLinearCrossEntropyLoss(nn.Module):
    """forward(weight [V, H], hidden [..., H], labels, bias=None): fused_linear_cross_entropy with this module's
    settings (any keyword argument of it but return_lse, e.g. label_smoothing, softcap, class_weight,
    lse_square_scale, return_z_loss, return_token_accuracy, reduction). class_weight is kept as a buffer."""

    def __init__(self, class_weight: torch.Tensor | None = None, **settings):
        super().__init__()
        if "return_lse" in settings:
            raise ValueError("FusedLinearCrossEntropyLoss: return_lse is not a module setting; call the function")
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.settings = settings

    def forward(self, weight: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor, bias=None):
        return fused_linear_cross_entropy(hidden, weight, labels, bias, class_weight=self.class_weight, **self.settings)


class FusedLinearDistillationLoss(nn.Module):
    """forward(student_weight, student_hidden, teacher_weight, teacher_hidden, labels=None, student_bias=None,
    teacher_bias=None): fused_linear_distillation with this module's settings (loss, beta, temperature,
    hard_label_weight, ignore_index, reduction, chunk_size)."""

    def __init__(self, loss: str = "kl", **settings):
        super().__init__()
        self.loss = loss
        self.settings = settings

    def forward(
        self,
        student_weight: torch.Tensor,
        student_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_distillation(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            loss=self.loss,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            **self.settings,
        )

    def extra_repr(self) -> str:
        return ", ".join([f"loss={self.loss!r}"] + [f"{k}={v!r}" for k, v in self.settings.items()])


class FusedLinearPreferenceLoss(nn.Module):
    """forward(weight, hidden [2B, S, H], labels [2B, S], bias=None, **reference) -> PreferenceOutput:
    fused_linear_preference with this module's settings (loss, beta, label_smoothing, simpo_gamma, nll_weight,
    ignore_index, softcap, chunk_size); reference: ref_chosen_logps and ref_rejected_logps, or ref_hidden,
    ref_weight and ref_bias, for dpo and ipo."""

    def __init__(self, loss: str = "dpo", **settings):
        super().__init__()
        self.loss = loss
        self.settings = settings

    def forward(self, weight: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor, bias=None, **reference):
        return fused_linear_preference(hidden, weight, labels, bias, loss=self.loss, **self.settings, **reference)

    def extra_repr(self) -> str:
        return ", ".join([f"loss={self.loss!r}"] + [f"{k}={v!r}" for k, v in self.settings.items()])
