"""Reconstruction metrics on uint8 images: PSNR and SSIM.

Outputs are quantised to uint8 before any metric (as DC-AE's evaluator does), so a
number does not depend on sub-quantum differences that no saved image would keep.
Both metrics match scikit-image on the same uint8 images:

* ``peak_signal_noise_ratio(a, b, data_range=255)``
* ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, channel_axis=-1, data_range=255)``

computed per image (float64), then averaged over the data set by the caller.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # scikit-image's default for gaussian_weights=True
_SSIM_RADIUS = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)  # 5 -> an 11x11 window


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Quantise images in [-1, 1] to uint8 in [0, 255] (round half to even, clamped).

    Parameters
    ----------
    x : float tensor (B, 3, H, W) in [-1, 1] (values outside are clamped).

    Returns
    -------
    uint8 tensor (B, 3, H, W).
    """
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 expects a float tensor in [-1, 1], got dtype {x.dtype}")
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise TypeError(f"{name} expects uint8 images (use to_uint8), got {a.dtype} and {b.dtype}")
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"{name} expects two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with data_range 255.

    Parameters
    ----------
    a, b : uint8 tensors (B, C, H, W).

    Returns
    -------
    float64 tensor (B,); ``inf`` where the images are identical (as scikit-image).
    """
    _check_pair(a, b, "psnr")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(255.0**2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    # Same taps as scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5): (11,)
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
    return g / g.sum()


def _blur_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # Separable Gaussian, valid region only: scikit-image crops `radius` pixels from each
    # border before averaging, and the cropped values never touch the padding.
    # x: (B*C, 1, H, W) -> (B*C, 1, H-2r, W-2r)
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian 11x11 window, sigma 1.5, population covariance, range 255).

    The SSIM map is averaged over the valid region of each channel, then over channels,
    exactly as scikit-image's ``structural_similarity`` with ``channel_axis``.

    Parameters
    ----------
    a, b : uint8 tensors (B, C, H, W) with H, W >= 11.

    Returns
    -------
    float64 tensor (B,).
    """
    _check_pair(a, b, "ssim")
    B, C, H, W = a.shape
    win = 2 * _SSIM_RADIUS + 1
    if H < win or W < win:
        raise ValueError(f"ssim needs images of at least {win}x{win} pixels, got {H}x{W}")
    g = _gaussian_window(a.device)
    x = a.double().reshape(B * C, 1, H, W)
    y = b.double().reshape(B * C, 1, H, W)
    ux, uy = _blur_valid(x, g), _blur_valid(y, g)
    vx = _blur_valid(x * x, g) - ux * ux
    vy = _blur_valid(y * y, g) - uy * uy
    vxy = _blur_valid(x * y, g) - ux * uy
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.reshape(B, C, -1).mean(2).mean(1)


def psnr_mean(values: torch.Tensor) -> float:
    """Data-set PSNR: the mean of per-image PSNRs, skipping identical pairs (inf)."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.inf
