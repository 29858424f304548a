"""The embedded feature networks: the offline FID/IS backbone and, separately, the
network behind the offline perceptual (LPIPS-substitute) loss.

No machine here can download Inception or VGG weights, so the project ships two small
conv classifiers trained on its own synthetic data set (``core/eval/train_featnet.py``,
deterministic, weights committed under ``core/assets/``):

* ``embedded-featnet-v1`` (``featnet_v1.pt``): the offline FID/IS backbone only;
* ``embedded-featnet-fmnist-v1`` (``featnet_fmnist_v1.pt``): the same layout trained on the
  Fashion-MNIST train split only (``eval.fid_backbone: embedded-fmnist``), for real images;
* ``embedded-percepnet-v1`` (``percepnet_v1.pt``): the LPIPS substitute used for the
  training loss and the offline LPIPS metric.  Different widths, max- instead of
  average-pooling, another init seed and another synthetic draw: no shared weights, so a
  tokenizer trained with the perceptual loss does not optimise the very features its
  offline rFID is computed on (tests/core/test_perceptual.py checks it).

Numbers they produce carry their backbone names and are NOT comparable to Inception
FID/IS or LPIPS-VGG.

Layout (32x32 input, native size)::

    stage1  conv3x3(3->32)                             -> (B, 32, 32, 32)
    stage2  avgpool2  conv3x3(32->64)  conv3x3(64->64) -> (B, 64, 16, 16)
    stage3  avgpool2  conv3x3(64->96)  conv3x3(96->96) -> (B, 96, 8, 8)
    stage4  avgpool2  conv3x3(96->128)                 -> (B, 128, 4, 4)
    pool    global average                             -> (B, 128)   FID features
    head    linear(128 -> num_classes)                 -> logits     IS

every conv followed by BatchNorm + ReLU.  The perceptual network has the same layout with
widths (24, 48, 64, 96) and max-pooling.  The network is fully convolutional: ``taps``
runs at any resolution (LPIPS substitute); ``features`` resizes to the native 32x32 first
so FID/IS features mean the same thing at every image size.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATNET_NAME = "embedded-featnet-v1"
FEATNET_FMNIST_NAME = "embedded-featnet-fmnist-v1"  # same layout, trained on Fashion-MNIST train only
PERCEPNET_NAME = "embedded-percepnet-v1"
NATIVE_SIZE = 32
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_WEIGHTS = _ASSETS / "featnet_v1.pt"
FMNIST_WEIGHTS = _ASSETS / "featnet_fmnist_v1.pt"
PERCEPNET_WEIGHTS = _ASSETS / "percepnet_v1.pt"
WIDTHS = (32, 64, 96, 128)
PERCEPNET_WIDTHS = (24, 48, 64, 96)


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class FeatNet(nn.Module):
    """Small VGG-style classifier on images in [-1, 1] (see the module docstring)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = WIDTHS, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        w1, w2, w3, w4 = widths
        down = nn.AvgPool2d if pool == "avg" else nn.MaxPool2d
        self.stages = nn.ModuleList([
            nn.Sequential(*_conv_bn_relu(3, w1)),
            nn.Sequential(down(2), *_conv_bn_relu(w1, w2), *_conv_bn_relu(w2, w2)),
            nn.Sequential(down(2), *_conv_bn_relu(w2, w3), *_conv_bn_relu(w3, w3)),
            nn.Sequential(down(2), *_conv_bn_relu(w3, w4)),
        ])
        self.head = nn.Linear(w4, num_classes)
        self.num_classes, self.widths, self.pool = num_classes, tuple(widths), pool

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs for x (B, 3, H, W) in [-1, 1]: [(B, 32, H, W), ..., (B, 128, H/8, W/8)]."""
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for x (B, 3, H, W) in [-1, 1] at the resolution given."""
        return self.head(self.taps(x)[-1].mean((2, 3)))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool (B, 128), logits (B, num_classes)) after resizing x to the native 32x32."""
        if x.shape[-2:] != (NATIVE_SIZE, NATIVE_SIZE):
            x = F.interpolate(x, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        pool = self.taps(x)[-1].mean((2, 3))
        return pool, self.head(pool)


def load_featnet(path: str | Path | None = None, device: str | torch.device = "cpu") -> FeatNet:
    """Load a committed feature network (frozen, eval mode).

    Parameters
    ----------
    path : weights file written by ``core/eval/train_featnet.py``; None = the committed
        ``core/assets/featnet_v1.pt`` (the FID/IS backbone; the perceptual network is
        ``PERCEPNET_WEIGHTS``).

    Raises
    ------
    FileNotFoundError
        when the file is missing (it names the script that regenerates it).
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded network weights not found: {path} "
            f"(regenerate with: python -m core.eval.train_featnet --arch "
            f"{'percepnet' if 'percep' in path.name else 'featnet-fmnist' if 'fmnist' in path.name else 'featnet'})"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise ValueError(f"{path}: not a featnet weights file (expected a dict with 'state_dict')")
    net = FeatNet(num_classes=int(blob["num_classes"]), widths=tuple(blob["widths"]), pool=blob.get("pool", "avg"))
    net.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    return net.to(device).eval().requires_grad_(False)
