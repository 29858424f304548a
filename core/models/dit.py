"""Class-conditional latent diffusion transformer (LightningDiT-style) for gFID/IS.

Input: a normalised tokenizer latent ``x`` (B, c, h, h), time ``t`` in [0, 1] (B,) with
t = 1 pure noise, labels ``y`` (B,) in [0, num_classes] where ``num_classes`` is the null
class used for classifier-free guidance.  Output: the velocity (B, c, h, h).

Components (LightningDiT, Yao et al. 2025, on top of DiT, Peebles & Xie 2023):
- patchify with a p×p strided conv (p = 1 by default: tokenizer latents are small grids);
- adaLN-Zero conditioning on c = timestep embedding + class embedding;
- RMSNorm (no affine; adaLN supplies scale/shift) before attention and MLP, RMSNorm on q/k;
- SwiGLU MLP with hidden = 2/3 · 4 · width, so a block has the same parameters as DiT's GELU MLP;
- 2-D rotary position embedding on q/k (half the head dims rotate with the row, half with the
  column); no absolute position embedding.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.models.blocks import float32_region
from core.models.geometry import DIT_SIZES, DiTSize  # noqa: F401 (registry re-exported; torch-free)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, d); shift, scale (B, d)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------- embeddings


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000·t -> MLP -> (B, d).

    The 1000× scale gives the usual DiT frequency resolution for continuous flow-matching time.
    """

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(1000.0 * t, self.freq_dim).to(self.mlp[0].weight.dtype))


def rope_2d(grid: int, head_dim: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (N = grid², head_dim / 2) for 2-D RoPE on a row-major grid×grid sequence.

    The first head_dim/4 frequencies rotate with the row index, the next head_dim/4 with the column.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4; got head_dim={head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    pos = torch.arange(grid, dtype=torch.float32, device=device)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=-1)  # (N, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x1, x2) halves of x (B, heads, N, hd) by the angles of (N, hd/2) tables."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, N, d = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)  # (B, heads, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * dim * mlp_ratio / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate · f(modulate(norm(x))) for f = attention, SwiGLU."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        with float32_region(x):  # the velocity from a float32 projection
            w = self.linear.weight.dtype
            return self.linear(modulate(self.norm(x.to(w)), shift.to(w), scale.to(w)))


# ----------------------------------------------------------------------------- model


class DiT(nn.Module):
    """Velocity model v(x_t, t, y) on latents (B, c, h, h).

    Parameters
    ----------
    size : key of :data:`DIT_SIZES`.
    latent_channels, latent_size : c and h of the tokenizer latent.
    num_classes : number of real classes; label ``num_classes`` is the null (unconditional) class.
    patch_size : side of the latent patches that become tokens (must divide h).
    """

    def __init__(self, size: str, latent_channels: int, latent_size: int, num_classes: int, patch_size: int = 1):
        super().__init__()
        if size not in DIT_SIZES:
            raise ValueError(f"generator.size={size!r} is not a known size; choose from {sorted(DIT_SIZES)}")
        if patch_size <= 0 or latent_size % patch_size:
            raise ValueError(f"DiT patch_size={patch_size} does not divide latent_size={latent_size}")
        spec = DIT_SIZES[size]
        if spec.width % spec.heads or (spec.width // spec.heads) % 4:
            raise ValueError(f"DiT size {size!r}: head dim {spec.width}/{spec.heads} must be a multiple of 4")
        self.in_channels = latent_channels
        self.latent_size = latent_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.grid = latent_size // patch_size
        d = spec.width
        self.x_embedder = nn.Conv2d(latent_channels, d, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Embedding(num_classes + 1, d)  # last row: null class for CFG
        self.blocks = nn.ModuleList(DiTBlock(d, spec.heads) for _ in range(spec.depth))
        self.final_layer = FinalLayer(d, patch_size, latent_channels)
        cos, sin = rope_2d(self.grid, d // spec.heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def _init_weights(self) -> None:
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p²·c) -> (B, c, h, h)."""
        B, p, g = x.shape[0], self.patch_size, self.grid
        x = x.reshape(B, g, g, p, p, self.in_channels)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, self.in_channels, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.in_channels, self.latent_size, self.latent_size):
            raise ValueError(
                f"DiT expects latents (B, {self.in_channels}, {self.latent_size}, {self.latent_size}); "
                f"got {tuple(x.shape)}"
            )
        # (B, N, d), N = grid²; the residual stream stays in the parameters' dtype (float32)
        # under bf16 autocast, as the tokenizer's does.
        h = self.x_embedder(x).flatten(2).transpose(1, 2).to(self.x_embedder.weight.dtype)
        c = self.t_embedder(t.expand(x.shape[0])) + self.y_embedder(y)  # (B, d)
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            h = block(h, c, rope)
        return self.unpatchify(self.final_layer(h, c))

    def forward_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """Guided velocity v_u + scale·(v_c − v_u); one batched pass over cond and null labels.

        ``scale == 1`` is plain conditional sampling and skips the unconditional half.
        """
        if scale == 1.0:
            return self.forward(x, t, y)
        t = t.expand(x.shape[0])
        v = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
