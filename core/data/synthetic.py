"""The embedded dataset: deterministic, class-labelled, procedurally drawn images.

A class is a (shape family, fill texture) pair, e.g. "ring with stripes" or "triangle
with a checker fill".  Everything else is nuisance: position, scale, rotation, colour
(hue is *not* class-determined), a two-colour background gradient with pixel noise, and
0–2 low-contrast distractor shapes of other classes.  The main object sits within ±8 % of
the image centre, at 20–30 % of the side, rotated by up to ±1 rad; these ranges set the
difficulty (benchmarks/pixel_probe.py, 10 classes, 32 px: raw-pixel linear probe ≈ 39 %,
small CNN ≈ 89 %; with full rotation and ±22 % jitter the pixel probe fell to chance).

Determinism: image ``(seed, split, index)`` is drawn by ``numpy.random.Generator(PCG64)``
seeded with ``SeedSequence([seed, split_id, index])``, using only ``Generator.random``
(whose stream numpy keeps stable), float64 numpy arithmetic and a final rounding to uint8,
so every machine renders the same bytes.  Shapes are drawn at the target resolution from
analytic signed distances (anti-aliased over one pixel): no fonts, no resizing.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("disc", "ring", "square", "triangle", "cross", "star", "crescent", "frame")
TEXTURES = ("solid", "stripes", "checker")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)  # 24
SPLITS = {"train": 0, "val": 1}
CACHE_BYTES = 256 * 2 ** 20  # a split up to this size keeps its rendered images in memory


def class_parts(label: int) -> tuple[str, str]:
    """(shape, texture) of a class.  Classes 0..7 cover every shape and all 3 textures, and
    each shape meets every texture exactly once over the 24 classes."""
    shape = label % len(SHAPES)
    texture = (shape + label // len(SHAPES)) % len(TEXTURES)
    return SHAPES[shape], TEXTURES[texture]


def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (approximate; negative inside) in object units, radius ~1."""
    r = np.hypot(u, v)
    if shape == "disc":
        return r - 1.0
    if shape == "ring":
        return np.abs(r - 0.72) - 0.28
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "frame":
        return np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.66) - 0.2
    if shape == "triangle":  # equilateral, inradius 0.5, circumradius 1
        angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        return np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) - 0.5
    if shape == "cross":
        bar_h = np.maximum(np.abs(u) - 0.95, np.abs(v) - 0.3)
        bar_v = np.maximum(np.abs(u) - 0.3, np.abs(v) - 0.95)
        return np.minimum(bar_h, bar_v)
    if shape == "star":  # five lobes; scaled so the distance stays ~1-Lipschitz
        return (r - (0.68 + 0.32 * np.cos(5 * np.arctan2(v, u)))) / 1.6
    if shape == "crescent":
        bite = np.hypot(u - 0.5, v) - 0.75
        return np.maximum(r - 1.0, -bite)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """Fill pattern in [0, 1] (1 = full colour), anti-aliased over ``px`` object units."""
    if texture == "solid":
        return np.ones_like(u)
    if texture == "stripes":  # period 0.8 object units
        wave = np.sin(2 * np.pi * u / 0.8)
    elif texture == "checker":  # cells of 0.55 object units
        wave = np.sin(np.pi * u / 0.55) * np.sin(np.pi * v / 0.55)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.clip(0.5 + wave / (2 * np.pi * px / 0.8 + 1e-9), 0.0, 1.0)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)  # (3,)


class _Draw:
    """Uniform draws from one PCG64 stream (only ``Generator.random``: stable across numpy)."""

    def __init__(self, seed: int, split_id: int, index: int):
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, split_id, index])))

    def uniform(self, low: float = 0.0, high: float = 1.0, size=None):
        return low + (high - low) * self.rng.random(size)

    def integer(self, n: int) -> int:
        return min(int(self.rng.random() * n), n - 1)


