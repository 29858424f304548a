"""Generator stage: train a DiT on a tokenizer's latents, measure gFID and IS.

    python -m core.generate CONFIG.yaml --tokenizer-dir DIR --out-dir DIR

Pipeline: encode the train split with the (EMA) tokenizer into memory-mapped float32
shards (``data.num_workers`` loader workers; core.generator.latents) -> per-channel
normalisation on access -> flow-matching DiT training (core.generator.train) -> after each
step of ``generator.eval_at`` and after the last step: ``generator.num_samples`` samples of
the EMA model with uniform class labels (label i mod K: N/K per class, e.g. 50 per class
for 50k on ImageNet), decoded by the tokenizer -> gFID and IS (backbone from ``eval``,
recorded beside each number).  The gFID reference is ``eval.fid_reference`` (precomputed
mu/sigma, e.g. ADM's ImageNet-256 batch) when set, else a class-balanced subset of
``generator.num_samples`` val images (``core.data.balanced_subset``, ``eval.subset_seed``);
``info.gfid_reference`` says which.  Sampling, decoding and feature extraction stream
batch by batch: only feature statistics and IS logits are kept.

Writes ``out_dir/{config.yaml, log.jsonl, latents_train/, latent_stats.pt, checkpoints/,
samples.png, result.json}``.  Called again it resumes from the latest checkpoint, or
returns the existing result when ``result.json`` is complete.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import Iterator

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from core.config import ConfigError, RunConfig, config_dict, config_hash, load_config, save_config
from core.data import balanced_subset, build_dataset, dataset_labels, subset_info
from core.eval.fid import (
    FeatureStatistics, FidelityFeatures, frechet_distance, inception_score, load_reference_statistics, resolve_backbone,
)
from core.eval.metrics import to_uint8
from core.generator.flow import guided, sample
from core.generator.latents import NormalizedLatents, cache_latents, load_or_compute_stats
from core.generator.train import resolve_shift, train_generator
from core.io import write_atomic, write_json_atomic
from core.seed import seed_everything
from core.train import load_tokenizer
from core.trainer import distributed as D
from core.trainer.loop import use_compile

SAMPLES_PNG_COUNT = 64


class _Uint8View(Dataset):
    """Items ``indices`` of ``dataset`` as their exact uint8 (3, H, W) bytes (``render_uint8``)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.dataset.render_uint8(int(self.indices[i]))).permute(2, 0, 1)


def real_statistics(dataset, n: int, seed: int, features: FidelityFeatures, batch_size: int = 64,
                    num_workers: int = 0) -> tuple[dict, dict]:
    """FID statistics of a class-balanced subset of ``min(n, len(dataset))`` images (exact bytes).

    Returns (stats, subset info); images are decoded by ``num_workers`` loader workers and
    featurised ``batch_size`` at a time (only the running statistics are kept).
    """
    labels = dataset_labels(dataset)
    indices = balanced_subset(labels, min(n, len(dataset)), seed)
    stats = FeatureStatistics()
    for images in DataLoader(_Uint8View(dataset, indices), batch_size=batch_size, num_workers=num_workers):
        stats.update(features.features(images)[0])
    return stats.statistics(), subset_info(labels, indices, seed)


def uniform_labels(n: int, num_classes: int) -> torch.Tensor:
    """Class labels (n,) of the samples: i mod K, so every class gets n // K or n // K + 1."""
    return torch.arange(n) % num_classes


@torch.no_grad()
def sample_images(ema, tokenizer, stats, n: int, num_classes: int, latent_shape, gen, shift: float, seed: int,
                  batch_size: int, device) -> Iterator[torch.Tensor]:
    """Yield uint8 (B, 3, H, W) decoded samples, ``batch_size`` at a time (noise from ``seed``)."""
    labels = uniform_labels(n, num_classes)
    g = torch.Generator(device="cpu").manual_seed(seed)  # one stream, drawn batch by batch
    for i in range(0, n, batch_size):
        y = labels[i : i + batch_size].to(device)
        noise = torch.randn(len(y), *latent_shape, generator=g).to(device)
        z = sample(guided(ema, y, gen.cfg_scale), noise, gen.sample_steps, gen.sampler, shift)
        yield to_uint8(tokenizer.decode(stats.denormalize(z))).cpu()


