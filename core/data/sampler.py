"""A resumable, shardable batch sampler whose order is a pure function of (seed, epoch).

Epoch ``e`` shuffles the dataset with ``PCG64(SeedSequence([seed, e]))`` and cuts it into
global batches of ``batch_size · world_size`` (incomplete tail dropped).  Rank ``r`` takes
every ``world_size``-th image of each global batch, so the union of the ranks' batches at a
step is exactly the single-process batch of the same global size.  Training step ``s``
reads epoch ``s // batches_per_epoch``, batch ``s % batches_per_epoch``: resuming at step
``s`` continues the stream at the exact position.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


class DeterministicBatchSampler:
    """Infinite stream of index lists for ``DataLoader(batch_sampler=...)``.

    Parameters
    ----------
    dataset_size : number of items.
    batch_size : per-process batch size.
    seed : shuffling seed.
    rank, world_size : this process's shard.
    start_step : first step to yield (the resume position).
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        self.global_batch = batch_size * world_size
        if dataset_size < self.global_batch:
            raise ValueError(
                f"dataset of {dataset_size} images is smaller than one global batch "
                f"(data.batch_size={batch_size} x world_size={world_size})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, {world_size})")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = dataset_size // self.global_batch
        self.start_step = start_step
        self._cache: tuple[int, np.ndarray] | None = None

    def position(self, step: int) -> dict[str, int]:
        """Data position of ``step`` as saved in checkpoints: epoch and batch offset in it."""
        return {"epoch": step // self.batches_per_epoch, "offset": step % self.batches_per_epoch}

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._cache = (epoch, rng.permutation(self.dataset_size))
        return self._cache[1]

    def batch(self, step: int) -> list[int]:
        """This rank's indices for training step ``step``."""
        pos = self.position(step)
        start = pos["offset"] * self.global_batch
        chunk = self.permutation(pos["epoch"])[start : start + self.global_batch]
        return chunk[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1
