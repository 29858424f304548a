"""Exponential moving average of a model's weights (evaluation copy)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """``shadow ← decay · shadow + (1 − decay) · weights`` after every optimizer step.

    The shadow is a frozen deep copy of the model; buffers are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema={decay} must be in (0, 1)")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # one multi-tensor kernel on CUDA instead of one per parameter (same arithmetic)
        torch._foreach_lerp_(list(self.shadow.parameters()), [p.detach() for p in model.parameters()],
                             1.0 - self.decay)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)

    def state_dict(self) -> dict:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state)
