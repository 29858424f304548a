"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (the four original idx files).

``data.name: fashion_mnist`` reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from
``data.root`` (unset: ``/usr/share/datasets/fashion-mnist``, where ``apt-get install
dataset-fashion-mnist`` puts them).  Split ``train`` = the 60,000 training images, ``val`` =
the 10,000 test images; 10 balanced classes (T-shirt/top … ankle boot), labels from the label
files.

Geometry: the 28×28 grayscale images are zero-padded (black, the dataset's background) to
``data.image_size`` — 2 px per side at the default 32 — and repeated to 3 channels.  Padding
keeps every pixel; sizes below 28 are refused (no resampling anywhere).

Memory: the split is one uint8 (N, 28, 28) array (47 MB for train), decoded once; an image is
padded when it is read.  Augmentation is the trainer's (``data.hflip``), as for ImageFolder.

idx format (LeCun): big-endian magic ``0x0000 08 <ndim>`` (08 = unsigned byte), ``ndim``
big-endian uint32 sizes, then the bytes.  Gzip or raw, told apart by the gzip magic, not the
file name.  A missing, truncated or foreign file raises :class:`FashionMNISTError` whose message
is one line naming the file, what is wrong and the install hint; :func:`check_files` returns that
line without raising (the orchestrator's preflight calls it before anything is submitted).
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "install it with: apt-get install dataset-fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NATIVE_SIZE = 28
# split -> file name prefix (the original files hold 60,000 resp. 10,000 images; smaller,
# self-consistent files, as the tests write, are accepted)
SPLITS = {"train": "train", "val": "t10k"}
_GZIP_MAGIC = b"\x1f\x8b"


class FashionMNISTError(ValueError):
    """A Fashion-MNIST file is missing, truncated or not what it should be (one-line message)."""


def resolve_root(root: str | Path | None) -> Path:
    """``data.root`` or, when unset, the Debian package's folder."""
    return Path(root if root else DEFAULT_ROOT).expanduser()


def _find(root: Path, stem: str) -> Path:
    """``root/stem`` or ``root/stem.gz`` (the raw file wins when both exist)."""
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FashionMNISTError(f"{root / (stem + '.gz')}: no such file (nor {stem}); {INSTALL_HINT}")


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _header(path: Path, f, ndim: int) -> tuple[int, ...]:
    """Check the magic of an ``ndim``-d unsigned-byte idx file and return its sizes."""
    head = f.read(4 + 4 * ndim)
    if len(head) < 4:
        raise FashionMNISTError(f"{path}: empty or truncated before the idx header; {INSTALL_HINT}")
    zero, dtype, nd = struct.unpack(">HBB", head[:4])
    if zero != 0 or dtype != 0x08 or nd != ndim:
        raise FashionMNISTError(
            f"{path}: not an idx{ndim} unsigned-byte file (magic {head[:4].hex()}, "
            f"expected 000008{ndim:02x}); {INSTALL_HINT}")
    if len(head) < 4 + 4 * ndim:
        raise FashionMNISTError(f"{path}: truncated inside the idx header; {INSTALL_HINT}")
    return struct.unpack(f">{ndim}I", head[4:])


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """uint8 array of an idx file (gzip or raw) with ``ndim`` dimensions.

    Raises
    ------
    FashionMNISTError naming the file when it is missing, truncated, of another type or
    longer than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise FashionMNISTError(f"{path}: no such file; {INSTALL_HINT}")
    try:
        with _open(path) as f:
            shape = _header(path, f, ndim)
            want = int(np.prod(shape))
            data = f.read(want)
            extra = f.read(1)
    except (OSError, EOFError, zlib.error) as e:  # gzip: "Compressed file ended before ..." / bad CRC
        raise FashionMNISTError(f"{path}: unreadable or truncated ({e}); {INSTALL_HINT}") from None
    if len(data) < want:
        raise FashionMNISTError(
            f"{path}: truncated: {len(data)} of {want} data bytes for shape {shape}; {INSTALL_HINT}")
    if extra:
        raise FashionMNISTError(f"{path}: longer than its header's shape {shape} says; {INSTALL_HINT}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def load_split(root: str | Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of ``split`` ('train' | 'val'), checked."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be 'train' or 'val'")
    root = resolve_root(root)
    prefix = SPLITS[split]
    img_path, lab_path = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
    if images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):
        raise FashionMNISTError(f"{img_path}: images are {images.shape[1:]}, not 28x28; {INSTALL_HINT}")
    if len(images) != len(labels):
        raise FashionMNISTError(
            f"{lab_path}: {len(labels)} labels for {len(images)} images in {img_path.name}; {INSTALL_HINT}")
    if labels.max(initial=0) >= len(CLASSES):
        raise FashionMNISTError(f"{lab_path}: label {int(labels.max())} outside 0..9; {INSTALL_HINT}")
    return images, labels.astype(np.int64)


def check_files(root: str | Path | None, image_size: int = 32) -> str | None:
    """What is wrong with the Fashion-MNIST files under ``root`` for ``image_size`` (None: fine).

    Reads every file once (~0.5 s for the real ones), so truncation is found here, before a
    job starts, not inside it.
    """
    if image_size < NATIVE_SIZE:
        return (f"data.image_size={image_size}: Fashion-MNIST images are 28x28 and are only padded, "
                f"never downscaled; use data.image_size >= 28 (32 pads 2 px per side)")
    try:
        for split in SPLITS:
            load_split(root, split)
    except FashionMNISTError as e:
        return str(e)
    return None


class FashionMNIST(Dataset):
    """``(image float32 (3, S, S) in [-1, 1], label int)`` of Fashion-MNIST, S = ``image_size``."""

    num_classes = len(CLASSES)
    classes = CLASSES

    def __init__(self, root: str | Path | None, split: str, image_size: int = 32):
        if image_size < NATIVE_SIZE:
            raise ValueError(f"data.image_size={image_size}: Fashion-MNIST needs >= 28 "
                             "(images are padded, not resized)")
        self.root = resolve_root(root)
        self.images, self.labels = load_split(self.root, split)  # (N, 28, 28) uint8, (N,) int64
        self.image_size = image_size
        # Zero padding (top, left); the extra pixel of an odd margin goes bottom/right.
        self._pad = (image_size - NATIVE_SIZE) // 2

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def render_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` padded to (S, S, 3) uint8."""
        out = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        p = self._pad
        out[p:p + NATIVE_SIZE, p:p + NATIVE_SIZE] = self.images[index][..., None]
        return out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.render_uint8(index)).permute(2, 0, 1).float()
        return img / 127.5 - 1.0, self.label(index)
