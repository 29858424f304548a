"""Latent cache: on-disk float32 shards, memory-mapped, read by the generator without loading them."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from core.config import GeneratorConfig
from core.generator.latents import LatentShards, LatentStats, NormalizedLatents, cache_latents, encode_dataset
from core.generator.train import train_generator
from core.models.tokenizer import TokenizerArgs, build_tokenizer


def _tokenizer():
    torch.manual_seed(0)
    return build_tokenizer(TokenizerArgs(image_size=16, patch_size=4, latent_size=2, latent_channels=4)).eval()


def _data(n=23):
    images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return TensorDataset(images, torch.arange(n) % 3)


class FailsAt(Dataset):
    """Raises at item ``k``: a caching job killed part-way."""

    def __init__(self, data, k):
        self.data, self.k = data, k

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.k:
            raise RuntimeError("preempted")
        return self.data[i]


def test_cache_reopen_identical_values_across_shards(tmp_path):
    tok, data = _tokenizer(), _data()
    z, y = encode_dataset(tok, data, batch_size=5)
    shards = cache_latents(tok, data, tmp_path / "lat", batch_size=5, num_workers=2, shard_size=7)
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    assert index["dtype"] == "float32" and [s["count"] for s in index["shards"]] == [7, 7, 7, 2]
    reopened = LatentShards(tmp_path / "lat")
    assert isinstance(reopened._arrays[0], np.memmap)  # mapped, not read into memory
    assert reopened.shape == (23, 4, 2, 2) and len(reopened) == 23
    assert torch.allclose(reopened[torch.arange(23)], z, atol=1e-6)
    assert torch.equal(reopened[torch.arange(23)], shards[np.arange(23)])
    idx = torch.tensor([22, 0, 7, 6, 13, 13])  # unordered, repeated, crossing shard boundaries
    assert torch.equal(reopened[idx], reopened[torch.arange(23)][idx])
    assert torch.equal(reopened.labels, y)
    with pytest.raises(IndexError):
        reopened[torch.tensor([23])]
    # statistics from the sums stored while caching match the in-memory two-pass ones
    exact = LatentStats.compute(z)
    stats = reopened.channel_stats()
    assert torch.allclose(stats.mean, exact.mean, atol=1e-6) and torch.allclose(stats.std, exact.std, rtol=1e-5)
    # a second call opens the cache without encoding
    assert torch.equal(cache_latents(None, data, tmp_path / "lat", shard_size=7)[idx], reopened[idx])
    with pytest.raises(ValueError, match="holds 23 latents"):
        cache_latents(None, _data(5), tmp_path / "lat")


def test_interrupted_cache_resumes_at_the_first_missing_shard(tmp_path):
    tok, data = _tokenizer(), _data()
    with pytest.raises(RuntimeError, match="preempted"):
        cache_latents(tok, FailsAt(data, 16), tmp_path / "lat", batch_size=5, shard_size=7)
    assert not (tmp_path / "lat" / "index.json").exists()
    done = sorted(p.name for p in (tmp_path / "lat").glob("shard_*.npy"))
    assert done == ["shard_00000.npy", "shard_00001.npy"]  # items 0..13 written, shard 2 was not
    mtimes = [(tmp_path / "lat" / n).stat().st_mtime_ns for n in done]
    shards = cache_latents(tok, FailsAt(data, 3), tmp_path / "lat", batch_size=5, shard_size=7)  # item 3 not re-read
    assert [(tmp_path / "lat" / n).stat().st_mtime_ns for n in done] == mtimes
    fresh = cache_latents(tok, data, tmp_path / "fresh", batch_size=5, shard_size=7)
    assert torch.equal(shards[np.arange(23)], fresh[np.arange(23)])


def test_generator_reads_shards_bit_identically_to_in_memory(tmp_path):
    tok, data = _tokenizer(), _data(32)
    shards = cache_latents(tok, data, tmp_path / "lat", batch_size=8, shard_size=10)
    stats = shards.channel_stats()
    full = stats.normalize(shards[np.arange(32)])  # what the stage did before: all in memory
    cfg = GeneratorConfig(size="micro", steps=4, batch_size=8, lr=1e-3, ema=0.9)
    a = train_generator(cfg, NormalizedLatents(shards, stats), shards.labels, 3, tmp_path / "a", seed=0, ckpt_every=100)
    b = train_generator(cfg, full, shards.labels, 3, tmp_path / "b", seed=0, ckpt_every=100)
    for (name, x), y in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        assert torch.equal(x, y), name
    view = NormalizedLatents(shards, stats)
    assert view.shape == (32, 4, 2, 2) and torch.equal(view[torch.tensor([3, 31])], full[[3, 31]])



def _rank_main(rank, world_size, init_file, directory):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        shards = cache_latents(_tokenizer(), _data(), directory, batch_size=5, shard_size=7, rank=rank,
                               world_size=world_size)
        assert len(shards) == 23
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_write_disjoint_shards_equal_to_one_process(tmp_path):
    import torch.multiprocessing as mp

    tok, data = _tokenizer(), _data()
    with pytest.raises(RuntimeError, match="not written; run every rank"):  # a rank alone, no process group
        cache_latents(tok, data, tmp_path / "alone", batch_size=5, shard_size=7, rank=0, world_size=2)
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = LatentShards(tmp_path / "ddp")
    single = cache_latents(tok, data, tmp_path / "single", batch_size=5, shard_size=7)
    assert torch.equal(ddp[np.arange(23)], single[np.arange(23)]) and torch.equal(ddp.labels, single.labels)
