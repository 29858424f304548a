"""LPIPS perceptual distance (Zhang et al. 2018), our implementation.

    d(x, y) = sum_l  mean_hw  sum_c  w_lc * (f̂_l(x) - f̂_l(y))^2

f_l are backbone feature taps, f̂ = f / ||f||_channels (unit length per position), and w_l
are the learned non-negative 1x1 "lin" weights (uniform w = 1 when none are given, the
lpips package's ``lpips=False`` baseline).

Backbones (the name is recorded beside every LPIPS number):

* ``lpips-vgg16``: torchvision VGG16 taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 plus
  the lpips package's lin weights, from the local file ``loss.lpips_weights``;
* ``lpips-vgg16-uniformlin``: the same file without lin weights;
* ``lpips-substitute-percepnet-v1``: offline default (``loss.lpips_weights = None``): the
  four stage outputs of the embedded *perceptual* network (``core/assets/percepnet_v1.pt``),
  weights 1/4 (the layer mean).  Deliberately not the FID/IS network
  (``embedded-featnet-v1``): a perceptual loss on the FID features would let training
  optimise the offline rFID it is then compared on.  Not comparable to LPIPS-VGG numbers.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from core.eval.featnet import PERCEPNET_WEIGHTS, load_featnet

SUBSTITUTE_NAME = "lpips-substitute-percepnet-v1"

# VGG16 `features` indices of the last module of each tap (relu1_2 ... relu5_3).
_VGG_TAP_ENDS = (3, 8, 15, 22, 29)
_VGG_CHANNELS = (64, 128, 256, 512, 512)
# The lpips package's ScalingLayer: inputs in [-1, 1] -> VGG's ImageNet normalisation.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Taps(nn.Module):
    """torchvision VGG16 ``features[:30]`` returning the five LPIPS taps."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # Same modules and indices as torchvision.models.vgg16().features, without building
        # the 120M-parameter classifier.
        features = make_layers(cfgs["D"])[: _VGG_TAP_ENDS[-1] + 1]
        for m in features:
            if isinstance(m, nn.ReLU):
                m.inplace = False  # taps are kept for the distance; never overwrite them
        self.features = features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, start = [], 0
        for end in _VGG_TAP_ENDS:
            for i in range(start, end + 1):
                x = self.features[i](x)
            taps.append(x)
            start = end + 1
        return taps


class FeatNetTaps(nn.Module):
    """Stage outputs of an embedded network (LPIPS substitute); default: the perceptual
    network ``percepnet_v1.pt``, never the FID/IS one."""

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        self.net = load_featnet(PERCEPNET_WEIGHTS if weights is None else weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.taps(x)


class LPIPS(nn.Module):
    """Frozen LPIPS distance; gradients flow to the inputs only.

    Parameters
    ----------
    backbone : module mapping x (B, 3, H, W) to a list of L feature maps (B, C_l, H_l, W_l).
    lin_weights : L non-negative tensors (C_l,), or None for uniform weights (w = 1).
    shift, scale : per-channel input normalisation applied to x in [-1, 1].
    """

    def __init__(self, backbone: nn.Module, lin_weights: list[torch.Tensor] | None = None,
                 shift=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0)):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1))
        if lin_weights is not None:
            if any((w < 0).any() for w in lin_weights):
                raise ValueError("LPIPS lin weights must be non-negative")
            for i, w in enumerate(lin_weights):
                self.register_buffer(f"lin{i}", w.float().view(1, -1, 1, 1))
        self.num_lin = 0 if lin_weights is None else len(lin_weights)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # Always eval: a parent's .train() must not switch the backbone's BatchNorm to batch stats.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) between x and y (B, 3, H, W) in [-1, 1]; take ``.mean()`` for a loss."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        B = x.shape[0]
        # One backbone pass for both images: (2B, 3, H, W).
        taps = self.backbone((torch.cat([x, y]) - self.shift) / self.scale)
        if self.num_lin and len(taps) != self.num_lin:
            raise ValueError(f"backbone gave {len(taps)} taps, lin weights cover {self.num_lin}")
        total = x.new_zeros(B)
        for i, f in enumerate(taps):
            # Unit length along channels.  rsqrt(s + eps²) rather than the lpips package's
            # f / (sqrt(s) + eps): same value, but no NaN gradient where all channels are 0.
            f = f * torch.rsqrt(f.pow(2).sum(1, keepdim=True) + 1e-20)
            d = (f[:B] - f[B:]).pow(2)  # (B, C, h, w)
            if self.num_lin:
                d = d * getattr(self, f"lin{i}")
            total = total + d.sum(1).mean((1, 2))
        return total


