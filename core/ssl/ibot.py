"""iBOT loss (Zhou et al. 2021): DINO's class-token loss + masked patch-token distillation.

    L_cls : :func:`core.ssl.dino.cross_crop_loss` (teacher global q vs student crop v ≠ q)
    L_mim : for each global crop q (student masked, teacher not), per image
            Σ_{masked n} Σ_k −p_t[q, b, n, k] · log_softmax(s[q, b, n] / τ_s)_k  /  max(#masked_b, 1),
            averaged over images and over the 2 global crops (unmasked images count as 0)

Separate centres for class and patch outputs, both EMA-updated after the loss (the patch
centre from all teacher tokens).  Shapes: ``student_patch`` and ``teacher_patch`` (2·B, N, K)
— every token, as iBOT's reference: no shape depends on the masks, so nothing waits for the
device to count them; ``masks`` (2·B, N) bool weighs the tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.ssl.dino import DINOLoss, cross_crop_loss, update_center


def masked_patch_loss(student_patch: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                      student_temp: float) -> torch.Tensor:
    """Per-image mean CE over masked tokens, averaged over all images of both global crops.

    ``student_patch`` logits / ``teacher_probs`` (2B, N, K) for every token; ``masks`` (2B, N)
    bool selects the ones that count.  Unmasked images count as 0.
    """
    ce = torch.sum(-teacher_probs * F.log_softmax(student_patch / student_temp, dim=-1), dim=-1)  # (2B, N)
    per_image = torch.where(masks, ce, 0.0).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1).to(ce.dtype)  # (2B,)
    return per_image.sum() / masks.shape[0]


class iBOTLoss(DINOLoss):
    """Class-token + masked-image-modelling distillation (``ssl.method: ibot``, the default).

    The class-token part, its centre and the teacher-temperature warm-up are DINO's; iBOT
    adds a separate patch centre (class and patch temperatures share one warm-up here).
    """

    uses_patches = True
    uses_masks = True

    def __init__(self, out_dim: int, patch_out_dim: int, **kw):
        super().__init__(out_dim, **kw)
        self.register_buffer("patch_center", torch.zeros(1, 1, patch_out_dim))

    def forward(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor, step: int,
                student_patch: torch.Tensor, teacher_patch: torch.Tensor, masks: torch.Tensor,
                **_) -> dict[str, torch.Tensor]:
        temp = self.teacher_temp(step)
        t_cls = F.softmax((teacher_cls - self.center) / temp, dim=-1).detach()
        t_patch = F.softmax((teacher_patch - self.patch_center) / temp, dim=-1).detach()
        losses = {
            "cls": cross_crop_loss(student_cls, t_cls, self.student_temp),
            "mim": masked_patch_loss(student_patch, t_patch, masks, self.student_temp),
        }
        update_center(self.center, teacher_cls.detach(), self.center_momentum)
        update_center(self.patch_center, teacher_patch.detach(), self.center_momentum)
        return losses
