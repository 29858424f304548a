"""Training batches on the device: uint8 images in pinned memory, copied one step ahead.

The loader workers (``data.num_workers``) only decode: each item is the dataset's exact
``render_uint8(index)`` bytes and ``label(index)``; collated batches stay uint8 (4× smaller
than float32) and are pinned when the device is CUDA.  :class:`DeviceBatches` issues the
asynchronous host-to-device copy of step s + 1's batch before step s runs and turns bytes
into floats on the device, so the training process never waits for a copy and never
converts pixels on the host.  The batch of step s is ``sampler.batch(s)``
(:class:`core.data.DeterministicBatchSampler`): a pure function of (seed, step).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from core.data.sampler import DeterministicBatchSampler
from core.seed import BatchRNG, step_generator

_FLIP_STREAM = 20  # step_generator stream of the random horizontal flips


class Uint8Items(Dataset):
    """``(uint8 (3, H, W), label)`` of a dataset that offers ``render_uint8`` and ``label``."""

    def __init__(self, dataset):
        for attr in ("render_uint8", "label"):
            if not callable(getattr(dataset, attr, None)):
                raise TypeError(f"{type(dataset).__name__} has no {attr}(index): training reads images through it "
                                "(see the dataset contract in core/data/__init__.py)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.dataset.render_uint8(index)).permute(2, 0, 1), self.dataset.label(index)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1] (the datasets' ``x / 127.5 − 1``, bit for bit)."""
    return images.float() / 127.5 - 1.0


def random_hflip(images: torch.Tensor, seed: int, step: int, dist_info) -> torch.Tensor:
    """Flip each image (B, 3, H, W) horizontally with probability 1/2, from (seed, step, global index).

    ``dist_info`` gives this rank's rows (``rank``, ``world_size``); drawn on the images' device."""
    rng = BatchRNG(step_generator(seed, step, _FLIP_STREAM, images.device), dist_info.rank, dist_info.world_size)
    flip = (rng.rand(len(images)) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


class DeviceBatches:
    """Iterator of ``(images float32 (B, 3, H, W) in [-1, 1], labels int64 (B,))`` on ``device``.

    Parameters
    ----------
    dataset : training split (``render_uint8``, ``label``).
    sampler : this rank's batches; the stream starts at ``sampler.start_step``.
    device : where the batches go.
    num_workers : decoding processes (0: in this process).
    seed : the loader's own generator (creating the iterator draws nothing from the global RNG,
        so a resumed run's random stream does not shift).
    """

    def __init__(self, dataset, sampler: DeterministicBatchSampler, device: torch.device, num_workers: int = 0,
                 seed: int = 0):
        self.device = device
        self.loader = DataLoader(Uint8Items(dataset), batch_sampler=sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
                                 persistent_workers=False)
        self._it = iter(self.loader)
        self._next = self._fetch()

    def _fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self._it)
        # pinned -> asynchronous; the copy runs while the host enqueues the current step
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def __iter__(self) -> "DeviceBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._next
        self._next = self._fetch()  # one step ahead
        return to_unit_range(images), labels

    def close(self) -> None:
        """Shut the loader workers down (dropping the iterator ends them)."""
        self._it = self._next = None
        self.loader = None
