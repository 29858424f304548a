"""Training objectives: what a step optimises, separate from how the loop runs.

An objective turns a batch into a loss.  The loop sums the losses of all objectives,
back-propagates once, steps one optimizer over the model and every objective's
:meth:`Objective.modules`, then calls :meth:`Objective.after_step` (e.g. an EMA-teacher
update).  Its :meth:`Objective.state_dict` is saved in every checkpoint.

An objective that needs its own optimizer (a GAN discriminator, which *maximises* what
the generator minimises) keeps it inside, steps it in ``after_step`` and saves it in its
``state_dict``; :meth:`Objective.modules` lists only modules trained by the summed loss.
Which objectives a run uses is :func:`core.trainer.build.build_objectives`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from core.config import LossConfig


@runtime_checkable
class Objective(Protocol):
    def modules(self) -> dict[str, nn.Module]:
        """Extra trainable modules (name → module) added to the optimizer."""

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             step: int) -> tuple[torch.Tensor, dict[str, "float | torch.Tensor"]]:
        """(weighted scalar loss, logs) for images (B, 3, H, W) in [-1, 1].

        Log values are floats or detached 0-d tensors; the loop turns them into floats
        only at log steps (a ``float(tensor)`` per step would sync a GPU every step)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after the optimizer step ``step``."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ReconstructionObjective:
    """``l1 · |x̂ − x|₁ + perceptual · LPIPS(x̂, x)`` (paper Eq. 5 without the SSL term).

    The perceptual module is built only when its weight is positive; ``backbone`` names
    what computed it (None when off) and goes to the run's result.json.
    """

    name = "reconstruction"

    def __init__(self, loss_cfg: "LossConfig", device: torch.device | str = "cpu"):
        self.l1_weight, self.perceptual_weight = loss_cfg.l1, loss_cfg.perceptual
        self.perceptual, self.backbone = None, None
        if self.perceptual_weight > 0:
            from core.losses.perceptual import build_perceptual_loss  # heavy; only when used

            self.perceptual, self.backbone = build_perceptual_loss(loss_cfg, device)
            self.perceptual.requires_grad_(False)

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def loss(self, model, images, labels, step):
        x_hat, _ = model(images)
        x_hat = x_hat.float()  # losses in fp32 under bf16 autocast
        l1 = (x_hat - images).abs().mean()
        total, logs = self.l1_weight * l1, {"l1": l1.detach()}  # tensors: read only at log steps
        if self.perceptual is not None:
            perc = self.perceptual(x_hat, images).mean()
            total = total + self.perceptual_weight * perc
            logs["perceptual"] = perc.detach()
        return total, logs

    def after_step(self, model, step) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
