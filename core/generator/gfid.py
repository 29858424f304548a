"""gFID and Inception Score of a generator, sampled on every rank of the stage.

Samples: ``n`` = ``generator.num_samples`` with labels i mod K (:func:`uniform_labels`) and the
noise of sample i drawn from its own stream (:func:`sample_noise`), so the sample set does not
depend on the batch size nor on the number of ranks.  Rank r of W samples the consecutive
indices ``shard(n, r, W)`` — its share of the balanced labels — under bf16 autocast when
asked (the ODE state stays float32: the DiT's output is float32, see core.models.dit), decodes
and featurises them batch by batch, and keeps running float64 feature sums; the sums are
then added over ranks (:meth:`core.eval.fid.FeatureStatistics.all_reduce`), so every rank
holds the statistics one process gets from all n samples, up to float64 rounding.  Inception
Score needs each sample's logits: they are gathered in rank order (= sample order) and scored
with the ADM rule (:func:`core.eval.fid.inception_score`).  The reference statistics of a
balanced real subset are computed the same way (:func:`real_statistics`).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterator

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Subset

from core.data import balanced_subset, dataset_labels, subset_info
from core.data.loader import Uint8Items
from core.eval.fid import IS_RULE, FeatureStatistics, FidelityFeatures, frechet_distance, inception_score
from core.eval.metrics import to_uint8
from core.generator.flow import guided, sample
from core.io import write_atomic
from core.seed import step_generator
from core.trainer import distributed as D

SAMPLES_PNG_COUNT = 64
NOISE_STREAM = 7  # core.seed.step_generator stream of the evaluation noise (sample index in place of the step)


def shard(n: int, rank: int, world_size: int) -> range:
    """The consecutive item indices rank ``rank`` of ``world_size`` handles (sizes differ by ≤ 1)."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def real_statistics(dataset, n: int, seed: int, features: FidelityFeatures, batch_size: int = 64,
                    num_workers: int = 0, info: D.DistInfo | None = None) -> tuple[dict, dict]:
    """FID statistics of a class-balanced subset of ``min(n, len(dataset))`` images (exact bytes).

    Returns (stats, subset info); every rank of ``info`` featurises its shard of the subset
    (``num_workers`` loader workers, ``batch_size`` images at a time) and all get the sums of all.
    """
    info = info or D.DistInfo()
    labels = dataset_labels(dataset)
    indices = balanced_subset(labels, min(n, len(dataset)), seed)
    part = shard(len(indices), info.rank, info.world_size)
    mine = indices[part.start:part.stop]
    stats = FeatureStatistics()
    items = Subset(Uint8Items(dataset), [int(i) for i in mine])  # exact uint8 (3, H, W) bytes
    for images, _ in DataLoader(items, batch_size=batch_size, num_workers=num_workers):
        stats.update(features.features(images)[0])
    return stats.all_reduce(info).statistics(), subset_info(labels, indices, seed)


def uniform_labels(n: int, num_classes: int) -> torch.Tensor:
    """Class labels (n,) of the samples: i mod K, so every class gets n // K or n // K + 1."""
    return torch.arange(n) % num_classes


def sample_noise(seed: int, indices: range, shape) -> torch.Tensor:
    """float32 noise (len(indices), *shape): sample i's from the stream (seed, i) alone."""
    out = torch.empty(len(indices), *shape)
    for j, i in enumerate(indices):
        out[j] = torch.randn(shape, generator=step_generator(seed, i, NOISE_STREAM))
    return out


@torch.no_grad()
def sample_images(ema, tokenizer, stats, indices: range, num_classes: int, latent_shape, gen, shift: float,
                  seed: int, batch_size: int, device, bf16: bool = False) -> Iterator[torch.Tensor]:
    """Yield uint8 (B, 3, H, W) decoded samples ``indices``, ``batch_size`` at a time."""
    for lo in range(indices.start, indices.stop, batch_size):
        batch = range(lo, min(lo + batch_size, indices.stop))
        y = uniform_labels(batch.stop, num_classes)[batch.start:].to(device)
        noise = sample_noise(seed, batch, latent_shape).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            z = sample(guided(ema, y, gen.cfg_scale), noise, gen.sample_steps, gen.sampler, shift)
            images = tokenizer.decode(stats.denormalize(z.float()))
        yield to_uint8(images).cpu()


def save_grid(images: torch.Tensor, path: Path) -> None:
    """uint8 (N, 3, H, W) -> a square-ish PNG grid."""
    grid = torchvision.utils.make_grid(images, nrow=max(1, int(math.sqrt(len(images)))), padding=2)
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def generator_fidelity(ema, tokenizer, stats, reference: dict, features: FidelityFeatures, *, n: int,
                       num_classes: int, latent_shape, gen, shift: float, seed: int, batch_size: int,
                       info: D.DistInfo, bf16: bool = False, grid_path: Path | None = None) -> dict:
    """gFID against ``reference`` ({'mu', 'sigma'}) and IS of ``n`` samples, sharded over ``info``'s ranks.

    Collective: every rank calls it and gets the same numbers.  Rank 0 writes the grid of the
    first :data:`SAMPLES_PNG_COUNT` samples to ``grid_path``.

    Returns
    -------
    dict(gfid, inception_score, inception_score_std, is_rule, num_samples).
    """
    if n < info.world_size:
        raise ValueError(f"generator.num_samples={n} is fewer than the {info.world_size} ranks that sample")
    fake, logits, first = FeatureStatistics(), [], []
    mine = shard(n, info.rank, info.world_size)
    for images in sample_images(ema, tokenizer, stats, mine, num_classes, latent_shape, gen, shift, seed,
                                batch_size, info.device, bf16):
        if sum(len(x) for x in first) < SAMPLES_PNG_COUNT:
            first.append(images)
        feats, lg = features.features(images)
        fake.update(feats)
        logits.append(lg)
    if info.is_main and grid_path is not None:
        save_grid(torch.cat(first)[:SAMPLES_PNG_COUNT], grid_path)
    fake.all_reduce(info)
    # IS scores consecutive chunks of the samples in index order: rank order is index order.
    all_logits = torch.cat(D.gather_objects(torch.cat(logits), info))
    is_mean, is_std = inception_score(all_logits)
    return {"gfid": frechet_distance(fake.statistics(), reference), "inception_score": is_mean,
            "inception_score_std": is_std, "is_rule": IS_RULE, "num_samples": n}