def _paint(img, draw, size, shape, texture, scale, contrast, jitter):
    """Alpha-blend one textured shape, placed at random, into ``img`` (H, W, 3) in place."""
    cx, cy = draw.uniform(0.5 - jitter, 0.5 + jitter, 2) * size  # centre, pixels
    angle = draw.uniform(-1.0, 1.0)
    hue, sat, val = draw.uniform(), draw.uniform(0.45, 1.0), draw.uniform(0.55, 1.0)
    shade = draw.uniform(0.15, 0.45)  # brightness of the texture's "off" phase
    radius = scale * size  # pixels per object unit
    # Only the window that can be covered: every shape lies within 1.25 object units of
    # its centre, plus the one-pixel anti-aliasing ramp.
    reach = 1.25 * radius + 2
    x0, x1 = max(0, int(np.floor(cx - reach))), min(size, int(np.ceil(cx + reach)))
    y0, y1 = max(0, int(np.floor(cy - reach))), min(size, int(np.ceil(cy + reach)))
    ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    px = 1.0 / radius
    alpha = np.clip(0.5 - _shape_sdf(shape, u, v) / px, 0.0, 1.0) * contrast
    colour = _hsv_to_rgb(hue, sat, val)
    fill = _texture(texture, u, v, px)[..., None]
    paint = colour * (shade + (1 - shade) * fill)  # (h, w, 3) window
    win = img[y0:y1, x0:x1]
    win *= 1 - alpha[..., None]
    win += alpha[..., None] * paint


def render(label: int, size: int, draw: _Draw) -> np.ndarray:
    """Draw one image of class ``label`` as (size, size, 3) uint8."""
    # Background: a linear gradient between two random colours.
    c0 = _hsv_to_rgb(draw.uniform(), draw.uniform(0.0, 0.6), draw.uniform(0.15, 0.85))
    c1 = _hsv_to_rgb(draw.uniform(), draw.uniform(0.0, 0.6), draw.uniform(0.15, 0.85))
    theta = draw.uniform(0, 2 * np.pi)
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) / size
    t = np.clip(0.5 + (np.cos(theta) * (xs - 0.5) + np.sin(theta) * (ys - 0.5)), 0.0, 1.0)
    img = (1 - t)[..., None] * c0 + t[..., None] * c1  # (H, W, 3) in [0, 1]

    # Distractors: smaller, fainter shapes of other classes, drawn under the main object.
    for _ in range(draw.integer(3)):
        other = draw.integer(MAX_CLASSES - 1)
        other = other + (other >= label)
        shape, texture = class_parts(other)
        _paint(img, draw, size, shape, texture, draw.uniform(0.08, 0.14), draw.uniform(0.25, 0.45), 0.3)

    shape, texture = class_parts(label)
    _paint(img, draw, size, shape, texture, draw.uniform(0.2, 0.3), 1.0, 0.08)

    img += draw.uniform(-0.06, 0.06, img.shape)  # pixel noise
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


class SyntheticShapes(Dataset):
    """``(image float32 (3, H, W) in [-1, 1], label int)``, drawn lazily per item.

    Parameters
    ----------
    split : 'train' or 'val' — separate index streams of the same generator.
    size : number of images in the split.
    image_size : H = W, rendered at this resolution.
    num_classes : 2..24; labels are balanced (``label = index % num_classes``).
    seed : dataset seed (independent of the training seed).
    """

    def __init__(self, split: str, size: int, image_size: int = 32, num_classes: int = 10, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {sorted(SPLITS)}")
        if not 2 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"data.num_classes={num_classes} must be in [2, {MAX_CLASSES}] for the synthetic set")
        if image_size < 8:
            raise ValueError(f"data.image_size={image_size} is too small for the synthetic set (min 8)")
        if size <= 0:
            raise ValueError(f"{split} size={size} must be positive")
        self.split, self.size, self.image_size = split, size, image_size
        self.num_classes, self.seed = num_classes, seed
        self.classes = ["-".join(class_parts(c)) for c in range(num_classes)]
        # Rendered images are kept (per process) when the split fits in CACHE_BYTES: drawing
        # one costs ~1 ms, and a quickstart tokenizer draws its 4,096 images 2.3 times.
        self._cache: dict[int, np.ndarray] | None = {} if size * image_size ** 2 * 3 <= CACHE_BYTES else None

    def __len__(self) -> int:
        return self.size

    def label(self, index: int) -> int:
        return index % self.num_classes

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) labels of the split, without drawing an image."""
        return np.arange(self.size, dtype=np.int64) % self.num_classes

    def render_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` as (H, W, 3) uint8 — the bytes that are identical on every machine."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.size}")
        if self._cache is not None and index in self._cache:
            return self._cache[index].copy()
        img = render(self.label(index), self.image_size, _Draw(self.seed, SPLITS[self.split], index))
        if self._cache is not None:
            self._cache[index] = img.copy()
        return img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.render_uint8(index)).permute(2, 0, 1).float()
        return img / 127.5 - 1.0, self.label(index)