def save_grid(images: torch.Tensor, path: Path) -> None:
    """uint8 (N, 3, H, W) -> a square-ish PNG grid."""
    grid = torchvision.utils.make_grid(images, nrow=max(1, int(math.sqrt(len(images)))), padding=2)
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def _complete_result(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return result if result.get("info", {}).get("complete") else None


def generate(cfg: RunConfig, tokenizer_dir: str | Path, out_dir: str | Path, stop_at_step: int | None = None) -> dict:
    """Train the generator on the tokenizer in ``tokenizer_dir`` and measure gFID/IS.

    Under torchrun / submitit (WORLD_SIZE > 1) every rank calls it: latents are cached and
    the DiT is trained data-parallel (``generator.batch_size`` is the global batch); rank 0
    evaluates and writes (the other ranks wait for it at the next collective).

    Parameters
    ----------
    cfg : the run's resolved config (``generator``, ``data``, ``eval``, ``train.seed``,
        ``train.device``/``precision``, ``train.ckpt_every``/``keep_last``/``log_every``).
    tokenizer_dir : run directory of a finished tokenizer stage (``core.train.train``).
    out_dir : this stage's directory.
    stop_at_step : stop after this many generator steps, with a checkpoint, without writing
        result.json (staged runs, tests); the returned dict then has ``"stopped_at"``.

    Returns
    -------
    The ``result.json`` content: metrics ``gfid`` and ``inception_score`` (one row per
    evaluated generator step, with the backbone) and ``generator_train_time_s``.
    """
    out_dir = Path(out_dir).resolve()
    if (done := _complete_result(out_dir / "result.json")) is not None:
        return done
    info = D.init_distributed(cfg.train.device)
    try:
        return _generate(cfg, tokenizer_dir, out_dir, stop_at_step, info)
    finally:
        D.cleanup(info)


def _generate(cfg: RunConfig, tokenizer_dir: str | Path, out_dir: Path, stop_at_step: int | None,
              dist_info: D.DistInfo) -> dict:
    result_path = out_dir / "result.json"
    saved = out_dir / "config.yaml"
    if saved.exists() and config_hash(load_config(saved)) != config_hash(cfg):  # every rank raises alike
        raise ConfigError(f"{saved}: the directory holds a generator run of a different config; use a new --out-dir")
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not saved.exists():
            save_config(cfg, saved)
    D.barrier(dist_info)
    gen = cfg.generator
    seed = seed_everything(cfg.train.seed)
    device = dist_info.device

    tokenizer, tok_cfg = load_tokenizer(tokenizer_dir, ema=True)
    if tok_cfg.model != cfg.model or tok_cfg.data.image_size != cfg.data.image_size:
        raise ValueError(
            f"{tokenizer_dir}: tokenizer was trained with model={config_dict(tok_cfg)['model']}, "
            f"image_size={tok_cfg.data.image_size}; this run asks for model={config_dict(cfg)['model']}, "
            f"image_size={cfg.data.image_size}"
        )
    tokenizer = tokenizer.to(device).eval().requires_grad_(False)
    backbone = resolve_backbone(cfg.eval)
    features = FidelityFeatures(backbone, cfg.eval.inception_weights, isc=True, device=device.type)
    reference: dict = {}  # the gFID reference: name (recorded in info), statistics
    if cfg.eval.fid_reference:
        # Loaded (and its width checked against the backbone) before any training, so a wrong
        # file fails in seconds, not after latent caching and training.
        probe = torch.zeros(2, 3, cfg.data.image_size, cfg.data.image_size, dtype=torch.uint8)
        dim = features.features(probe)[0].shape[1]
        reference["stats"], reference["name"] = load_reference_statistics(cfg.eval.fid_reference, dim)
        reference["num_real"] = None
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    if not reference:  # described now (labels only), statistics computed at the first evaluation
        n_real = min(gen.num_samples, len(val_set))
        reference["subset"] = subset_info(dataset_labels(val_set), balanced_subset(dataset_labels(val_set), n_real,
                                                                                    cfg.eval.subset_seed),
                                          cfg.eval.subset_seed)
        reference["name"] = f"balanced-val-subset:{n_real}:seed={cfg.eval.subset_seed}"
        reference["num_real"] = n_real
    num_classes = train_set.num_classes
    latents = cache_latents(tokenizer, train_set, out_dir / "latents_train", cfg.eval.batch_size, device,
                            num_workers=cfg.data.num_workers, rank=dist_info.rank, world_size=dist_info.world_size)
    stats = load_or_compute_stats(out_dir / "latent_stats.pt", latents)
    latent_shape = tuple(latents.shape[1:])

    shift = resolve_shift(gen, latent_shape)
    samples_png = out_dir / "samples.png"

    def evaluate(ema, step: int) -> list[dict]:
        if not dist_info.is_main:  # rank 0 evaluates; the rows it returns are what its checkpoint keeps
            return []
        if "stats" not in reference:
            reference["stats"], _ = real_statistics(val_set, gen.num_samples, cfg.eval.subset_seed, features,
                                                    cfg.eval.batch_size, cfg.data.num_workers)
        fake_stats, logits, first = FeatureStatistics(), [], []
        for images in sample_images(ema, tokenizer, stats, gen.num_samples, num_classes, latent_shape, gen, shift,
                                    seed + step, cfg.eval.batch_size, device):
            if sum(len(x) for x in first) < SAMPLES_PNG_COUNT:
                first.append(images)
            feats, lg = features.features(images)
            fake_stats.update(feats)
            logits.append(lg)
        save_grid(torch.cat(first)[:SAMPLES_PNG_COUNT], samples_png)
        is_mean, _ = inception_score(torch.cat(logits))
        common = {"step": step, "backbone": features.backbone, "num_samples": gen.num_samples}
        return [{"name": "gfid", "value": frechet_distance(fake_stats.statistics(), reference["stats"]), **common},
                {"name": "inception_score", "value": is_mean, **common}]

    out = train_generator(
        gen, NormalizedLatents(latents, stats), latents.labels, num_classes, out_dir, seed=seed, device=device,
        evaluate=evaluate,
        ckpt_every=cfg.train.ckpt_every, keep_last=cfg.train.keep_last, log_every=cfg.train.log_every,
        bf16=cfg.train.precision == "bf16" and device.type == "cuda", stop_at_step=stop_at_step,
        dist_info=dist_info, compile=use_compile(cfg.train, device),
    )
    if out["step"] < gen.steps:
        return {"stage": "generator", "stopped_at": out["step"], "out_dir": str(out_dir)}
    metrics = list(out["metrics"])
    metrics.append({"name": "generator_train_time_s", "value": out["train_time_s"], "step": out["step"],
                    "backbone": None, "num_samples": None})
    ckpts = sorted((out_dir / "checkpoints").glob("step_*.pt"))
    result = {
        "stage": "generator",
        "metrics": metrics,
        "artifacts": [{"kind": "checkpoint", "path": str(ckpts[-1])}, {"kind": "samples", "path": str(samples_png)},
                      {"kind": "latent_stats", "path": str(out_dir / "latent_stats.pt")}],
        "info": {
            "complete": True, "seed": seed, "device": device.type, "world_size": dist_info.world_size,
            "fid_backbone": backbone,
            "generator_size": gen.size, "generator_params": out["ema"].num_params(),
            "latent_shape": list(latent_shape), "time_shift": shift, "num_classes": num_classes,
            "num_train_latents": len(latents), "latent_cache": {"dtype": latents.index["dtype"],
                                                                "shards": len(latents.index["shards"])},
            "gfid_reference": reference.get("name"), "num_real": reference.get("num_real"),
            "real_subset": reference.get("subset"),
            "sample_labels": {"scheme": "uniform (i mod K)", "per_class_min": gen.num_samples // num_classes,
                              "per_class_max": -(-gen.num_samples // num_classes)},
            "sampler": gen.sampler,
            "sample_steps": gen.sample_steps, "cfg_scale": gen.cfg_scale,
            "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
        },
    }
    if dist_info.is_main:
        write_json_atomic(result_path, result)
    D.barrier(dist_info)
    return result if dist_info.is_main else _complete_result(result_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.generate", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("--tokenizer-dir", required=True, help="finished tokenizer run directory")
    parser.add_argument("--out-dir", required=True, help="output directory of this stage")
    args = parser.parse_args(argv)
    result = generate(load_config(args.config), args.tokenizer_dir, args.out_dir)
    for row in result["metrics"]:
        print(f"{row['name']:>24s} step {row['step']:>7d}: {row['value']:.4f}" + (f" ({row['backbone']})" if row["backbone"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
