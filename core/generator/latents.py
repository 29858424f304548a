"""Tokenizer latents for the generator: encode a split once into on-disk shards, normalise per channel.

The generator learns on z_n = (z − mean_c) / std_c with per-channel statistics of the
encoded train split (computed once, stored in ``latent_stats.pt``, reused on resume);
samples are mapped back with :meth:`LatentStats.denormalize` before decoding.

Bounded memory at ImageNet size (1.28M latents; 42 GB as float32 at c·h·w = 8192):

* :func:`cache_latents` encodes the split with ``data.num_workers`` DataLoader workers and
  appends each batch to the current shard file — ``shard_XXXXX.npy``, numpy's ``.npy``
  format, **float32** (the encoder's output dtype, stored exactly), up to ``shard_size``
  latents each, written to a temp file, fsynced and renamed — so memory holds one batch,
  never the split.  Each shard gets a sidecar (count, labels file, float64 channel sums)
  written after it, so a preempted caching job resumes at the missing shards; data-parallel
  ranks encode disjoint shards.  ``index.json``, written last by rank 0, means complete.
* :class:`LatentShards` memory-maps the shards (``np.load(mmap_mode="r")``): indexing with a
  batch of indices reads only those rows (pages the kernel can drop again), and
  :class:`NormalizedLatents` normalises them on access.  Both quack like the ``(N, c, h, w)``
  tensor that :func:`core.generator.train.train_generator` indexes (``len``, ``shape``,
  ``x[idx]`` with an index tensor), and return bit-identical values to normalising the whole
  tensor, so resume stays exact.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from core.io import write_atomic, write_json_atomic

LATENT_DTYPE = np.float32  # on-disk dtype of cached latents (stated in index.json too)
SHARD_SIZE = 16384  # latents per shard: 512 MB at c·h·w = 8192 float32
INDEX = "index.json"


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
    """Encode every item of ``dataset`` (yielding (image (3, H, W) in [-1, 1], label)) in memory.

    For small sets (tests); the generator stage uses :func:`cache_latents`.

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
    """:func:`encode_dataset`, stored at ``path`` and loaded from there when present (small sets)."""
    path = Path(path)
    if path.exists():
        blob = torch.load(path, map_location="cpu")
        if len(blob["labels"]) != len(dataset):
            raise ValueError(f"{path}: holds {len(blob['labels'])} latents but the dataset has {len(dataset)} items")
        return blob["latents"], blob["labels"]
    latents, labels = encode_dataset(tokenizer, dataset, batch_size, device)
    save_tensors({"latents": latents, "labels": labels}, path)
    return latents, labels


def _save_npy(path: Path, arr: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, arr)
    return write_atomic(path, buf.getvalue())


def _write_shard(path: Path, batches, count: int, shape: tuple[int, ...]) -> tuple[list[float], list[float]]:
    """Stream ``count`` latents from ``batches`` into the .npy file ``path`` (atomic).

    Returns per-channel float64 (sum, sum of squares) of the shard.
    """
    tmp = path.with_name(path.name + ".tmp")
    total, total_sq, written = np.zeros(shape[0]), np.zeros(shape[0]), 0
    with open(tmp, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(LATENT_DTYPE)), "fortran_order": False,
                  "shape": (count, *shape)}
        np.lib.format.write_array_header_2_0(f, header)
        for z in batches:  # (B, c, h, w) float32 on the CPU
            z = np.ascontiguousarray(z, dtype=LATENT_DTYPE)
            f.write(z.tobytes())
            z64 = z.astype(np.float64)
            total += z64.sum(axis=(0, 2, 3))
            total_sq += (z64 * z64).sum(axis=(0, 2, 3))
            written += len(z)
        f.flush()
        os.fsync(f.fileno())
    if written != count:
        raise RuntimeError(f"{path}: wrote {written} latents, expected {count}")
    os.replace(tmp, path)
    return total.tolist(), total_sq.tolist()


def _barrier() -> None:
    # Ranks of a data-parallel stage meet here; a single process has nothing to wait for.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@torch.no_grad()
