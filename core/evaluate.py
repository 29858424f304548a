"""Evaluation stage entry point: ``python -m core.evaluate CONFIG.yaml --tokenizer-dir DIR --out-dir DIR``.

Reconstruction metrics of a trained tokenizer on held-out (val) images — PSNR, SSIM,
LPIPS, rFID — and the linear probe before/after the bottleneck with the structure loss
(paper Sec. 3.3).  Writes ``out_dir/{config.yaml, result.json}`` (docs/ARCHITECTURE.md);
called again on a directory with a complete ``result.json`` it returns that result.

Protocol: ``eval.num_samples`` val images — a class-balanced subset drawn by
``core.data.balanced_subset`` with ``eval.subset_seed`` — are reconstructed with the EMA
weights; both images are quantised to uint8 before every metric.  rFID compares the
reconstructions (fake) with the same val images (real).  The probe is fitted on pooled
features of a balanced subset of ``eval.probe_train`` train images and scored on a balanced
subset of ``eval.probe_val`` val images.  The subsets (size, seed, classes covered) are
recorded in ``info.subsets``.

Memory: everything streams batch by batch — per-image PSNR/SSIM/LPIPS values, running FID
feature statistics (:class:`core.eval.fid.FeatureStatistics`) and the pooled probe features
are kept; no image set is ever held (benchmarks/bench_memory.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import numpy as np
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from core import stage as S
from core.config import ConfigError, RunConfig, config_hash, load_config
from core.data import balanced_subset, build_dataset, dataset_labels, subset_info
from core.eval.fid import FeatureStatistics, FidelityFeatures, frechet_distance, resolve_backbone
from core.eval.metrics import psnr, psnr_mean, ssim, to_uint8
from core.eval.probe import linear_probe, structure_loss
from core.io import write_json_atomic
from core.losses.perceptual import build_perceptual_loss
from core.models.load import load_tokenizer
from core.seed import seed_everything
from core.trainer.distributed import resolve_device

log = logging.getLogger(__name__)

STAGE = "evaluate"
METRICS = ("psnr", "ssim", "lpips", "rfid", "probe_acc_before", "probe_acc_after", "structure_loss")


def _loader(dataset, indices: np.ndarray, cfg: RunConfig, desc: str):
    """The items ``indices`` of ``dataset`` in order, batched by ``data.num_workers`` workers."""
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=cfg.eval.batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers)
    return tqdm(loader, desc=desc, unit="batch", leave=False, disable=None)


def take_subset(dataset, n: int, key: str, seed: int) -> tuple[np.ndarray, dict]:
    """Class-balanced indices (n,) of ``dataset`` and their ``info`` record; ConfigError naming ``key``."""
    if not 1 <= n <= len(dataset):
        raise ConfigError(f"{key}={n} must be in [1, {len(dataset)}] (the images of the split); lower {key}")
    labels = dataset_labels(dataset)
    indices = balanced_subset(labels, n, seed)
    return indices, {"key": key, **subset_info(labels, indices, seed)}


@torch.no_grad()
def reconstruction_metrics(model, dataset, indices: np.ndarray, cfg: RunConfig, device: torch.device) -> dict:
    """PSNR/SSIM/LPIPS/rFID of the images ``indices`` of ``dataset`` (see the module docstring)."""
    lpips, lpips_name = build_perceptual_loss(cfg.loss, device)
    features = FidelityFeatures(resolve_backbone(cfg.eval), cfg.eval.inception_weights, isc=False, device=device.type)
    real_stats, fake_stats = FeatureStatistics(), FeatureStatistics()
    # Per-image values (N,) float64, preallocated and filled by copy: the only per-image state
    # kept.  (Appending each batch's small result tensor to a list kept their allocations
    # interleaved with the freed image batches, and RSS grew ~50 KB per image.)
    psnrs, ssims, dists = (torch.empty(len(indices), dtype=torch.float64) for _ in range(3))
    i = 0
    for x, _ in _loader(dataset, indices, cfg, "reconstruct"):
        x = x.to(device)
        x_hat, _ = model(x)
        real, fake = to_uint8(x), to_uint8(x_hat)  # (B, 3, H, W) uint8
        b = slice(i, i + len(x))
        psnrs[b] = psnr(fake, real).cpu()
        ssims[b] = ssim(fake, real).cpu()
        # LPIPS on the quantised images too, back in [-1, 1]
        dists[b] = lpips(fake.float() / 127.5 - 1, real.float() / 127.5 - 1).flatten().cpu()
        real_stats.update(features.features(real)[0])
        fake_stats.update(features.features(fake)[0])
        i += len(x)
    return {
        "psnr": psnr_mean(psnrs), "ssim": float(ssims.mean()), "lpips": float(dists.mean()),
        "rfid": frechet_distance(fake_stats.statistics(), real_stats.statistics()),
        "lpips_backbone": lpips_name, "fid_backbone": features.backbone,
        "psnr_identical_images": int(torch.isinf(psnrs).sum()),
    }


@torch.no_grad()
def probe_features(model, dataset, indices: np.ndarray, cfg: RunConfig, device: torch.device, desc: str):
    """(pooled tokens (n, d), pooled latent (n, c), labels (n,)) of the images ``indices``."""
    before = after = None  # (n, d), (n, c) float32, allocated at the first batch, filled by copy
    labels = torch.empty(len(indices), dtype=torch.long)
    i = 0
    for x, y in _loader(dataset, indices, cfg, desc):
        tokens, latent = model.probe_features(x.to(device))
        if before is None:
            before = torch.empty(len(indices), tokens.shape[1])
            after = torch.empty(len(indices), latent.shape[1])
        before[i : i + len(x)] = tokens.float().cpu()
        after[i : i + len(x)] = latent.float().cpu()
        labels[i : i + len(x)] = torch.as_tensor(y)
        i += len(x)
    return before, after, labels


def _tokenizer_step(tokenizer_dir: Path) -> int | None:
    # The tokenizer's final step, from its result.json (None when it has none yet).
    try:
        return int(json.loads((tokenizer_dir / "result.json").read_text())["info"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate(cfg: RunConfig, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """Evaluate the tokenizer trained in ``tokenizer_dir``; write and return the result.

    Parameters
    ----------
    cfg : the resolved run config (its model/data sections must match the tokenizer run's).
    tokenizer_dir : a ``core.train`` run directory.
    out_dir : where ``config.yaml`` and ``result.json`` go (created).

    Returns
    -------
    The result dict: metrics psnr, ssim, lpips, rfid, probe_acc_before, probe_acc_after,
    structure_loss (accuracies are fractions), each with its backbone and sample count.

    Raises
    ------
    ConfigError when the configs disagree or a sample count exceeds its split.
    """
    tokenizer_dir, out_dir = Path(tokenizer_dir).resolve(), Path(out_dir).resolve()
    done = S.done(out_dir, STAGE, METRICS)
    if done is not None:
        log.info("evaluation %s is complete; returning its result.json", out_dir)
        return done
    S.claim(cfg, out_dir, STAGE, "an evaluation")
    device = resolve_device(cfg.train.device)
    seed = seed_everything(cfg.train.seed)
    model, tok_cfg = load_tokenizer(tokenizer_dir, ema=True, map_location=device)
    S.check_tokenizer(tok_cfg, cfg, tokenizer_dir)

    t0 = time.time()
    val, train = build_dataset(cfg.data, "val"), build_dataset(cfg.data, "train")
    seed_subset = cfg.eval.subset_seed
    rec_idx, rec_info = take_subset(val, cfg.eval.num_samples, "eval.num_samples", seed_subset)
    ptrain_idx, ptrain_info = take_subset(train, cfg.eval.probe_train, "eval.probe_train", seed_subset)
    pval_idx, pval_info = take_subset(val, cfg.eval.probe_val, "eval.probe_val", seed_subset)
    n_rec, n_ptrain, n_pval = len(rec_idx), len(ptrain_idx), len(pval_idx)
    rec = reconstruction_metrics(model, val, rec_idx, cfg, device)
    tb, ta, ty = probe_features(model, train, ptrain_idx, cfg, device, "probe train")
    vb, va, vy = probe_features(model, val, pval_idx, cfg, device, "probe val")
    probe_kw = {"method": cfg.eval.probe, "num_classes": getattr(val, "num_classes", None), "device": device}
    before = linear_probe(tb, ty, vb, vy, **probe_kw)
    after = linear_probe(ta, ty, va, vy, **probe_kw)

    step = _tokenizer_step(tokenizer_dir)
    metrics = [
        S.metric_row("psnr", rec["psnr"], step, None, n_rec),
        S.metric_row("ssim", rec["ssim"], step, None, n_rec),
        S.metric_row("lpips", rec["lpips"], step, rec["lpips_backbone"], n_rec),
        S.metric_row("rfid", rec["rfid"], step, rec["fid_backbone"], n_rec),
        S.metric_row("probe_acc_before", before["acc"], step, None, n_pval),
        S.metric_row("probe_acc_after", after["acc"], step, None, n_pval),
        S.metric_row("structure_loss", structure_loss(before["acc"], after["acc"]), step, None, n_pval),
    ]
    result = {
        "stage": STAGE,
        "metrics": metrics,
        "artifacts": [{"kind": "config", "path": str(out_dir / "config.yaml")},
                      {"kind": "tokenizer", "path": str(tokenizer_dir)}],
        "info": {
            "lpips_backbone": rec["lpips_backbone"], "fid_backbone": rec["fid_backbone"],
            "probe_method": cfg.eval.probe, "probe_lam_before": before["lam"], "probe_lam_after": after["lam"],
            "probe_train": n_ptrain, "probe_val": n_pval, "psnr_identical_images": rec["psnr_identical_images"],
            "subsets": {"reconstruction": rec_info, "probe_train": ptrain_info, "probe_val": pval_info},
            "subset_seed": seed_subset,
            "accuracy_unit": "fraction", "quantised_uint8": True, "seed": cfg.train.seed, "effective_seed": seed,
            "device": str(device), "eval_time_s": round(time.time() - t0, 2), "config_hash": config_hash(cfg),
            "torch_version": torch.__version__,
        },
    }
    write_json_atomic(out_dir / "result.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.evaluate", description="Evaluate a trained TC-AE tokenizer.")
    parser.add_argument("config", nargs="?", help="YAML run config (defaults when omitted)")
    parser.add_argument("--tokenizer-dir", required=True, help="the core.train run directory")
    parser.add_argument("--out-dir", required=True, help="output directory (config.yaml, result.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config)
        result = evaluate(cfg, args.tokenizer_dir, args.out_dir)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("done: %s", ", ".join(f"{m['name']}={m['value']:.4g}" for m in result["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
