"""Adversarial losses for decoder fine-tuning (RAE / taming-transformers recipe).

    D loss (hinge)    0.5 · (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))
    G loss            −mean D(x̂)
    adaptive weight   ‖∇_w L_rec‖ / (‖∇_w L_G‖ + 1e-6), clamped to [0, 1e4], detached,
                      w = the decoder's last layer; total = L_rec + λ_adv · weight · L_G
    DiffAugment       colour (brightness, saturation, contrast) + translation by up to 1/8
                      of the side with zero fill (Zhao et al. 2020), per image, from a generator
                      (or a :class:`core.seed.BatchRNG`: this rank's rows of the global batch)

Loss functions only: the fine-tuning objective that uses them is ``core.finetune``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from core.seed import BatchRNG, as_batch_rng


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4,
                    average: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at ``last_layer``.

    Both losses must still have their graphs; they are kept (``retain_graph``) for the
    trainer's backward.  ``average`` (data parallel: the mean over ranks) is applied to both
    gradients first, so every rank uses the weight of the global batch, as one process would.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    if average is not None:
        rec_grad, gan_grad = average(rec_grad), average(gan_grad)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-6)
    return weight.clamp(0.0, max_weight).detach()


def diff_augment(x: torch.Tensor, g: "torch.Generator | BatchRNG", translation: float = 0.125) -> torch.Tensor:
    """Differentiable colour + translation augmentation of (B, C, H, W) images in [-1, 1].

    Random numbers are drawn on the CPU from ``g`` and copied to ``x``'s device.
    """
    B, C, H, W = x.shape
    rng = as_batch_rng(g)
    rand = lambda: rng.rand(B, 1, 1, 1).to(x.device, non_blocking=True)  # noqa: E731  (B, 1, 1, 1)
    x = x + (rand() - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand() * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (rand() + 0.5) + mean  # contrast
    sy, sx = int(H * translation + 0.5), int(W * translation + 0.5)
    dy = rng.randint(-sy, sy + 1, B, 1, 1).to(x.device, non_blocking=True)
    dx = rng.randint(-sx, sx + 1, B, 1, 1).to(x.device, non_blocking=True)
    rows = torch.arange(H, device=x.device).view(1, H, 1) + dy  # source row of each output pixel
    cols = torch.arange(W, device=x.device).view(1, 1, W) + dx
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)  # (B, H, W)
    flat = (rows.clamp(0, H - 1) * W + cols.clamp(0, W - 1)).view(B, 1, H * W).expand(B, C, H * W)
    shifted = x.reshape(B, C, H * W).gather(2, flat).view(B, C, H, W)
    return shifted * inside[:, None].to(x.dtype)

