"""DINOv2-style objective (Oquab et al. 2023): iBOT's two losses with Sinkhorn-Knopp
teacher centring instead of the EMA centre, plus the KoLeo regulariser on the student's
(pre-head) class tokens of the global crops.

    Sinkhorn-Knopp: Q = exp(t / τ_t)ᵀ (K, B); Q /= ΣQ; 3× (rows to 1/K, columns to 1/B); Q·B
    KoLeo:          −mean_i log(‖x_i − x_nn(i)‖ + 1e-8), x L2-normalised, per global crop
    total:          L_cls + L_mim + ssl.koleo · Σ_crops KoLeo   (the weight is applied here)

The patch teacher is balanced over the masked tokens of both global crops only (as in
DINOv2; a weight selects them, no shape depends on the masks), so it needs no patch centre.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from core.ssl.dino import cross_crop_loss, teacher_temperature
from core.ssl.ibot import masked_patch_loss


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_out: torch.Tensor, temp: float, iterations: int = 3,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) teacher logits -> (B, K) soft assignments with equal mass per prototype.

    ``weight`` (B,) bool: balance over the selected rows only (the others come out 0), as if
    only they had been passed."""
    q = torch.exp(teacher_out.float() / temp).t()  # (K, B)
    if weight is None:
        n = torch.full((), float(q.shape[1]), device=q.device)  # a fill kernel: no host-to-device copy
        safe = lambda t: t  # noqa: E731
    else:
        q = torch.where(weight[None], q, 0.0)
        n = weight.float().sum()
        safe = lambda t: torch.where(t > 0, t, 1.0)  # noqa: E731  (no selected row: all 0, not NaN)
    _all_reduce(n)
    K = q.shape[0]
    q /= safe(_all_reduce(q.sum()))
    for _ in range(iterations):
        q /= safe(_all_reduce(q.sum(dim=1, keepdim=True)))
        q /= K
        q /= safe(q.sum(dim=0, keepdim=True))
        q /= safe(n)
    q *= n
    return q.t().to(teacher_out.dtype)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko differential-entropy regulariser on (B, d) features."""
    x = F.normalize(x, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-1.0)  # never pick yourself as nearest neighbour
        nn_idx = dots.argmax(dim=1)
    dist_nn = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
    return -torch.log(dist_nn + eps).mean()


class DINOv2Loss(nn.Module):
    """``ssl.method: dinov2``: class + masked-patch distillation, SK centring, KoLeo."""

    uses_patches = True
    uses_masks = True

    def __init__(self, out_dim: int, patch_out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0,
                 koleo: float = 0.1, **_):
        super().__init__()
        self.student_temp = student_temp
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_steps)
        self.koleo_weight = koleo

    def teacher_temp(self, step: int) -> float:
        return teacher_temperature(step, *self.temps)

    def forward(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor, step: int,
                student_patch: torch.Tensor, teacher_patch: torch.Tensor, masks: torch.Tensor,
                student_cls_features: torch.Tensor, **_) -> dict[str, torch.Tensor]:
        temp = self.teacher_temp(step)
        t_cls = sinkhorn_knopp(teacher_cls.detach(), temp)
        # called even with no masked token: under DDP every rank must join the all-reduces
        B2, N, K = teacher_patch.shape
        t_patch = sinkhorn_knopp(teacher_patch.detach().reshape(B2 * N, K), temp,
                                 weight=masks.reshape(B2 * N)).view(B2, N, K)  # 0 on unmasked tokens
        koleo = sum(koleo_loss(f) for f in student_cls_features.chunk(2))
        return {
            "cls": cross_crop_loss(student_cls, t_cls, self.student_temp),
            "mim": masked_patch_loss(student_patch, t_patch, masks, self.student_temp),
            "koleo": self.koleo_weight * koleo,
        }
