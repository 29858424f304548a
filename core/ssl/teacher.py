"""EMA teacher for self-distillation: a frozen copy of the student encoder and SSL heads.

The teacher starts as an exact copy of the student (``copy.deepcopy`` = the student's state
dict) and afterwards only moves by ``θ_t ← m·θ_t + (1 − m)·θ_s`` with the momentum ``m``
following a cosine from ``base`` (0.996) to 1 over the run, per iteration (DINO/iBOT).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def teacher_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """Cosine schedule ``1 − (1 − base)·(cos(π·step/total) + 1)/2``: base at 0, 1 at the end."""
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class EMATeacher(nn.Module):
    """``encoder`` (a copy of ``TCAE.encoder``) and ``heads`` (a copy of the SSL heads), no grads."""

    def __init__(self, encoder: nn.Module, heads: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        self.heads = copy.deepcopy(heads)
        self.requires_grad_(False)
        self.eval()  # timm blocks have no dropout by default; eval keeps it that way

    def train(self, mode: bool = True) -> "EMATeacher":
        return super().train(False)  # always in eval mode, whatever the trainer calls

    @torch.no_grad()
    def update(self, encoder: nn.Module, heads: nn.Module, momentum: float) -> None:
        """EMA step towards the student; buffers are copied."""
        for t_mod, s_mod in ((self.encoder, encoder), (self.heads, heads)):
            t_params = [p for _, p in sorted(t_mod.named_parameters())]
            s_params = [p for _, p in sorted(s_mod.named_parameters())]
            if len(t_params) != len(s_params):
                raise RuntimeError("teacher and student have different parameter sets")
            torch._foreach_mul_(t_params, momentum)
            torch._foreach_add_(t_params, [p.detach().to(t.dtype) for p, t in zip(s_params, t_params)],
                                alpha=1.0 - momentum)
            for (_, tb), (_, sb) in zip(sorted(t_mod.named_buffers()), sorted(s_mod.named_buffers())):
                tb.copy_(sb)
