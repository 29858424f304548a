"""ImageFolder loader with the ImageNet-256 protocol of ADM/DiT (``center_crop_arr``).

Layout: ``root/{train,val}/<class>/<image>``; classes are the sorted folder names.
Each image is box-downsampled by halves while its shorter side is ≥ 2× the target,
bicubically resized so the shorter side equals ``image_size``, then center-cropped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's preprocessing: (H, W, 3) uint8 of side ``image_size``."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.array(arr[top : top + image_size, left : left + image_size])  # own, writable copy


class ImageFolderDataset(Dataset):
    """``(image float32 (3, H, W) in [-1, 1], label int)`` from ``root/split/<class>/*``."""

    def __init__(self, root: str | Path, split: str, image_size: int):
        self.root = Path(root) / split
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root: no '{split}' folder at {self.root} (expected root/{split}/<class>/...)")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"data.root: {self.root} holds no class folders")
        # Paths relative to the split folder as one numpy bytes array and labels as one int64
        # array: ImageNet's 1.28M samples then take ~60 MB, not ~400 MB of Path objects, and
        # DataLoader workers do not copy them page by page through Python refcounts.
        files, labels = [], []
        for label, name in enumerate(self.classes):
            found = sorted(f for f in (self.root / name).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            files += [str(f.relative_to(self.root)).encode() for f in found]
            labels += [label] * len(found)
        if not files:
            raise FileNotFoundError(f"data.root: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.files = np.array(files)  # (N,) bytes
        self.labels = np.array(labels, dtype=np.int64)  # (N,), class-sorted like the folder listing
        self.image_size = image_size
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def path(self, index: int) -> Path:
        return self.root / self.files[index].decode()

    def render_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` after the protocol, as (H, W, 3) uint8."""
        with Image.open(self.path(index)) as im:
            return center_crop_arr(im.convert("RGB"), self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.render_uint8(index)).permute(2, 0, 1).float()
        return img / 127.5 - 1.0, self.label(index)
