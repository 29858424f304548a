"""Seeding: the one process-seeding function and the step-keyed generators of augmentations.

* :func:`seed_everything` — every process calls it once with (seed, rank).
* :func:`step_generator` — a generator (CPU or CUDA) that depends only on (seed, step, stream): what a
  resumed run needs to draw exactly the augmentations it would have drawn.
* :class:`BatchRNG` — per-image random numbers of one rank's share of a global batch, so
  that ranks never share crops/masks/DiffAug draws and 2 ranks × B equal 1 process × 2B.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and CUDA) with ``seed + rank``.

    Returns the effective seed, which the caller records in the run's outputs.
    """
    effective = int(seed) + int(rank)
    random.seed(effective)
    np.random.seed(effective % (2**32))
    torch.manual_seed(effective)
    torch.cuda.manual_seed_all(effective)
    return effective


def step_generator(seed: int, step: int, stream: int = 0, device: "torch.device | str" = "cpu") -> torch.Generator:
    """A generator on ``device`` that depends only on (seed, step, stream).

    The seed is derived on the host (no device work); a CUDA generator draws on the GPU
    (numbers differ from the CPU's, but are as reproducible), so augmentations need no
    host-to-device copies."""
    state = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 31 ^ int(state[1]))


class BatchRNG:
    """Random numbers for this rank's rows of a global batch, all from one generator.

    Every draw is made for the whole global batch (``world_size · B`` rows) and this rank
    keeps rows ``rank, rank + W, rank + 2W, ...`` — the rows
    :class:`core.data.DeterministicBatchSampler` gives it.  Image j of the global batch thus
    gets numbers that depend on (seed, step, stream, j) only, not on how the batch is split:
    two ranks draw different crops, and 2 ranks × B draw exactly what 1 process × 2B draws.
    The cost is drawing W times more scalars (a few per image), negligible beside the model.

    Parameters
    ----------
    generator : a generator (e.g. :func:`step_generator`); draws are made on its device.
    rank, world_size : this process's row offset and the stride of its rows.
    """

    def __init__(self, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.generator, self.rank, self.world_size = generator, rank, world_size

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.rank :: self.world_size]

    def rand(self, n: int, *shape: int) -> torch.Tensor:
        """U[0, 1) of shape (n, *shape) on the generator's device; n = this rank's images."""
        return self._rows(torch.rand(n * self.world_size, *shape, generator=self.generator,
                                     device=self.generator.device))

    def randint(self, low: int, high: int, n: int, *shape: int) -> torch.Tensor:
        """Integers in [low, high) of shape (n, *shape) on the generator's device."""
        return self._rows(torch.randint(low, high, (n * self.world_size, *shape), generator=self.generator,
                                        device=self.generator.device))


def as_batch_rng(g: "torch.Generator | BatchRNG") -> BatchRNG:
    """A plain generator is a single process's :class:`BatchRNG`."""
    return g if isinstance(g, BatchRNG) else BatchRNG(g)
