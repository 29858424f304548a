"""The one seeding function. Every process calls it once with (seed, rank)."""
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
