"""Class-balanced subsets (core.data.subset) on cycling, class-sorted and unequal labels."""
import time

import numpy as np
import pytest
from imagefolder_fixture import write_imagefolder

from core.config import DataConfig
from core.data import balanced_subset, build_dataset, dataset_labels, subset_info


def _per_class(labels, idx):
    return np.bincount(np.asarray(labels)[idx], minlength=int(np.max(labels)) + 1)


def test_equal_classes_get_n_over_k_plus_minus_one():
    labels = np.repeat(np.arange(20), 30)  # class-sorted, like an ImageFolder listing
    for n in (20, 120, 137, 599):
        idx = balanced_subset(labels, n, seed=0)
        counts = _per_class(labels, idx)
        assert len(idx) == len(set(idx.tolist())) == n and np.all(np.diff(idx) > 0)
        assert counts.min() >= n // 20 and counts.max() <= -(-n // 20)
    # the first-N subset this replaces would have covered 4 of 20 classes
    assert (_per_class(labels, np.arange(120)) > 0).sum() == 4


def test_unequal_classes_are_sampled_in_proportion():
    sizes = np.array([1000, 500, 250, 125, 125])
    labels = np.repeat(np.arange(5), sizes)
    idx = balanced_subset(labels, 400, seed=3)
    counts = _per_class(labels, idx)
    assert counts.sum() == 400
    assert np.all(np.abs(counts - 400 * sizes / sizes.sum()) < 1)


def test_seeded_deterministic_and_full_split():
    labels = np.arange(1000) % 7
    a, b, c = (balanced_subset(labels, 100, s) for s in (5, 5, 6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(balanced_subset(labels, 1000, 0), np.arange(1000))
    # the classes that get the remainder (+1) depend on the seed, not on their position
    extra = {tuple(np.flatnonzero(_per_class(labels, balanced_subset(labels, 10, s)) == 2)) for s in range(8)}
    assert len(extra) > 1
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"subset size .* must be in \[1, 1000\]"):
            balanced_subset(labels, bad, 0)


def test_cheap_at_imagenet_size():
    labels = np.repeat(np.arange(1000), 1281)  # 1.281M, class-sorted
    t0 = time.perf_counter()
    idx = balanced_subset(labels, 100_000, seed=0)
    assert time.perf_counter() - t0 < 5.0
    counts = _per_class(labels, idx)
    assert counts.min() == 100 and counts.max() == 100
    info = subset_info(labels, idx, 0)
    assert info == {"size": 100_000, "seed": 0, "of": 1_281_000, "classes_covered": 1000, "num_classes": 1000,
                    "per_class_min": 100, "per_class_max": 100}


def test_imagefolder_labels_without_decoding_and_subsets_cover_every_class(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "if", num_classes=20, train_per_class=12, val_per_class=6)
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=32)

    import PIL.Image

    def no_decode(*args, **kwargs):
        raise AssertionError("an image was decoded to read labels")

    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", no_decode)
        train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
        labels = dataset_labels(train)
    assert len(train) == 240 and train.num_classes == 20
    assert np.array_equal(labels, np.repeat(np.arange(20), 12))  # class-sorted listing
    assert {p.suffix for p in (train.path(0), train.path(12))} == {".png", ".jpg"}
    for ds, n in ((train, 120), (train, 60), (val, 60), (val, 40)):
        counts = _per_class(dataset_labels(ds), balanced_subset(dataset_labels(ds), n, seed=0))
        assert (counts > 0).all() and counts.max() - counts.min() <= 1 and counts.sum() == n
    # the item label matches the labels array for PNG and JPEG classes alike
    assert [train[i][1] for i in (0, 12, 239)] == [0, 1, 19]
