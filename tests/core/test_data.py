"""The embedded synthetic dataset, the ImageFolder loader and the resumable sampler."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import DataConfig
from core.data import DeterministicBatchSampler, SyntheticShapes, build_dataset
from core.data.synthetic import MAX_CLASSES, class_parts

# sha256[:16] of render_uint8 bytes: pins the exact images, on every machine.
GOLDEN = {
    ("train", 32, 0): "2b11a6bb4b5b8885",
    ("train", 32, 7): "08fd5947a64bd231",
    ("val", 32, 0): "1670d4a3fa9d547d",
    ("train", 64, 3): "debba87651fb4b24",
    ("train", 256, 1): "145d15a3ea2c5094",
}


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("split,size,index", sorted(GOLDEN))
def test_synthetic_images_are_pinned(split, size, index):
    ds = SyntheticShapes(split, 100, size, num_classes=10, seed=0)
    img = ds.render_uint8(index)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert _digest(img) == GOLDEN[(split, size, index)]


def test_synthetic_is_deterministic_and_streams_differ():
    a, b = SyntheticShapes("train", 50, 32), SyntheticShapes("train", 50, 32)
    assert np.array_equal(a.render_uint8(5), b.render_uint8(5))
    assert not np.array_equal(a.render_uint8(5), a.render_uint8(6))
    assert not np.array_equal(a.render_uint8(5), SyntheticShapes("val", 50, 32).render_uint8(5))
    assert not np.array_equal(a.render_uint8(5), SyntheticShapes("train", 50, 32, seed=1).render_uint8(5))


def test_synthetic_render_cache_returns_the_same_bytes_and_cannot_be_corrupted(monkeypatch):
    from core.data import synthetic

    cached = SyntheticShapes("train", 50, 32)
    first = cached.render_uint8(7)
    first[:] = 0  # a caller scribbling on its image does not reach the cache
    again = cached.render_uint8(7)
    assert _digest(again) == _digest(SyntheticShapes("train", 50, 32).render_uint8(7)) != _digest(first)
    monkeypatch.setattr(synthetic, "CACHE_BYTES", 0)  # a split too large to keep: drawn each time
    assert SyntheticShapes("train", 50, 32)._cache is None


def test_synthetic_item_format_and_labels():
    ds = build_dataset(DataConfig(image_size=32, num_classes=12, train_size=48), "train")
    assert len(ds) == 48 and ds.num_classes == 12 and len(set(ds.classes)) == 12
    x, y = ds[13]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0 and x.std() > 0.05
    assert isinstance(y, int) and y == 13 % 12
    # Balanced labels.
    assert np.bincount([ds.label(i) for i in range(48)]).tolist() == [4] * 12
    # float image is exactly the uint8 image rescaled.
    assert torch.equal(x, torch.from_numpy(ds.render_uint8(13)).permute(2, 0, 1).float() / 127.5 - 1)


def test_class_table_is_unique():
    parts = [class_parts(c) for c in range(MAX_CLASSES)]
    assert len(set(parts)) == MAX_CLASSES
    # The first 8 classes already use every shape and every texture.
    assert len({s for s, _ in parts[:8]}) == 8 and len({t for _, t in parts[:8]}) == 3


def test_synthetic_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes("train", 10, 32, num_classes=MAX_CLASSES + 1)
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes("test", 10, 32)
    with pytest.raises(IndexError):
        SyntheticShapes("train", 10, 32).render_uint8(10)


# ----------------------------------------------------------------------------- ImageFolder


def _write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_imagefolder_protocol_and_labels(tmp_path):
    red, green = np.array([255, 0, 0], np.uint8), np.array([0, 255, 0], np.uint8)
    # 128x64 (W x H): halved once by BOX to 64x32, scale 1, center crop of columns 16..48,
    # i.e. original columns 32..96 -> paint exactly those green.
    wide = np.tile(red, (64, 128, 1))
    wide[:, 32:96] = green
    # 32x96 (W x H), already at the target short side: crop rows 32..64.
    tall = np.tile(red, (96, 32, 1))
    tall[32:64] = green
    _write_png(tmp_path / "train" / "cat" / "a.png", wide)
    _write_png(tmp_path / "train" / "dog" / "b.png", tall)
    _write_png(tmp_path / "train" / "dog" / "c.png", np.full((40, 40, 3), 7, np.uint8))
    _write_png(tmp_path / "val" / "cat" / "d.png", wide)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=32)
    train = build_dataset(cfg, "train")
    assert train.classes == ["cat", "dog"] and len(train) == 3
    assert [train.label(i) for i in range(3)] == [0, 1, 1]
    for i in (0, 1):
        x, _ = train[i]
        assert x.shape == (3, 32, 32)
        assert np.array_equal(train.render_uint8(i), np.tile(green, (32, 32, 1)))
        assert torch.equal(x[1], torch.ones(32, 32)) and torch.equal(x[0], -torch.ones(32, 32))
    assert train.render_uint8(2).shape == (32, 32, 3)  # upscaled 40 -> 32 crop
    assert len(build_dataset(cfg, "val")) == 1


def test_imagefolder_errors(tmp_path):
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "missing"), image_size=32)
    with pytest.raises(FileNotFoundError, match="data.root"):
        build_dataset(cfg, "train")
    with pytest.raises(ValueError, match="data.root"):
        build_dataset(DataConfig(name="imagefolder"), "train")
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), "train")


# ----------------------------------------------------------------------------- sampler


def test_sampler_shards_partition_the_global_batch():
    single = DeterministicBatchSampler(40, 8, seed=3)
    ranks = [DeterministicBatchSampler(40, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(12):  # crosses epoch boundaries (5 batches per epoch)
        shards = [s.batch(step) for s in ranks]
        assert sorted(shards[0] + shards[1]) == sorted(single.batch(step))
        assert not set(shards[0]) & set(shards[1])


def test_sampler_epochs_and_resume_position():
    s = DeterministicBatchSampler(20, 4, seed=0)
    assert s.batches_per_epoch == 5
    epoch0 = sum((s.batch(i) for i in range(5)), [])
    assert sorted(epoch0) == list(range(20))  # every image once per epoch
    assert sum((s.batch(i) for i in range(5, 10)), []) != epoch0  # reshuffled next epoch
    assert s.position(7) == {"epoch": 1, "offset": 2}
    resumed = iter(DeterministicBatchSampler(20, 4, seed=0, start_step=7))
    assert [next(resumed) for _ in range(4)] == [s.batch(i) for i in range(7, 11)]
    with pytest.raises(ValueError, match="batch_size"):
        DeterministicBatchSampler(6, 4, seed=0, world_size=2)
