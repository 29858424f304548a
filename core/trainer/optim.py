"""AdamW with weight decay on matrices only."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from core.config import OptimConfig

# Parameters that are never decayed regardless of their shape (tokens, position tables).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "register_tokens")


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to ≥2-D weights, not to norms, biases or learned tokens."""
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def build_optimizer(modules: Mapping[str, nn.Module], optim_cfg: "OptimConfig",
                    fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``modules`` (name → module), two groups.

    Frozen parameters (``requires_grad=False``) are left out; a parameter shared by two
    modules is optimised once.  The lr is set per step by :func:`core.trainer.schedule.set_lr`.
    ``fused`` (CUDA): one kernel for the whole update instead of a few per parameter.
    """
    seen: set[int] = set()
    decay, no_decay = [], []
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if decays(f"{prefix}.{name}", param) else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("nothing to optimise: every parameter is frozen")
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), fused=fused or None)
