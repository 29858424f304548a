"""Datasets: the embedded synthetic set, ImageFolder (ImageNet-256 protocol) and Fashion-MNIST
(Debian's idx files, padded to ``data.image_size``).

Every dataset yields ``(image float32 (3, H, W) in [-1, 1], label int)`` and offers
``render_uint8(index) -> (H, W, 3) uint8``, ``label(index)``,
``labels`` (int64 (N,), no image decoded) and ``num_classes``.
Subsets are taken only with :func:`balanced_subset` (class-stratified, seeded).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from core.data.fashion_mnist import FashionMNIST
from core.data.imagefolder import ImageFolderDataset, center_crop_arr
from core.data.sampler import DeterministicBatchSampler
from core.data.subset import balanced_subset, dataset_labels, subset_info
from core.data.synthetic import SyntheticShapes

if TYPE_CHECKING:
    from core.config import DataConfig

__all__ = [
    "build_dataset", "SyntheticShapes", "ImageFolderDataset", "FashionMNIST", "center_crop_arr", "DeterministicBatchSampler",
    "balanced_subset", "dataset_labels", "subset_info",
]


def build_dataset(data_cfg: "DataConfig", split: str):
    """The ``split`` ('train' | 'val') dataset described by ``data_cfg``.

    Raises
    ------
    ValueError / FileNotFoundError naming the offending ``data.*`` key or path.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} must be 'train' or 'val'")
    if data_cfg.name == "synthetic":
        size = data_cfg.train_size if split == "train" else data_cfg.val_size
        return SyntheticShapes(split, size, data_cfg.image_size, data_cfg.num_classes, data_cfg.seed)
    if data_cfg.name == "imagefolder":
        if not data_cfg.root:
            raise ValueError("data.root must be set when data.name is 'imagefolder'")
        return ImageFolderDataset(data_cfg.root, split, data_cfg.image_size)
    if data_cfg.name == "fashion_mnist":  # data.root unset: Debian's /usr/share/datasets/fashion-mnist
        return FashionMNIST(data_cfg.root, split, data_cfg.image_size)
    raise ValueError(f"data.name={data_cfg.name!r} is not a known dataset")
