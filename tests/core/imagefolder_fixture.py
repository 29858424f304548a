"""A class-sorted ImageFolder written by the tests: solid-colour classes, PNG and JPEG files.

``ImageFolderDataset`` lists samples class by class, as ImageNet's folders are; taking "the
first N" of such a split covers only the first classes — the failure these files expose.
Import with ``from imagefolder_fixture import write_imagefolder`` (pytest puts tests/core on
sys.path for the test modules in it).
"""
from __future__ import annotations

from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

# 20 well-separated colours: corners and edge midpoints of the RGB cube minus the greys.
_LEVELS = (0, 128, 255)
COLOURS = [c for c in product(_LEVELS, repeat=3) if len(set(c)) > 1][:20]


def write_imagefolder(root: str | Path, num_classes: int = 20, train_per_class: int = 12,
                      val_per_class: int = 6, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """Write ``root/{train,val}/class_XX/*.{png,jpg}``; returns ``root``.

    Class k is a solid colour (``COLOURS[k]``) with per-image brightness jitter and pixel
    noise, so images of a class differ but classes stay linearly separable.  Even classes
    are stored as PNG, odd ones as JPEG; images are ``size`` (W, H), not square, so the
    ImageNet protocol resizes and crops them.
    """
    if num_classes > len(COLOURS):
        raise ValueError(f"at most {len(COLOURS)} colour classes")
    root = Path(root)
    rng = np.random.default_rng(seed)
    w, h = size
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for k in range(num_classes):
            folder = root / split / f"class_{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.array(COLOURS[k], np.float64) * rng.uniform(0.85, 1.0) + rng.uniform(-10, 10)
                img = base + rng.normal(0, 6, (h, w, 3))
                arr = np.clip(np.round(img), 0, 255).astype(np.uint8)
                ext = "png" if k % 2 == 0 else "jpg"
                Image.fromarray(arr).save(folder / f"img_{i:03d}.{ext}", quality=95)
    return root
