"""DINO self-distillation loss (Caron et al. 2021): class tokens across crops.

    p_t = softmax((t − c) / τ_t)       teacher: centred, then sharpened (τ_t warms up 0.04 → 0.07)
    L   = mean over pairs (q, v), q ∈ globals, v ∈ all crops, v ≠ q, of
          mean_b  Σ_k −p_t[q, b, k] · log_softmax(s[v, b] / τ_s)_k
    c  ← m·c + (1 − m)·mean_b t          after the loss, from the teacher's class outputs

Logit layout is crop-major: ``student_cls`` (n_crops·B, K) with the 2 global crops first,
``teacher_cls`` (2·B, K).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def teacher_temperature(step: int, warmup_temp: float, temp: float, warmup_steps: int) -> float:
    """Linear warm-up of the teacher temperature from ``warmup_temp`` to ``temp``, then constant."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / warmup_steps


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> None:
    """EMA of the teacher output's batch mean over all dims but the last (all-reduced when distributed)."""
    batch_sum = teacher_out.reshape(-1, teacher_out.shape[-1]).sum(dim=0, keepdim=True)
    # a fill kernel, not a host-to-device copy (which would sync the GPU every step)
    count = torch.full((), float(teacher_out.numel() // teacher_out.shape[-1]), device=center.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_sum)
        dist.all_reduce(count)
    center.mul_(momentum).add_(batch_sum / count, alpha=1.0 - momentum)


def cross_crop_loss(student_cls: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float,
                    n_global: int = 2) -> torch.Tensor:
    """Mean over pairs (q global, v any crop, v ≠ q) of the batch-mean cross-entropy."""
    n_crops = student_cls.shape[0] * n_global // teacher_probs.shape[0]
    s = F.log_softmax(student_cls / student_temp, dim=-1).chunk(n_crops)
    t = teacher_probs.chunk(n_global)
    total, pairs = 0.0, 0
    for q in range(n_global):
        for v in range(len(s)):
            if v == q:
                continue
            total = total + torch.sum(-t[q] * s[v], dim=-1).mean()
            pairs += 1
    return total / pairs


class DINOLoss(nn.Module):
    """Class-token distillation only (``ssl.method: dino``)."""

    uses_patches = False
    uses_masks = False

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0,
                 center_momentum: float = 0.9, **_):
        super().__init__()
        self.student_temp = student_temp
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_steps)
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp(self, step: int) -> float:
        return teacher_temperature(step, *self.temps)

    def forward(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor, step: int, **_) -> dict[str, torch.Tensor]:
        t = F.softmax((teacher_cls - self.center) / self.teacher_temp(step), dim=-1)
        loss = cross_crop_loss(student_cls, t.detach(), self.student_temp)
        update_center(self.center, teacher_cls.detach(), self.center_momentum)
        return {"cls": loss}
