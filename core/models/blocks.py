"""Token-grid layers of the TC-AE tokenizer: staged (de)compression and the latent bottleneck.

Tokens travel as ``(B, H, W, C)`` channel-last grids between these layers (the Transformer
blocks see them flattened to ``(B, H·W, C)``); the latent is ``(B, c, h, h)`` channel-first.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp


def float32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``x``'s device, where it is on: the layers inside compute in their
    parameters' dtype (float32).  A no-op on devices autocast does not know (meta)."""
    if x.device.type not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def unshuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """Merge r×r neighbours: (B, H, W, C) -> (B, H/r, W/r, C·r²)."""
    return F.pixel_unshuffle(x.permute(0, 3, 1, 2), r).permute(0, 2, 3, 1)


def shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """Split each token into r×r: (B, H, W, C·r²) -> (B, H·r, W·r, C)."""
    return F.pixel_shuffle(x.permute(0, 3, 1, 2), r).permute(0, 2, 3, 1)


class ConvCompress(nn.Module):
    """Two-layer convolution halving each side (paper App. B default).

    (B, H, W, d) -> Conv3x3 stride 2 -> GELU -> Conv3x3 -> (B, H/2, W/2, d).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.down = nn.Conv2d(dim, dim, 3, stride=2, padding=1)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = self.conv(self.act(self.down(x)))
        return x.permute(0, 2, 3, 1)


class ConvDecompress(nn.Module):
    """Mirror of :class:`ConvCompress`: Conv3x3 -> GELU -> ConvTranspose 2x2 stride 2."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.act = nn.GELU()
        self.up = nn.ConvTranspose2d(dim, dim, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = self.up(self.act(self.conv(x)))
        return x.permute(0, 2, 3, 1)


class ShuffleCompress(nn.Module):
    """2×2 pixel-unshuffle merge (4d channels) then an MLP dividing channels by 4 (Table 8)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = Mlp(4 * dim, hidden_features=dim, out_features=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(unshuffle(x, 2))


class ShuffleDecompress(nn.Module):
    """Mirror of :class:`ShuffleCompress`: MLP d -> 4d then 2×2 pixel-shuffle split."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = Mlp(dim, hidden_features=dim, out_features=4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shuffle(self.mlp(x), 2)


def compression(kind: str, dim: int) -> nn.Module:
    if kind == "conv":
        return ConvCompress(dim)
    if kind == "shuffle_mlp":
        return ShuffleCompress(dim)
    raise ValueError(f"compression={kind!r} must be 'conv' or 'shuffle_mlp'")


def decompression(kind: str, dim: int) -> nn.Module:
    if kind == "conv":
        return ConvDecompress(dim)
    if kind == "shuffle_mlp":
        return ShuffleDecompress(dim)
    raise ValueError(f"compression={kind!r} must be 'conv' or 'shuffle_mlp'")


class ToLatent(nn.Module):
    """Final bottleneck: (B, T', T', d) tokens -> (B, c, h, h) latent.

    T' > h: pixel-unshuffle merge by r = T'/h (d·r² channels), then MLP to c.
    T' = h: MLP d -> c.
    T' < h: MLP d -> c·r² with r = h/T', then pixel-shuffle split to h.
    """

    def __init__(self, dim: int, tokens: int, latent_size: int, latent_channels: int):
        super().__init__()
        self.merge = tokens // latent_size if tokens >= latent_size else 1
        self.split = latent_size // tokens if tokens < latent_size else 1
        in_dim = dim * self.merge**2
        self.mlp = Mlp(in_dim, hidden_features=dim, out_features=latent_channels * self.split**2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge > 1:
            x = unshuffle(x, self.merge)
        x = self.mlp(x)
        if self.split > 1:
            x = shuffle(x, self.split)
        return x.permute(0, 3, 1, 2).contiguous()


class FromLatent(nn.Module):
    """Inverse of :class:`ToLatent`: (B, c, h, h) latent -> (B, T', T', d) decoder tokens."""

    def __init__(self, dim: int, tokens: int, latent_size: int, latent_channels: int):
        super().__init__()
        self.split = tokens // latent_size if tokens >= latent_size else 1
        self.merge = latent_size // tokens if tokens < latent_size else 1
        in_dim = latent_channels * self.merge**2
        self.mlp = Mlp(in_dim, hidden_features=dim, out_features=dim * self.split**2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z.permute(0, 2, 3, 1)
        if self.merge > 1:
            x = unshuffle(x, self.merge)
        x = self.mlp(x)
        if self.split > 1:
            x = shuffle(x, self.split)
        return x
