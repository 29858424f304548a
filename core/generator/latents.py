"""Tokenizer latents for the generator: encode a split once, normalise per channel.

The generator learns on z_n = (z − mean_c) / std_c with per-channel statistics of the
encoded train split (computed once, stored in ``latent_stats.pt``, reused on resume);
samples are mapped back with :meth:`LatentStats.denormalize` before decoding.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from core.io import write_atomic


def save_tensors(obj: dict, path: str | Path) -> Path:
    """torch.save through an atomic write (readers never see half a file)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_atomic(path, buf.getvalue())


@torch.no_grad()
def encode_dataset(
    tokenizer: torch.nn.Module,
    dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    desc: str = "encode latents",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every item of ``dataset`` (yielding (image (3, H, W) in [-1, 1], label)).

    Returns
    -------
    latents float32 (N, c, h, h) on the CPU, labels int64 (N,).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = tokenizer.training
    tokenizer.eval()
    zs, ys = [], []
    for x, y in tqdm(loader, desc=desc, leave=False):
        zs.append(tokenizer.encode(x.to(device)).float().cpu())
        ys.append(torch.as_tensor(y, dtype=torch.long))
    tokenizer.train(was_training)
    return torch.cat(zs), torch.cat(ys)


def cached_latents(tokenizer, dataset, path: str | Path, batch_size: int = 64, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_dataset`, stored at ``path`` and loaded from there when present."""
    path = Path(path)
    if path.exists():
        blob = torch.load(path, map_location="cpu")
        if len(blob["labels"]) != len(dataset):
            raise ValueError(f"{path}: holds {len(blob['labels'])} latents but the dataset has {len(dataset)} items")
        return blob["latents"], blob["labels"]
    latents, labels = encode_dataset(tokenizer, dataset, batch_size, device)
    save_tensors({"latents": latents, "labels": labels}, path)
    return latents, labels


@dataclass
class LatentStats:
    """Per-channel mean and std (c,) of a latent set (N, c, h, w)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def compute(cls, latents: torch.Tensor, eps: float = 1e-6) -> "LatentStats":
        z = latents.double().transpose(0, 1).reshape(latents.shape[1], -1)  # (c, N·h·w)
        return cls(z.mean(1).float(), z.std(1).clamp_min(eps).float())

    def _view(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[1] != len(self.mean):
            raise ValueError(f"latent has {z.shape[1]} channels but the stats have {len(self.mean)}")
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return self.mean.to(z).view(shape), self.std.to(z).view(shape)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._view(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._view(z)
        return z * std + mean

    def save(self, path: str | Path) -> None:
        save_tensors({"mean": self.mean, "std": self.std}, path)

    @classmethod
    def load(cls, path: str | Path) -> "LatentStats":
        blob = torch.load(path, map_location="cpu")
        return cls(blob["mean"], blob["std"])


def load_or_compute_stats(path: str | Path, latents: torch.Tensor) -> LatentStats:
    """The stats stored at ``path``; computed from ``latents`` and stored there the first time."""
    path = Path(path)
    if path.exists():
        stats = LatentStats.load(path)
        if len(stats.mean) != latents.shape[1]:
            raise ValueError(f"{path}: stats for {len(stats.mean)} channels, latents have {latents.shape[1]}")
        return stats
    stats = LatentStats.compute(latents)
    stats.save(path)
    return stats
