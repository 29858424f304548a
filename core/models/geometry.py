"""Model size registries and the tokenizer geometry (check, decoder split) — no torch.

Config validation (``core.config.RunConfig``) and the orchestrator's sweep validation, dry
run and cost estimate (``core.models.flops_formulas``) need only these numbers; importing
the model code (torch, timm) would cost seconds per ``orchestrate submit``.
``core.models.tokenizer`` and ``core.models.dit`` re-export them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    heads: int


@dataclass(frozen=True)
class DiTSize:
    width: int
    depth: int
    heads: int


# Tokenizer encoder/decoder sizes. S/B/L follow ViT (paper Sec. 4); micro/mini train in seconds on a CPU.
VIT_SIZES: dict[str, ViTSize] = {
    "micro": ViTSize(48, 4, 3),
    "mini": ViTSize(96, 6, 4),
    "Ti": ViTSize(192, 12, 3),
    "S": ViTSize(384, 12, 6),
    "B": ViTSize(768, 12, 12),
    "L": ViTSize(1024, 24, 16),
}

# Generator sizes. S/B/L/XL follow DiT (XL ≈ 675M parameters); micro/mini train in seconds on a CPU.
DIT_SIZES: dict[str, DiTSize] = {
    "micro": DiTSize(64, 4, 4),
    "mini": DiTSize(128, 6, 4),
    "S": DiTSize(384, 12, 6),
    "B": DiTSize(768, 12, 12),
    "L": DiTSize(1024, 24, 16),
    "XL": DiTSize(1152, 28, 16),
}


def decoder_split(split_depth: int, encoder_depth: int, decoder_depth: int) -> int:
    """Decoder blocks on the full-resolution grid: round(k·D_d/D_e), halves rounded up.

    The decoder mirrors the encoder's proportion of full-grid blocks, so k = D_e (vanilla)
    gives D_d and k = 0 gives 0 (decompression right before the pixel projection).
    """
    return (2 * split_depth * decoder_depth + encoder_depth) // (2 * encoder_depth)


def check_geometry(
    image_size: int,
    patch_size: int,
    encoder_size: str,
    decoder_size: str,
    split_depth: int | None,
    latent_size: int,
) -> None:
    """Raise ValueError naming the parameter when the tokenizer cannot be built.

    T = image/patch tokens per side; staged compression (k < depth) halves T;
    the final bottleneck maps the T' grid to the h grid by pixel-shuffle merge
    (T' = r·h) or split (h = r·T').
    """
    for name, size in (("encoder_size", encoder_size), ("decoder_size", decoder_size)):
        if size not in VIT_SIZES:
            raise ValueError(f"{name}={size!r} is not a known size; choose from {sorted(VIT_SIZES)}")
    if patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"patch_size={patch_size} does not divide image_size={image_size}")
    depth = VIT_SIZES[encoder_size].depth
    k = depth if split_depth is None else split_depth
    if not 0 <= k <= depth:
        raise ValueError(f"split_depth={split_depth} must be in [0, {depth}] (encoder depth of {encoder_size!r})")
    tokens = image_size // patch_size
    if k < depth:
        if tokens % 2:
            raise ValueError(
                f"split_depth={k} asks staged compression to halve an odd {tokens}x{tokens} token grid "
                f"(image_size={image_size}, patch_size={patch_size})"
            )
        tokens //= 2
    if latent_size <= 0 or (tokens % latent_size if tokens >= latent_size else latent_size % tokens):
        raise ValueError(
            f"latent_size={latent_size} cannot be matched to the {tokens}x{tokens} token grid "
            f"(one side must divide the other)"
        )
