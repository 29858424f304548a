"""Multi-crop augmentation (DINO/iBOT pipelines), vectorised over the batch in torch.

Every random number comes from a ``torch.Generator`` seeded by ``(seed, step, stream)``
(:func:`core.seed.step_generator`), so a resumed run draws exactly the crops it would have
drawn.  Passed as a :class:`core.seed.BatchRNG`, the numbers are those of this rank's rows of
the global batch: ranks draw different crops, and the global batch equals one process's.
The trainer's generator lives on the images' device: numbers are drawn there, nothing is
copied from the host and nothing branches on a drawn value (no host-device round trip).

Per crop, following DINO/iBOT: random-resized crop (area ``scale``, aspect 3/4..4/3) +
horizontal flip 0.5; colour jitter (brightness 0.4, contrast 0.4, saturation 0.2,
hue 0.1) with p 0.8; grayscale p 0.2; Gaussian blur (global 1: p 1.0, global 2: p 0.1,
locals: p 0.5); solarise (global 2 only, p 0.2).  Differences from torchvision, for
vectorisation: a crop wider than the image is clamped instead of re-drawn, jitter runs in
a fixed order, hue is a rotation in YIQ space, blur sigma U(0.1, 2) is given in 224-px
units and scaled to the crop size, and resizing is bilinear without antialiasing.

Images are (B, 3, H, W) in [-1, 1]; crops come out crop-major: ``globals`` (2·B, 3, S, S)
with rows [crop 0 of every image, crop 1 of every image], ``locals`` (L·B, 3, s, s).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.seed import BatchRNG, as_batch_rng, step_generator

_LUMA = torch.tensor((0.299, 0.587, 0.114))
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)  # once, on the CPU (on a GPU, inv checks its result: a sync)
RNG = "torch.Generator | BatchRNG"

__all__ = ["MultiCrop", "local_crop_size", "step_generator", "resized_crops", "color_jitter", "random_grayscale",
           "gaussian_blur", "solarize"]


def local_crop_size(image_size: int, multiple: int, size: int | None = None) -> int:
    """Local crop side: ``size`` or 3/7 of the image (DINO's 96/224), rounded to ``multiple``."""
    side = image_size * 3 / 7 if size is None else size
    out = max(multiple, int(round(side / multiple)) * multiple)
    if size is not None and out != size:
        raise ValueError(f"ssl.local_crop_size={size} must be a positive multiple of {multiple} "
                         f"(the encoder's input stride: patch size, doubled by staged compression)")
    return out


def _rand(g: RNG, n: int, lo: float, hi: float, device) -> torch.Tensor:
    """n uniforms in [lo, hi) on ``device`` (drawn on the generator's device; a copy only if they differ)."""
    return (lo + (hi - lo) * as_batch_rng(g).rand(n)).to(device, non_blocking=True)


def resized_crops(images: torch.Tensor, size: int, scale: tuple[float, float], g: RNG) -> torch.Tensor:
    """One random-resized, randomly flipped crop per image: (B, 3, H, W) -> (B, 3, size, size)."""
    B, device = images.shape[0], images.device
    area = _rand(g, B, scale[0], scale[1], device)
    log_ratio = _rand(g, B, math.log(3 / 4), math.log(4 / 3), device)
    # half-widths in normalised coordinates ([-1, 1] spans the image), clamped inside it
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (1 - w) * _rand(g, B, -1, 1, device)
    cy = (1 - h) * _rand(g, B, -1, 1, device)
    flip = torch.where(_rand(g, B, 0, 1, device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> luminance (B, 1, H, W)."""
    w = _const(_LUMA, x).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


_CONSTS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _const(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A module constant on ``x``'s device and dtype, copied there once per (device, dtype)."""
    key = (id(c), x.device, x.dtype)
    if key not in _CONSTS:
        _CONSTS[key] = c.to(device=x.device, dtype=x.dtype)
    return _CONSTS[key]


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def color_jitter(x: torch.Tensor, g: RNG, p: float = 0.8,
                 strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)) -> torch.Tensor:
    """Brightness, contrast, saturation, hue jitter on [0, 1] images, each image with prob ``p``."""
    B, device = x.shape[0], x.device
    b, c, s, hue = strength
    apply = _per_image(_rand(g, B, 0, 1, device) < p)
    fb, fc, fs = (_per_image(_rand(g, B, 1 - a, 1 + a, device)) for a in (b, c, s))
    angle = _per_image(_rand(g, B, -hue, hue, device) * 2 * math.pi)
    y = (x * fb).clamp(0, 1)
    mean = _gray(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * fc + mean).clamp(0, 1)
    gray = _gray(y)
    y = ((y - gray) * fs + gray).clamp(0, 1)
    # hue: rotate the chroma (I, Q) plane of YIQ by the angle
    yiq = torch.einsum("ij,bjhw->bihw", _const(_RGB2YIQ, x), y)
    cos, sin = torch.cos(angle)[:, 0], torch.sin(angle)[:, 0]  # (B, 1, 1)
    i, q = yiq[:, 1] * cos - yiq[:, 2] * sin, yiq[:, 1] * sin + yiq[:, 2] * cos
    yiq = torch.stack([yiq[:, 0], i, q], dim=1)
    y = torch.einsum("ij,bjhw->bihw", _const(_YIQ2RGB, x), yiq).clamp(0, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: torch.Tensor, g: RNG, p: float = 0.2) -> torch.Tensor:
    apply = _per_image(_rand(g, x.shape[0], 0, 1, x.device) < p)
    return torch.where(apply, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, g: RNG, p: float, sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma, applied with prob ``p`` (reflect padding)."""
    B, C, H, W = x.shape
    apply = _rand(g, B, 0, 1, x.device) < p  # blurred for all, kept where drawn: no branch on the draw
    sig = _rand(g, B, sigma[0], sigma[1], x.device) * H / 224  # sigma in 224-px units
    if p <= 0:
        return x
    radius = max(1, min(int(math.ceil(3 * sigma[1] * H / 224)), H // 2 - 1 if H > 3 else 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sig[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B·C, K)
    y = F.pad(x.reshape(1, B * C, H, W), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k.view(B * C, 1, -1, 1), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, 1, -1), groups=B * C)
    return torch.where(_per_image(apply), y.view(B, C, H, W), x)


def solarize(x: torch.Tensor, g: RNG, p: float) -> torch.Tensor:
    apply = _per_image(_rand(g, x.shape[0], 0, 1, x.device) < p)
    return torch.where(apply & (x >= 0.5), 1 - x, x)


class MultiCrop:
    """2 global crops (teacher and student) + ``local_crops`` local crops (student only)."""

    # (blur p, solarise p) for global crop 1, global crop 2, local crops (BYOL/DINO)
    BLUR = (1.0, 0.1, 0.5)
    SOLARIZE = (0.0, 0.2, 0.0)

    def __init__(self, global_size: int, local_size: int, local_crops: int,
                 global_scale: tuple[float, float] = (0.25, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.25)):
        self.global_size, self.local_size, self.local_crops = global_size, local_size, local_crops
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)

    def _view(self, images, size, scale, blur, sol, g):
        x = (resized_crops(images, size, scale, g) + 1) / 2  # [0, 1] for the photometric ops
        x = random_grayscale(color_jitter(x, g), g)
        x = solarize(gaussian_blur(x, g, blur), g, sol)
        return x * 2 - 1

    def __call__(self, images: torch.Tensor, g: RNG) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) in [-1, 1] -> (globals (2B, 3, S, S), locals (L·B, 3, s, s) or None)."""
        globals_ = [self._view(images, self.global_size, self.global_scale, self.BLUR[i], self.SOLARIZE[i], g)
                    for i in range(2)]
        locals_ = [self._view(images, self.local_size, self.local_scale, self.BLUR[2], self.SOLARIZE[2], g)
                   for _ in range(self.local_crops)]
        return torch.cat(globals_), (torch.cat(locals_) if locals_ else None)
