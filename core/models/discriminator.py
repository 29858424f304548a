"""Discriminator for decoder fine-tuning (RAE recipe, paper App. A): a frozen DINO ViT-S/8
backbone with trainable heads on several of its block outputs.

    x in [-1, 1] (B, 3, H, W) -> bilinear resize to image_size (224) -> ImageNet normalisation
    -> ViT-S/8 -> patch tokens (no CLS) after blocks 2, 5, 8, 11 and after the final norm
    -> 5 heads, each on (B, C, L):  SN-Conv1d k1 -> BN -> LeakyReLU(0.2)
                                    -> (x + [SN-Conv1d k9 circular -> BN -> LeakyReLU(0.2)](x)) / √2
                                    -> SN-Conv1d k1 to 1 channel
    -> logits (B, 5·L)

BatchNorm always uses the batch statistics (no running averages), as in StyleGAN-T/RAE.

Backbones (``backbone_name`` is recorded in the run's outputs):

* ``dino-vits8``: timm ``vit_small_patch8_224`` built with ``pretrained=False`` and loaded
  from a local state dict with timm key names (``finetune.dino_weights``);
* ``substitute-random-vit-ti8``: no weights file — a frozen, randomly initialised (fixed
  seed 0) ViT-Ti/8 of the same layout (12 blocks, same taps). A random projection
  discriminator, not comparable to DINO-based runs.
"""
from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch.nn.utils.parametrizations import spectral_norm

DINO_NAME = "dino-vits8"
SUBSTITUTE_NAME = "substitute-random-vit-ti8"
TAPS = (2, 5, 8, 11)  # block outputs fed to heads, plus the final normed output
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"finetune.dino_weights: file not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (timm vit_small_patch8_224 key names)")
    return {k.removeprefix("module."): v for k, v in blob.items() if not k.startswith("head.")}


def load_dino_vits8(path: str | Path, image_size: int = 224) -> VisionTransformer:
    """timm ViT-S/8 from a local state dict; the 28×28 position embedding is resampled when
    ``image_size`` is not 224.  Raises naming the file on missing/unexpected keys."""
    path = Path(path)
    state = _read_state_dict(path)
    vit = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, img_size=image_size)
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != vit.pos_embed.shape:
        grid = vit.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=1)
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a timm vit_small_patch8_224 state dict: {e}") from None
    return vit


def substitute_vit(image_size: int) -> VisionTransformer:
    """The named substitute: frozen random ViT-Ti/8, identical for every run (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return VisionTransformer(img_size=image_size, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                                 num_classes=0)


def _sn_conv(c_in: int, c_out: int, k: int) -> nn.Module:
    return spectral_norm(nn.Conv1d(c_in, c_out, k, padding=k // 2, padding_mode="circular"))


def _block(c: int, k: int) -> nn.Sequential:
    return nn.Sequential(_sn_conv(c, c, k), nn.BatchNorm1d(c, track_running_stats=False), nn.LeakyReLU(0.2))


class DiscHead(nn.Module):
    """(B, C, L) tokens -> (B, L) logits."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = _block(channels, 1)
        self.residual = _block(channels, 9)
        self.out = _sn_conv(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        x = (x + self.residual(x)) / math.sqrt(2)
        return self.out(x)[:, 0]


class Discriminator(nn.Module):
    """Frozen ViT backbone + trainable heads; ``forward(x in [-1, 1]) -> logits (B, 5·L)``.

    Parameters
    ----------
    weights : local timm ``vit_small_patch8_224`` state dict (DINO ViT-S/8); None -> substitute.
    image_size : side the inputs are resized to (224 for DINO; must be a multiple of 8).
    """

    def __init__(self, weights: str | Path | None = None, image_size: int = 224):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"finetune.disc_image_size={image_size} must be a multiple of 8 (ViT patch)")
        self.image_size = image_size
        if weights is not None:
            self.backbone, self.backbone_name = load_dino_vits8(weights, image_size), DINO_NAME
        else:
            self.backbone, self.backbone_name = substitute_vit(image_size), SUBSTITUTE_NAME
        self.backbone.requires_grad_(False).eval()
        width = self.backbone.embed_dim
        self.heads = nn.ModuleList(DiscHead(width) for _ in range(len(TAPS) + 1))
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "Discriminator":
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens (B, C, L) after blocks 2, 5, 8, 11 and the final norm."""
        x = F.interpolate((x + 1) / 2, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False)
        x = (x - self.mean) / self.std
        vit = self.backbone
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        prefix, feats = vit.num_prefix_tokens, []
        for i, blk in enumerate(vit.blocks):
            x = blk(x)
            if i in TAPS:
                feats.append(x[:, prefix:].transpose(1, 2))
        feats.append(vit.norm(x)[:, prefix:].transpose(1, 2))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(f) for head, f in zip(self.heads, self.features(x))], dim=1)
