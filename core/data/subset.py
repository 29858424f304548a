"""Class-balanced subsets: the one way an evaluation takes fewer images than its split.

ImageFolder lists its samples class by class, so "the first N images" of ImageNet's train
split are ~N/1281 classes.  Every subset (reconstructions for PSNR/SSIM/LPIPS/rFID, probe
train/val, the FID reference images) is therefore drawn by :func:`balanced_subset`:
class-stratified, seeded and deterministic, O(N log N) on the labels alone (no image is
decoded), so it costs ~0.2 s on ImageNet's 1.28M labels.

Allocation: class k of size c_k gets n·c_k/N images rounded by largest remainder (Hamilton),
i.e. n/K ± 1 per class when the classes are equal; remainder ties go to classes chosen by
the seed, not to the first classes.  Within a class the images are a seeded random draw.
"""
from __future__ import annotations

import numpy as np


def dataset_labels(dataset) -> np.ndarray:
    """int64 (N,) labels of ``dataset`` without decoding images.

    Uses the dataset's ``labels`` array when it has one (both of ours do), else ``label(i)``.
    """
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [dataset.label(i) for i in range(len(dataset))]
    return np.asarray(labels, dtype=np.int64)


def class_quotas(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Images per class (K,) summing to ``n``, proportional to ``counts`` (largest remainder)."""
    total = int(counts.sum())
    exact = counts * (n / total)  # (K,) float; never above counts since n <= total
    quota = np.floor(exact).astype(np.int64)
    short = n - int(quota.sum())
    if short:
        # Largest remainder first; a seeded random key breaks ties between equal remainders.
        remainder = exact - quota
        order = np.lexsort((rng.random(len(counts)), -remainder))
        quota[order[:short]] += 1
    return np.minimum(quota, counts)


def balanced_subset(labels, n: int, seed: int) -> np.ndarray:
    """Indices (n,) of a class-stratified random subset, sorted ascending.

    Parameters
    ----------
    labels : (N,) integer class labels (e.g. :func:`dataset_labels`).
    n : subset size, 1 <= n <= N; n == N returns every index.
    seed : subset seed; the same (labels, n, seed) gives the same indices on every machine
        (numpy PCG64).

    Returns
    -------
    int64 (n,) indices into ``labels``, ascending (so a folder is read in order).

    Raises
    ------
    ValueError when n is outside [1, N].
    """
    labels = np.asarray(labels, dtype=np.int64)
    total = len(labels)
    if not 1 <= n <= total:
        raise ValueError(f"subset size {n} must be in [1, {total}] (the split has {total} images)")
    if n == total:
        return np.arange(total, dtype=np.int64)
    if labels.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, total, n])))
    counts = np.bincount(labels)  # (K,)
    quota = class_quotas(counts, n, rng)
    # Group the indices by class in a random order within each class: shuffle, then a
    # stable sort by label keeps the shuffled order inside each group.
    perm = rng.permutation(total)
    grouped = perm[np.argsort(labels[perm], kind="stable")]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))  # (K,) first position of each class
    sorted_labels = labels[grouped]
    rank = np.arange(total) - starts[sorted_labels]  # position of each index within its class
    return np.sort(grouped[rank < quota[sorted_labels]])


def subset_info(labels, indices: np.ndarray, seed: int) -> dict:
    """What a result records about a subset: size, seed and class coverage."""
    labels = np.asarray(labels, dtype=np.int64)
    per_class = np.bincount(labels[indices], minlength=int(labels.max()) + 1)
    present = np.bincount(labels) > 0
    return {
        "size": int(len(indices)), "seed": int(seed), "of": int(len(labels)),
        "classes_covered": int((per_class[present] > 0).sum()), "num_classes": int(present.sum()),
        "per_class_min": int(per_class[present].min()), "per_class_max": int(per_class[present].max()),
    }
