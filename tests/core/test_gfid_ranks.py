"""gFID sampled on 2 gloo ranks equals one process; Inception Score splits follow the ADM evaluator."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from core.eval.featnet import DEFAULT_WEIGHTS

needs_featnet = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="featnet weights not built yet")
N, BATCH = 24, 4  # 12 samples per rank: rank 1's batches are the one process's batches 3..5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    from core.config import GeneratorConfig
    from core.generator.latents import LatentStats
    from core.models.dit import DiT
    from core.models.tokenizer import TokenizerArgs, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(TokenizerArgs(image_size=16, patch_size=4, latent_size=2, latent_channels=4)).eval()
    dit = DiT("micro", latent_channels=4, latent_size=2, num_classes=3).eval()
    for p in dit.parameters():  # adaLN-Zero starts at zero (a constant sampler); any weights will do
        torch.nn.init.normal_(p, std=0.05)
    stats = LatentStats(torch.zeros(4), torch.ones(4))
    gen = GeneratorConfig(sampler="heun", sample_steps=2, cfg_scale=1.5)
    return tok, dit, stats, gen


def _fidelity(info, tmp, name):
    from core.data import build_dataset
    from core.config import DataConfig
    from core.eval.fid import FidelityFeatures
    from core.generator.gfid import generator_fidelity, real_statistics

    tok, dit, stats, gen = _setup()
    features = FidelityFeatures("embedded", isc=True, device="cpu")
    val = build_dataset(DataConfig(image_size=16, num_classes=3, val_size=30), "val")
    real, _ = real_statistics(val, N, 0, features, batch_size=BATCH, info=info)  # the same batches on 1 and 2 ranks
    out = generator_fidelity(dit, tok, stats, real, features, n=N, num_classes=3, latent_shape=(4, 2, 2), gen=gen,
                             shift=1.0, seed=5, batch_size=BATCH, info=info, grid_path=tmp / f"grid_{name}.png")
    return {"real": real, **out}


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    from pathlib import Path

    from core.eval.fid import FeatureStatistics
    from core.trainer import distributed as D

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    try:
        out = _fidelity(info, Path(tmp), f"rank{rank}")
        # the reduction itself on features with very different shifts and uneven counts
        feats = _features()
        mine = feats[:7] if rank == 0 else feats[7:]
        stats = FeatureStatistics()
        for chunk in mine.split(3):
            stats.update(chunk)
        out["reduced"] = stats.all_reduce(info).statistics()
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        D.cleanup(info)


def _features():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 6, generator=g, dtype=torch.float64) * 3 + torch.linspace(-50, 50, 40)[:, None]


@needs_featnet
@pytest.mark.slow  # two spawned processes; ~30 s
def test_two_ranks_give_the_statistics_of_one_process(tmp_path):
    from core.eval.fid import FeatureStatistics, frechet_distance
    from core.trainer.distributed import DistInfo

    torch.set_num_threads(1)
    one = _fidelity(DistInfo(), tmp_path, "one")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for two in ranks:  # every rank holds the result of all samples
        for key in ("mu", "sigma"):
            np.testing.assert_allclose(two["real"][key], one["real"][key], rtol=1e-10, atol=1e-12)
        assert two["gfid"] == pytest.approx(one["gfid"], rel=1e-9)
        assert two["inception_score"] == pytest.approx(one["inception_score"], rel=1e-12)
        assert two["num_samples"] == N and two["is_rule"] == one["is_rule"]
    assert one["gfid"] > 0 and one["inception_score"] > 1.0
    # rank 0 alone writes the grid (of its first samples: the first of all)
    assert (tmp_path / "grid_rank0.png").is_file() and not (tmp_path / "grid_rank1.png").exists()

    whole = FeatureStatistics()
    whole.update(_features())
    for two in ranks:
        for key in ("mu", "sigma"):
            np.testing.assert_allclose(two["reduced"][key], whole.statistics()[key], rtol=1e-12, atol=1e-10)
    assert frechet_distance(ranks[0]["reduced"], whole.statistics()) == pytest.approx(0.0, abs=1e-9)


@needs_featnet
def test_samples_do_not_depend_on_batch_size_or_sharding():
    from core.generator.gfid import sample_images, shard

    tok, dit, stats, gen = _setup()
    kw = dict(num_classes=3, latent_shape=(4, 2, 2), gen=gen, shift=1.0, seed=5, device="cpu")
    whole = torch.cat(list(sample_images(dit, tok, stats, range(N), batch_size=N, **kw)))
    parts = [torch.cat(list(sample_images(dit, tok, stats, shard(N, r, 3), batch_size=5, **kw))) for r in range(3)]
    assert [len(p) for p in parts] == [8, 8, 8]
    # per-sample noise: the same images up to one uint8 step of batched-matmul rounding
    assert (torch.cat(parts).int() - whole.int()).abs().max() <= 1


def test_inception_score_splits_follow_the_adm_evaluator():
    """ADM's compute_inception_score: softmax, consecutive chunks of 5000 in order, no shuffle."""
    from core.eval.fid import inception_score

    g = torch.Generator().manual_seed(0)
    # 12,000 samples whose class sharpness drifts along the order: a shuffle would mix the chunks
    logits = torch.randn(12_000, 20, generator=g, dtype=torch.float64) * torch.linspace(0.5, 4.0, 12_000)[:, None]
    preds = torch.softmax(logits, dim=1).numpy()
    scores = []
    for i in range(0, len(preds), 5000):  # ADM evaluator, verbatim in numpy
        part = preds[i : i + 5000]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    mean, std = inception_score(logits)
    assert mean == pytest.approx(float(np.mean(scores)), rel=1e-9) and std == pytest.approx(float(np.std(scores)))
    from core.eval.fid import IS_RULE  # the rule is named beside every IS (result info)

    assert "consecutive" in IS_RULE and "5000" in IS_RULE and "no shuffle" in IS_RULE
