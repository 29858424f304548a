"""Generator stage: train a DiT on a tokenizer's latents, measure gFID and IS.

    python -m core.generate CONFIG.yaml --tokenizer-dir DIR --out-dir DIR

Pipeline: encode the train split with the (EMA) tokenizer -> per-channel normalisation
-> flow-matching DiT training (core.generator.train) -> after each step of
``generator.eval_at`` and after the last step: ``generator.num_samples`` class-balanced
samples of the EMA model, decoded by the tokenizer, against the same number of real
val images -> gFID and IS (backbone from ``eval``, recorded beside each number).

Writes ``out_dir/{config.yaml, log.jsonl, latents_train.pt, latent_stats.pt, checkpoints/,
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

import torch
import torchvision
from PIL import Image

from core.config import ConfigError, RunConfig, config_dict, config_hash, load_config, save_config
from core.data import build_dataset
from core.eval.fid import compute_fid_is, resolve_backbone
from core.eval.metrics import to_uint8
from core.generator.flow import sample_latents
from core.generator.latents import cached_latents, load_or_compute_stats
from core.generator.train import resolve_shift, train_generator
from core.io import write_atomic, write_json_atomic
from core.seed import seed_everything
from core.train import load_tokenizer
from core.trainer.distributed import resolve_device

SAMPLES_PNG_COUNT = 64


def real_images(dataset, n: int) -> torch.Tensor:
    """The first ``n`` images of ``dataset`` as uint8 (n, 3, H, W), from its exact bytes."""
    n = min(n, len(dataset))
    return torch.stack([torch.from_numpy(dataset.render_uint8(i)).permute(2, 0, 1) for i in range(n)])


@torch.no_grad()
def decode_latents(tokenizer, stats, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Normalised latents (N, c, h, h) -> images uint8 (N, 3, H, W) on the CPU."""
    out = [to_uint8(tokenizer.decode(stats.denormalize(z[i : i + batch_size]))).cpu()
           for i in range(0, len(z), batch_size)]
    return torch.cat(out)


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
    result_path = out_dir / "result.json"
    if (done := _complete_result(result_path)) is not None:
        return done
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = out_dir / "config.yaml"
    if not saved.exists():
        save_config(cfg, saved)
    elif config_hash(load_config(saved)) != config_hash(cfg):
        raise ConfigError(f"{saved}: the directory holds a generator run of a different config; use a new --out-dir")
    gen = cfg.generator
    seed = seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)

    tokenizer, tok_cfg = load_tokenizer(tokenizer_dir, ema=True)
    if tok_cfg.model != cfg.model or tok_cfg.data.image_size != cfg.data.image_size:
        raise ValueError(
            f"{tokenizer_dir}: tokenizer was trained with model={config_dict(tok_cfg)['model']}, "
            f"image_size={tok_cfg.data.image_size}; this run asks for model={config_dict(cfg)['model']}, "
            f"image_size={cfg.data.image_size}"
        )
    tokenizer = tokenizer.to(device).eval().requires_grad_(False)
    train_set, val_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    num_classes = train_set.num_classes
    latents, labels = cached_latents(tokenizer, train_set, out_dir / "latents_train.pt", cfg.eval.batch_size, device)
    stats = load_or_compute_stats(out_dir / "latent_stats.pt", latents)
    latent_shape = tuple(latents.shape[1:])

    shift = resolve_shift(gen, latent_shape)
    backbone = resolve_backbone(cfg.eval)
    real = real_images(val_set, gen.num_samples)
    samples_png = out_dir / "samples.png"

    def evaluate(ema, step: int) -> list[dict]:
        z, _ = sample_latents(
            ema, gen.num_samples, num_classes, latent_shape, sampler=gen.sampler, steps=gen.sample_steps,
            cfg_scale=gen.cfg_scale, shift=shift, seed=seed + step, batch_size=cfg.eval.batch_size, device=device,
        )
        fake = decode_latents(tokenizer, stats, z, cfg.eval.batch_size)
        save_grid(fake[:SAMPLES_PNG_COUNT], samples_png)
        scores = compute_fid_is(fake, real, backbone=backbone, inception_weights=cfg.eval.inception_weights,
                                device=device.type, batch_size=cfg.eval.batch_size)
        common = {"step": step, "backbone": scores["backbone"], "num_samples": scores["num_fake"]}
        return [{"name": "gfid", "value": scores["fid"], **common},
                {"name": "inception_score", "value": scores["inception_score"], **common}]

    out = train_generator(
        gen, stats.normalize(latents), labels, num_classes, out_dir, seed=seed, device=device, evaluate=evaluate,
        ckpt_every=cfg.train.ckpt_every, keep_last=cfg.train.keep_last, log_every=cfg.train.log_every,
        bf16=cfg.train.precision == "bf16" and device.type == "cuda", stop_at_step=stop_at_step,
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
            "complete": True, "seed": seed, "device": device.type, "fid_backbone": backbone,
            "generator_size": gen.size, "generator_params": out["ema"].num_params(),
            "latent_shape": list(latent_shape), "time_shift": shift, "num_classes": num_classes,
            "num_train_latents": len(latents), "num_real": len(real), "sampler": gen.sampler,
            "sample_steps": gen.sample_steps, "cfg_scale": gen.cfg_scale,
            "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
        },
    }
    write_json_atomic(result_path, result)
    return result


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