def cache_latents(tokenizer, dataset, directory: str | Path, batch_size: int = 64, device="cpu",
                  num_workers: int = 0, shard_size: int = SHARD_SIZE, rank: int = 0,
                  world_size: int = 1) -> "LatentShards":
    """Encode ``dataset`` into ``directory`` (see the module docstring) and open it.

    Returns the existing cache when ``directory/index.json`` is present (checked against
    ``len(dataset)``).  Otherwise shard k is written unless its sidecar ``shard_k.json``
    (count, channel sums; written last) exists — a killed job resumes at the missing shards.
    Data parallel: rank r of ``world_size`` encodes shards r, r + W, ...; all ranks meet at a
    ``torch.distributed`` barrier (when a process group exists), rank 0 writes ``index.json``,
    and every rank returns the opened cache.
    """
    directory = Path(directory)
    if (directory / INDEX).exists():
        shards = LatentShards(directory)
        if len(shards) != len(dataset):
            raise ValueError(f"{directory}: holds {len(shards)} latents but the dataset has {len(dataset)} items")
        return shards
    directory.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    x0, _ = dataset[0]
    was_training = tokenizer.training
    tokenizer.eval()
    shape = tuple(tokenizer.encode(x0.unsqueeze(0).to(device)).shape[1:])  # (c, h, w)
    num_shards = -(-n // shard_size)
    mine = [k for k in range(rank, num_shards, world_size) if not (directory / f"shard_{k:05d}.json").exists()]
    bar = tqdm(total=sum(min(shard_size, n - k * shard_size) for k in mine), desc="cache latents", leave=False)
    for k in mine:
        start, count = k * shard_size, min(shard_size, n - k * shard_size)
        loader = DataLoader(Subset(dataset, range(start, start + count)), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers)
        labels = []

        def batches():
            for x, y in loader:
                bar.update(len(x))
                labels.append(np.array(y, dtype=np.int64))  # a copy: holding y itself grew RSS per batch
                yield tokenizer.encode(x.to(device)).float().cpu().numpy()

        total, total_sq = _write_shard(directory / f"shard_{k:05d}.npy", batches(), count, shape)
        _save_npy(directory / f"labels_{k:05d}.npy", np.concatenate(labels))
        write_json_atomic(directory / f"shard_{k:05d}.json", {
            "file": f"shard_{k:05d}.npy", "labels": f"labels_{k:05d}.npy", "start": start, "count": count,
            "shape": list(shape), "sum": total, "sum_sq": total_sq})
    bar.close()
    tokenizer.train(was_training)
    _barrier()
    if rank == 0:
        missing = [k for k in range(num_shards) if not (directory / f"shard_{k:05d}.json").exists()]
        if missing:
            raise RuntimeError(f"{directory}: shards {missing[:5]}... of {num_shards} are not written; "
                               f"run every rank of the {world_size}")
        side = [json.loads((directory / f"shard_{k:05d}.json").read_text()) for k in range(num_shards)]
        bad = [s["file"] for k, s in enumerate(side) if tuple(s["shape"]) != shape or s["start"] != k * shard_size]
        if bad:
            raise ValueError(f"{directory}: {bad[0]} holds latents of another shape or shard size; delete {directory}")
        _save_npy(directory / "labels.npy", np.concatenate([np.load(directory / s["labels"]) for s in side]))
        write_json_atomic(directory / INDEX, {"num": n, "shape": list(shape), "dtype": np.dtype(LATENT_DTYPE).name,
                                              "shard_size": shard_size, "labels": "labels.npy", "shards": side})
    _barrier()
    return LatentShards(directory)


class LatentShards:
    """The latents of a :func:`cache_latents` directory, memory-mapped: ``x[idx] -> float32 (B, c, h, w)``.

    ``labels`` is an int64 tensor (N,) in memory (8 bytes a latent).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = json.loads((self.directory / INDEX).read_text())
        self.index = index
        self.shape = (index["num"], *index["shape"])
        self._arrays = [np.load(self.directory / s["file"], mmap_mode="r") for s in index["shards"]]
        self._starts = np.array([s["start"] for s in index["shards"]], dtype=np.int64)
        for s, arr in zip(index["shards"], self._arrays):
            if arr.shape != (s["count"], *index["shape"]) or arr.dtype != np.dtype(index["dtype"]):
                raise ValueError(f"{self.directory / s['file']}: {arr.dtype} {arr.shape} does not match {INDEX}")
        self.labels = torch.from_numpy(np.load(self.directory / index["labels"]))
        if len(self.labels) != index["num"]:
            raise ValueError(f"{self.directory}: {len(self.labels)} labels for {index['num']} latents")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        idx = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64)
        scalar = idx.ndim == 0
        idx = np.atleast_1d(idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"latent index out of range [0, {len(self)})")
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.float32)
        shard = np.searchsorted(self._starts, idx, side="right") - 1  # (B,) shard of each index
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self._arrays[k][idx[sel] - self._starts[k]]  # reads only these rows
        z = torch.from_numpy(out)
        return z[0] if scalar else z

    def chunks(self, size: int = 4096):
        """Consecutive float32 chunks (≤ size, c, h, w): a streaming pass over all latents."""
        for start in range(0, len(self), size):
            yield self[np.arange(start, min(start + size, len(self)))]

    def channel_stats(self, eps: float = 1e-6) -> "LatentStats":
        """Per-channel mean/std from the float64 sums stored while caching (no pass over the data)."""
        total = np.sum([s["sum"] for s in self.index["shards"]], axis=0)
        total_sq = np.sum([s["sum_sq"] for s in self.index["shards"]], axis=0)
        count = len(self) * int(np.prod(self.shape[2:]))  # N·h·w values per channel
        mean = total / count
        var = (total_sq - count * mean * mean) / (count - 1)  # unbiased, as torch.std
        std = np.sqrt(np.maximum(var, 0.0))
        return LatentStats(torch.from_numpy(mean).float(), torch.from_numpy(std).clamp_min(eps).float())


class NormalizedLatents:
    """``stats.normalize`` applied on access to an indexable latent set (e.g. :class:`LatentShards`)."""

    def __init__(self, latents, stats: "LatentStats"):
        self.latents, self.stats = latents, stats
        self.shape = tuple(latents.shape)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, idx) -> torch.Tensor:
        z = self.latents[idx]
        return self.stats.normalize(z.unsqueeze(0))[0] if z.dim() == len(self.shape) - 1 else self.stats.normalize(z)


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


def load_or_compute_stats(path: str | Path, latents) -> LatentStats:
    """The stats stored at ``path``; computed from ``latents`` and stored there the first time.

    ``latents``: a tensor (N, c, h, w), or a :class:`LatentShards` (stats from its stored sums).
    """
    path = Path(path)
    if path.exists():
        stats = LatentStats.load(path)
        if len(stats.mean) != latents.shape[1]:
            raise ValueError(f"{path}: stats for {len(stats.mean)} channels, latents have {latents.shape[1]}")
        return stats
    stats = latents.channel_stats() if isinstance(latents, LatentShards) else LatentStats.compute(latents)
    stats.save(path)
    return stats