def _load_vgg_lpips(path: Path) -> tuple[LPIPS, str]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ValueError(f"loss.lpips_weights: cannot read {path}: {e}") from e
    if not isinstance(sd, dict):
        raise ValueError(f"loss.lpips_weights: {path} does not hold a state dict")
    backbone = VGG16Taps()
    feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    expected = backbone.features.state_dict().keys()
    missing = sorted(set(expected) - set(feats))
    if missing:
        raise ValueError(
            f"loss.lpips_weights: {path} lacks torchvision vgg16 keys "
            f"{['features.' + k for k in missing[:4]]}... (expected a vgg16 state dict with 'features.*' "
            f"keys, optionally merged with the lpips package's 'lin0.model.1.weight' ... 'lin4.model.1.weight')"
        )
    backbone.features.load_state_dict({k: feats[k] for k in expected})
    lin_keys = [f"lin{i}.model.1.weight" for i in range(len(_VGG_CHANNELS))]
    present = [k in sd for k in lin_keys]
    if any(present) and not all(present):
        raise ValueError(f"loss.lpips_weights: {path} has only some of {lin_keys}")
    if all(present):
        lins = []
        for k, c in zip(lin_keys, _VGG_CHANNELS):
            if sd[k].numel() != c:
                raise ValueError(f"loss.lpips_weights: {path}: '{k}' has {sd[k].numel()} weights, expected {c}")
            lins.append(sd[k].flatten())
        return LPIPS(backbone, lins, _LPIPS_SHIFT, _LPIPS_SCALE), "lpips-vgg16"
    return LPIPS(backbone, None, _LPIPS_SHIFT, _LPIPS_SCALE), "lpips-vgg16-uniformlin"


def build_perceptual_loss(loss_cfg, device: str | torch.device = "cpu") -> tuple[LPIPS, str]:
    """Build the frozen LPIPS module named by ``loss_cfg.lpips_weights``.

    Parameters
    ----------
    loss_cfg : :class:`core.config.LossConfig`; ``lpips_weights`` is a local file holding a
        torchvision vgg16 state dict (optionally with the lpips lin weights), or None for
        the offline substitute on the embedded feature network.
    device : where the module lives.

    Returns
    -------
    (module, backbone_name): ``module(x_hat, x)`` gives per-image distances (B,);
    backbone_name is 'lpips-vgg16', 'lpips-vgg16-uniformlin' or 'lpips-substitute-percepnet-v1'.

    Raises
    ------
    FileNotFoundError / ValueError naming ``loss.lpips_weights`` and the file.
    """
    path = loss_cfg.lpips_weights
    if path is None:
        taps = FeatNetTaps()
        # w = 1/L: the mean over layers of 2·(1 − cosine similarity) per position, so the
        # substitute lives on LPIPS's scale (0 identical, ~1 unrelated) rather than L times it.
        lins = [torch.full((c,), 1.0 / len(taps.net.widths)) for c in taps.net.widths]
        module, name = LPIPS(taps, lins), SUBSTITUTE_NAME
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"loss.lpips_weights: file not found: {path}")
        module, name = _load_vgg_lpips(path)
    return module.to(device), name
