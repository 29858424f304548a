"""TC-AE tokenizer: ViT encoder with staged token compression, pixel-shuffle bottleneck,
symmetric ViT decoder (paper Sec. 3, App. B; contracts in docs/ARCHITECTURE.md).

Shapes: image (B, 3, H, W); T = H/p tokens per side; with staged compression (split depth
k < encoder depth) the grid halves once to T' = T/2 (else T' = T); latent z (B, c, h, h).

Decoder split: with decoder depth D_d the decoder runs D_d − k_d blocks on the T'×T' grid,
decompresses 2×, then k_d = round(k·D_d/D_e) blocks on the full T×T grid (halves round up),
so that it mirrors the encoder's share of full-resolution blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from core.models.blocks import FromLatent, ToLatent, compression, decompression, float32_region
from core.models.geometry import VIT_SIZES, ViTSize, check_geometry, decoder_split  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from core.config import ModelConfig


# ViTSize, VIT_SIZES and check_geometry live in the torch-free core.models.geometry (config
# validation needs them without torch); re-exported here.


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TokenizerArgs:
    """Everything that fixes the tokenizer's architecture (a flat view of ModelConfig + image size)."""

    image_size: int
    patch_size: int
    encoder_size: str = "micro"
    decoder_size: str = "micro"
    split_depth: int | None = None  # k; None = encoder depth = vanilla (no staged compression)
    compression: str = "conv"  # 'conv' | 'shuffle_mlp'
    latent_size: int = 4  # h
    latent_channels: int = 16  # c
    class_token: bool = False

    @classmethod
    def from_config(cls, model_cfg: "ModelConfig", image_size: int) -> "TokenizerArgs":
        return cls(
            image_size=image_size,
            patch_size=model_cfg.patch_size,
            encoder_size=model_cfg.encoder_size,
            decoder_size=model_cfg.decoder_size,
            split_depth=model_cfg.split_depth,
            compression=model_cfg.compression,
            latent_size=model_cfg.latent_size,
            latent_channels=model_cfg.latent_channels,
            class_token=model_cfg.class_token,
        )


def tokenizer_args(model_cfg: "ModelConfig", image_size: int) -> TokenizerArgs:
    """Build :class:`TokenizerArgs` from ``core.config.ModelConfig`` and ``data.image_size``."""
    return TokenizerArgs.from_config(model_cfg, image_size)


def build_tokenizer(args: TokenizerArgs) -> "TCAE":
    """Build a freshly initialised :class:`TCAE` (weights depend only on the torch seed).

    Raises
    ------
    ValueError
        naming the parameter, for geometry that cannot be built (see :func:`check_geometry`).
    """
    return TCAE(args)


class TokenOutput(NamedTuple):
    cls: torch.Tensor | None  # (B, d) normed class token, None without one
    tokens: torch.Tensor  # (B, N', d) final normed encoder tokens, before the bottleneck
    grid: tuple[int, int]  # (h', w') with N' = h'·w'


def _blocks(n: int, size: ViTSize) -> nn.ModuleList:
    return nn.ModuleList(Block(size.width, size.heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(n))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, cls: torch.Tensor | None):
    """Run blocks on a (B, H, W, d) grid with an optional (B, 1, d) class token prepended."""
    if len(blocks) == 0:
        return x, cls
    B, H, W, d = x.shape
    seq = x.reshape(B, H * W, d)
    if cls is not None:
        seq = torch.cat([cls, seq], dim=1)
    for block in blocks:
        seq = block(seq)
    if cls is not None:
        cls, seq = seq[:, :1], seq[:, 1:]
    return seq.reshape(B, H, W, d), cls


