"""Closed-form FLOPs of the project's networks for ONE image — no torch.

The cost estimate (``orchestrator.cost``) prices a 1,000-run sweep from configs alone, so
it cannot build models; these formulas are the one place that knows their compute.  The
FLOP counter (``core.eval.flops``, torch) keeps them honest: ``tests/core/test_flops.py``
and ``tests/orchestrator/test_cost.py`` check every formula against it exactly.

Convention (= the counter's): FLOPs = 2 · MACs of matmuls and convolutions; element-wise
ops, norms, softmax and biases are not counted.
"""
from __future__ import annotations

from typing import Protocol

from core.models.geometry import DIT_SIZES, VIT_SIZES, decoder_split

INCEPTION_FLOPS = 11.43e9  # Inception-v3 at 299 px (torchvision inception_v3 through core.eval.flops)
VGG16_CONVS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
               (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]  # LPIPS taps


class TokenizerShape(Protocol):
    """What fixes the tokenizer's compute: ``core.config.ModelConfig`` or ``TokenizerArgs``."""

    patch_size: int
    encoder_size: str
    decoder_size: str
    split_depth: int | None
    compression: str
    latent_size: int
    latent_channels: int
    class_token: bool


def vit_block(n: int, d: int, mlp: int = 4) -> int:
    """ViT block on n tokens of width d: qkv 6nd², attention 4n²d, proj 2nd², MLP 4·mlp·nd²."""
    return 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 2 * n * d * mlp * d * 2


def mlp(positions: int, i: int, h: int, o: int) -> int:
    """Two-layer MLP i -> h -> o applied at ``positions`` positions."""
    return 2 * positions * (i * h + h * o)


def encoder_flops(m: TokenizerShape, side: int, bottleneck: bool = True) -> int:
    """Encoder on one ``side``×``side`` image (an SSL crop: ``bottleneck=False``, tokens only).

    Patch embedding on T = side/p tokens per side, k full-grid blocks, the staged
    compression to T' = T/2 when k < depth, depth − k blocks on T', then the bottleneck MLP
    that merges (T' > h) or splits (T' < h) the grid onto the h×h latent.
    """
    size = VIT_SIZES[m.encoder_size]
    d, p, depth = size.width, m.patch_size, size.depth
    k = depth if m.split_depth is None else m.split_depth
    t, cls = side // p, int(m.class_token)
    flops = 2 * t * t * d * 3 * p * p  # patch embedding
    flops += k * vit_block(t * t + cls, d)
    low = t // 2 if k < depth else t
    if k < depth:  # conv3x3 stride 2, or pixel-unshuffle + MLP 4d -> d -> d
        flops += 2 * 2 * low * low * d * d * 9 if m.compression == "conv" else mlp(low * low, 4 * d, d, d)
    flops += (depth - k) * vit_block(low * low + cls, d)
    if bottleneck:
        h, c = m.latent_size, m.latent_channels
        flops += mlp(h * h, d * (low // h) ** 2, d, c) if low >= h else mlp(low * low, d, d, c * (h // low) ** 2)
    return flops


def decoder_flops(m: TokenizerShape, image_size: int) -> int:
    """Decoder of one image: latent MLP, D_d − k_d blocks on T', decompression, k_d blocks on T,
    pixel projection (k_d = :func:`~core.models.geometry.decoder_split`)."""
    enc, size = VIT_SIZES[m.encoder_size], VIT_SIZES[m.decoder_size]
    d, p, h, c = size.width, m.patch_size, m.latent_size, m.latent_channels
    k = enc.depth if m.split_depth is None else m.split_depth
    k_dec = decoder_split(k, enc.depth, size.depth)
    t = image_size // p
    low = t // 2 if k < enc.depth else t
    flops = mlp(h * h, c, d, d * (low // h) ** 2) if low >= h else mlp(low * low, c * (h // low) ** 2, d, d)
    flops += (size.depth - k_dec) * vit_block(low * low, d)
    if k < enc.depth:  # conv3x3 on T'² + 2×2 transposed conv from T'² inputs, or MLP d -> d -> 4d
        flops += (2 * low * low * d * d * 9 + 2 * low * low * d * d * 4 if m.compression == "conv"
                  else mlp(low * low, d, d, 4 * d))
    flops += k_dec * vit_block(t * t, d)
    return flops + 2 * t * t * d * 3 * p * p  # pixel projection


def tokenizer_flops(m: TokenizerShape, image_size: int) -> dict[str, int]:
    """``{encoder, decoder, total}`` of one image (= ``core.eval.flops.tokenizer_flops`` of the built model)."""
    encoder, decoder = encoder_flops(m, image_size), decoder_flops(m, image_size)
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}


def dit_flops(size: str, latent_size: int, latent_channels: int) -> int:
    """One DiT forward on one latent (patch 1, N = h² tokens; SwiGLU hidden = 8d/3)."""
    s = DIT_SIZES[size]
    d, n, c = s.width, latent_size ** 2, latent_channels
    hidden = int(2 * d * 4.0 / 3)
    block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 2 * n * d * 2 * hidden + 2 * n * hidden * d
    block += 2 * d * 6 * d  # adaLN modulation (one vector per image)
    return 2 * n * c * d + 2 * (256 * d + d * d) + s.depth * block + 2 * d * 2 * d + 2 * n * d * c


def vgg16_flops(side: int) -> int:
    """LPIPS VGG16 conv taps (through conv5_3) on one side×side image."""
    flops, s = 0, side
    for layer in VGG16_CONVS:
        if layer == "M":
            s //= 2
            continue
        flops += 2 * s * s * layer[0] * layer[1] * 9
    return flops
