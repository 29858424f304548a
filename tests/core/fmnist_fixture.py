"""Fashion-MNIST test helpers: tiny idx files written by the tests, and whether the Debian package is here."""
import gzip
import struct
from pathlib import Path

import numpy as np

from core.data.fashion_mnist import DEFAULT_ROOT

HINT = "apt-get install dataset-fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
REAL = Path(DEFAULT_ROOT)
HAVE_REAL = all((REAL / f"{f}.gz").is_file() or (REAL / f).is_file() for f in FILES)
NO_REAL = f"Debian package dataset-fashion-mnist not installed ({DEFAULT_ROOT} lacks the idx files; {HINT})"


def idx_bytes(arr: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array: magic 0x000008<ndim>, big-endian sizes, data."""
    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fmnist(root: Path, n_train: int = 40, n_val: int = 20, gz: bool = True, seed: int = 0) -> dict:
    """Tiny idx files with random images and cyclic labels; returns the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(arr)
            path = root / (f"{prefix}-{kind}-ubyte" + (".gz" if gz else ""))
            path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
        out[prefix] = (images, labels)
    return out
