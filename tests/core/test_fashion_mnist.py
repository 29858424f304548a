"""Fashion-MNIST (issue 19): idx reading, the dataset contract, errors at preflight, the real files."""
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import DataConfig, load_config
from core.data import balanced_subset, build_dataset, dataset_labels
from core.data.fashion_mnist import FashionMNIST, FashionMNISTError, check_files, read_idx
from fmnist_fixture import HAVE_REAL, HINT, NO_REAL, idx_bytes, write_fmnist

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_dataset_contract(tmp_path, gz):
    arrays = write_fmnist(tmp_path, gz=gz)
    ds = build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=32), "train")
    assert isinstance(ds, FashionMNIST) and len(ds) == 40 and ds.num_classes == 10
    assert ds.images.dtype == np.uint8 and ds.images.shape == (40, 28, 28)  # one array, no PIL objects
    images, labels = arrays["train"]
    np.testing.assert_array_equal(ds.labels, labels)
    assert dataset_labels(ds).dtype == np.int64 and ds.label(13) == 3
    u8 = ds.render_uint8(7)
    assert u8.shape == (32, 32, 3) and u8.dtype == np.uint8
    # 2 px of black padding per side, every pixel of the 28x28 image kept, 3 equal channels
    np.testing.assert_array_equal(u8[2:30, 2:30, 0], images[7])
    assert (u8[:2] == 0).all() and (u8[30:] == 0).all() and (u8[:, :2] == 0).all() and (u8[:, 30:] == 0).all()
    assert (u8[..., 0] == u8[..., 1]).all() and (u8[..., 1] == u8[..., 2]).all()
    x, y = ds[7]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == 7
    assert torch.equal(x, torch.from_numpy(u8).permute(2, 0, 1).float() / 127.5 - 1.0)
    assert x.min() >= -1 and x.max() <= 1
    val = build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)), "val")  # val = the t10k files
    assert len(val) == 20
    np.testing.assert_array_equal(val.images, arrays["t10k"][0])
    idx = balanced_subset(dataset_labels(val), 10, 0)
    assert sorted(val.labels[idx].tolist()) == list(range(10))


def test_other_sizes_pad_and_small_sizes_refused(tmp_path):
    arrays = write_fmnist(tmp_path)
    ds = FashionMNIST(tmp_path, "train", image_size=33)  # odd margin: 2 top/left, 3 bottom/right
    u8 = ds.render_uint8(0)
    assert u8.shape == (33, 33, 3)
    np.testing.assert_array_equal(u8[2:30, 2:30, 0], arrays["train"][0][0])
    with pytest.raises(ValueError, match="data.image_size=16"):
        FashionMNIST(tmp_path, "train", image_size=16)
    assert "data.image_size=16" in check_files(tmp_path, 16)


def _bad(tmp_path, name: str, data: bytes) -> Path:
    write_fmnist(tmp_path)
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _full(arr: np.ndarray, gz: bool) -> bytes:
    return gzip.compress(idx_bytes(arr), mtime=0) if gz else idx_bytes(arr)


@pytest.mark.parametrize("case", ["truncated_gzip", "truncated_raw", "wrong_magic", "labels_mismatch", "too_long",
                                  "empty", "missing"])
def test_hostile_files_give_one_line_naming_the_file(tmp_path, case):
    imgs = np.zeros((40, 28, 28), np.uint8)
    if case == "truncated_gzip":
        full = _full(imgs, True)
        path = _bad(tmp_path, "train-images-idx3-ubyte.gz", full[: len(full) // 2])
    elif case == "truncated_raw":
        write_fmnist(tmp_path)
        for f in tmp_path.glob("train-images*"):
            f.unlink()
        path = tmp_path / "train-images-idx3-ubyte"
        path.write_bytes(idx_bytes(imgs)[:-100])
    elif case == "wrong_magic":  # a labels file where the images belong
        path = _bad(tmp_path, "train-images-idx3-ubyte.gz", _full(np.zeros(40, np.uint8), True))
    elif case == "labels_mismatch":
        path = _bad(tmp_path, "train-labels-idx1-ubyte.gz", _full(np.zeros(39, np.uint8), True))
    elif case == "too_long":
        path = _bad(tmp_path, "train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(imgs) + b"\0"))
    elif case == "empty":
        path = _bad(tmp_path, "train-images-idx3-ubyte.gz", b"")
    else:
        write_fmnist(tmp_path)
        path = tmp_path / "t10k-labels-idx1-ubyte.gz"
        path.unlink()
    msg = check_files(tmp_path)
    assert msg is not None and "\n" not in msg and str(path) in msg and HINT in msg, msg
    with pytest.raises(FashionMNISTError) as e:
        FashionMNIST(tmp_path, "val" if case == "missing" else "train")
    assert str(e.value) == msg


def test_read_idx_magic_and_good_files(tmp_path):
    write_fmnist(tmp_path)
    assert check_files(tmp_path) is None
    assert read_idx(tmp_path / "train-labels-idx1-ubyte.gz", 1).shape == (40,)
    with pytest.raises(FashionMNISTError, match="not an idx3 unsigned-byte file"):
        read_idx(tmp_path / "train-labels-idx1-ubyte.gz", 3)


def test_submit_refuses_bad_files_at_preflight(tmp_path):
    """Exit 2 with one line naming the file and the install hint; nothing submitted."""
    root = tmp_path / "fm"
    full = _full(np.zeros((40, 28, 28), np.uint8), True)
    _bad(root, "train-images-idx3-ubyte.gz", full[:-30])
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "name: fm_bad\n"
        f"base: {{data: {{name: fashion_mnist, root: {root}}}, train: {{steps: 2, device: cpu}}}}\n"
        "seeds: [0]\n"
        "stages: {tokenizer: {needs: []}}\n"
        "executor: local\n"
        f"runs_dir: {tmp_path / 'runs'}\n")
    db = tmp_path / "r.db"
    p = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(sweep), "--db", f"sqlite:///{db}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    line = [ln for ln in p.stderr.splitlines() if "train-images-idx3-ubyte.gz" in ln]
    assert len(line) == 1 and "data.root" in line[0] and "truncated" in line[0] and HINT in line[0], p.stderr
    assert not list((tmp_path / "runs").rglob("config.yaml"))  # no run folder written


@pytest.mark.skipif(not HAVE_REAL, reason=NO_REAL)
def test_real_debian_files():
    assert check_files(None) is None
    cfg = load_config(None, {"data.name": "fashion_mnist"})
    assert cfg.data.root is None  # unset: Debian's folder
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert (len(train), len(val)) == (60000, 10000)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(val.labels).tolist() == [1000] * 10
    assert train.label(0) == 9 and val.label(0) == 9  # both files start with an ankle boot
    assert train.images.mean() == pytest.approx(72.94, abs=0.01)  # the dataset's published mean, 0.2860 * 255
