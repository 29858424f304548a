"""DINO/iBOT projection heads: MLP -> L2-normalise -> weight-normalised prototypes.

    (B, ..., d) -> Linear(d, hidden) GELU Linear(hidden, hidden) GELU Linear(hidden, bottleneck)
                -> L2-normalise -> WN-Linear(bottleneck, out_dim, bias=False) -> (B, ..., out_dim)

The last layer's direction is learned and its norm g is fixed to 1 (``norm_last_layer`` in
DINO/iBOT), so every logit lies in [-1, 1].  ``nn.utils.parametrizations.weight_norm`` is
used because the old hook-based ``weight_norm`` breaks ``copy.deepcopy`` (EMA teacher).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from core.models.blocks import float32_region


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # (out_dim, 1) norm of each prototype
        g.data.fill_(1.0)
        g.requires_grad = False

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        """Logits (..., out_dim).  ``freeze_last_layer`` stops gradients into the prototypes
        (DINO cancels them during the first epoch); their grads then stay None, so AdamW
        also skips their weight decay, exactly like DINO's ``p.grad = None``."""
        x = self.mlp(x)
        # float32 from here under any autocast: the logits are divided by temperatures of
        # 0.04-0.1 and softmaxed, where bf16's 8 bits of mantissa would show.
        with float32_region(x):
            x = F.normalize(x.float(), dim=-1, eps=1e-6)
            w = self.last_layer.weight.float()  # (out_dim, bottleneck), recomputed from (g, v)
            if freeze_last_layer:
                w = w.detach()
            return F.linear(x, w)


class SSLHeads(nn.Module):
    """Class-token head and patch-token head; one shared head when ``patch_out_dim`` is None."""

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int | None, hidden_dim: int,
                 bottleneck_dim: int, use_patch: bool = True):
        super().__init__()
        self.cls_head = DINOHead(in_dim, out_dim, hidden_dim, bottleneck_dim)
        self.shared = patch_out_dim is None
        self.patch_head = None
        if use_patch and not self.shared:
            self.patch_head = DINOHead(in_dim, patch_out_dim, hidden_dim, bottleneck_dim)
        self.use_patch = use_patch
        self.patch_out_dim = out_dim if self.shared else patch_out_dim

    def forward_cls(self, cls: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        return self.cls_head(cls, freeze_last_layer)

    def forward_patch(self, tokens: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        head = self.cls_head if self.shared else self.patch_head
        return head(tokens, freeze_last_layer)