class Encoder(nn.Module):
    """Patch embed -> k blocks on T×T -> 2× token compression -> depth−k blocks -> norm -> bottleneck."""

    def __init__(self, args: TokenizerArgs):
        super().__init__()
        size = VIT_SIZES[args.encoder_size]
        d, p = size.width, args.patch_size
        k = size.depth if args.split_depth is None else args.split_depth
        self.patch_size = p
        self.grid = args.image_size // p  # T
        self.compressed = k < size.depth
        self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid, self.grid, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if args.class_token else None
        self.blocks1 = _blocks(k, size)
        self.compress = compression(args.compression, d) if self.compressed else nn.Identity()
        self.blocks2 = _blocks(size.depth - k, size)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        out_grid = self.grid // 2 if self.compressed else self.grid  # T'
        self.bottleneck = ToLatent(d, out_grid, args.latent_size, args.latent_channels)

    def pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        """(1, gh, gw, d) position embedding, bicubically resized when the grid is not T×T."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        pos = self.pos_embed.permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
        return pos.permute(0, 2, 3, 1)

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """(B, 3, H, W) -> (cls (B, 1, d) | None, normed token grid (B, h', w', d))."""
        B, _, H, W = x.shape
        step = 2 * self.patch_size if self.compressed else self.patch_size
        if H % step or W % step:
            raise ValueError(
                f"input {H}x{W} is not divisible by {step} (patch_size={self.patch_size}"
                f"{', doubled by staged compression' if self.compressed else ''})"
            )
        # The residual stream keeps the parameters' dtype (float32) in every arm: under bf16
        # autocast the conv patch embedding and (de)compression return bf16, and a stream cast
        # there only when split_depth < depth would confound split depth with precision.
        dtype = self.pos_embed.dtype
        x = self.patch_embed(x).permute(0, 2, 3, 1).to(dtype)  # (B, gh, gw, d)
        gh, gw = x.shape[1:3]
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape[0] != B or mask[0].numel() != gh * gw:
                raise ValueError(
                    f"mask must be bool (B={B}, {gh}, {gw}) for this input; got {mask.dtype} {tuple(mask.shape)}"
                )
            mask = mask.reshape(B, gh, gw, 1)  # accepts (B, gh, gw) or flattened (B, gh·gw)
            x = torch.where(mask, self.mask_token.to(x.dtype), x)
        x = x + self.pos_embed_for(gh, gw)
        cls = self.cls_token.expand(B, -1, -1) if self.cls_token is not None else None
        x, cls = _run_blocks(self.blocks1, x, cls)
        x = self.compress(x).to(dtype)
        x, cls = _run_blocks(self.blocks2, x, cls)
        x = self.norm(x)
        cls = self.norm(cls) if cls is not None else None
        return cls, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.tokens(x)[1])


class Decoder(nn.Module):
    """Latent -> MLP + inverse shuffle -> blocks -> 2× decompression -> blocks -> norm -> pixels."""

    def __init__(self, args: TokenizerArgs):
        super().__init__()
        enc, size = VIT_SIZES[args.encoder_size], VIT_SIZES[args.decoder_size]
        d, p = size.width, args.patch_size
        k = enc.depth if args.split_depth is None else args.split_depth
        k_dec = decoder_split(k, enc.depth, size.depth)
        self.patch_size = p
        compressed = k < enc.depth
        grid = args.image_size // p
        low = grid // 2 if compressed else grid  # T'
        self.from_latent = FromLatent(d, low, args.latent_size, args.latent_channels)
        self.pos_embed = nn.Parameter(torch.zeros(1, low, low, d))
        self.blocks1 = _blocks(size.depth - k_dec, size)
        self.decompress = decompression(args.compression, d) if compressed else nn.Identity()
        self.blocks2 = _blocks(k_dec, size)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.to_pixels = nn.Linear(d, 3 * p * p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dtype = self.pos_embed.dtype  # residual stream dtype, as in the encoder
        x = self.from_latent(z).to(dtype) + self.pos_embed  # (B, T', T', d)
        x, _ = _run_blocks(self.blocks1, x, None)
        x = self.decompress(x).to(dtype)  # (B, T, T, d)
        x, _ = _run_blocks(self.blocks2, x, None)
        with float32_region(x):  # pixels from a float32 projection
            x = self.to_pixels(self.norm(x).to(self.to_pixels.weight.dtype))  # (B, T, T, 3·p²)
        return F.pixel_shuffle(x.permute(0, 3, 1, 2), self.patch_size)  # (B, 3, H, W)


class TCAE(nn.Module):
    """The TC-AE tokenizer: ``encode(x) -> z (B, c, h, h)``, ``decode(z) -> x̂ (B, 3, H, W)``."""

    def __init__(self, args: TokenizerArgs):
        super().__init__()
        check_geometry(
            args.image_size, args.patch_size, args.encoder_size, args.decoder_size,
            args.split_depth, args.latent_size,
        )
        if args.compression not in ("conv", "shuffle_mlp"):
            raise ValueError(f"compression={args.compression!r} must be 'conv' or 'shuffle_mlp'")
        if args.latent_channels <= 0:
            raise ValueError(f"latent_channels={args.latent_channels} must be positive")
        self.args = args
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)
        self.apply(_init_weights)
        for param in (self.encoder.pos_embed, self.encoder.mask_token, self.encoder.cls_token,
                      self.decoder.pos_embed):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.decoder(z), z

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> TokenOutput:
        """Final encoder tokens (before the bottleneck) of any input whose side divides by p
        (2p with staged compression), e.g. SSL global and local crops.

        ``mask`` (B, H/p, W/p) bool (or flattened (B, N)) replaces the masked patch embeddings
        by the learnable mask token before the position embedding is added.
        """
        cls, grid = self.encoder.tokens(x, mask)
        B, gh, gw, d = grid.shape
        return TokenOutput(cls[:, 0] if cls is not None else None, grid.reshape(B, gh * gw, d), (gh, gw))

    def probe_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled tokens before the bottleneck (B, d), pooled latent (B, c)) for linear probing."""
        _, grid = self.encoder.tokens(x)
        z = self.encoder.bottleneck(grid)
        return grid.mean(dim=(1, 2)), z.mean(dim=(2, 3))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, h, h) of one image's latent."""
        return (self.args.latent_channels, self.args.latent_size, self.args.latent_size)

    @property
    def decoder_last_layer(self) -> torch.Tensor:
        """Weight of the final pixel projection (the GAN adaptive weight's reference layer)."""
        return self.decoder.to_pixels.weight

    def num_params(self) -> dict[str, int]:
        return {
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "decoder": sum(p.numel() for p in self.decoder.parameters()),
        }


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d) and m.kernel_size == m.stride:  # patch embedding, as in MAE/DiT
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
