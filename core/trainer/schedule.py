"""Per-step learning-rate schedule: linear warm-up to ``lr``, cosine decay to ``min_lr``."""
from __future__ import annotations

import math

import torch


def cosine_lr(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warm-up: ``lr · (step + 1) / warmup_steps`` for ``step < warmup_steps`` (never 0);
    then cosine from ``lr`` at the end of warm-up to ``min_lr`` at ``total_steps − 1``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr to ``lr · group['lr_scale']`` (scale 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
