"""Tokenizer stage entry point: ``python -m core.train CONFIG.yaml --run-dir DIR [--set key=value ...]``.

Writes ``run_dir/{config.yaml, log.jsonl, checkpoints/, result.json}`` (docs/ARCHITECTURE.md).
Called again on the same directory it resumes from ``checkpoints/latest.pt``, or returns the
existing result when ``result.json`` is complete.  Under torchrun / submitit (WORLD_SIZE > 1)
every rank calls :func:`train`; only rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from core import stage as S
from core.config import ConfigError, RunConfig, config_hash, load_config
from core.data import build_dataset
from core.io import write_json_atomic
from core.models.load import checkpoint_path, checkpoint_weights
from core.models.tokenizer import TCAE, VIT_SIZES, build_tokenizer, tokenizer_args
from core.seed import seed_everything
from core.trainer import distributed as D
from core.trainer.checkpoint import load_checkpoint
from core.trainer.loop import Trainer
from core.trainer.build import build_objectives
from core.trainer.objective import ReconstructionObjective

log = logging.getLogger(__name__)

STAGE = "tokenizer"
METRICS = ("train_loss", "params_encoder", "params_decoder", "gflops_encoder", "gflops_decoder", "gflops_total",
           "train_time_s", "encoder_depth")


def _setup_finetune(cfg: RunConfig, model: TCAE) -> None:
    """Decoder fine-tuning (paper App. A): start from ``finetune.init_from``, freeze the encoder."""
    if cfg.finetune.init_from:
        ckpt = load_checkpoint(checkpoint_path(cfg.finetune.init_from))
        model.load_state_dict(checkpoint_weights(ckpt, ema=True))
    model.encoder.requires_grad_(False)


def _result(cfg: RunConfig, run_dir: Path, trainer: Trainer, backbone: str | None, seed: int,
            info: D.DistInfo) -> dict:
    from core.eval.flops import tokenizer_flops

    model, step = trainer.model, trainer.step
    last = json.loads(trainer.log_path.read_text().splitlines()[-1])
    params = model.num_params()
    flops = tokenizer_flops(model, cfg.data.image_size)
    metrics = [
        # The loss includes the perceptual term, so it carries the perceptual backbone's name.
        S.metric_row("train_loss", last["loss"], step, backbone),
        S.metric_row("params_encoder", params["encoder"], step),
        S.metric_row("params_decoder", params["decoder"], step),
        *(S.metric_row(f"gflops_{k}", flops[k] / 1e9, step) for k in ("encoder", "decoder", "total")),
        S.metric_row("train_time_s", trainer.train_time_s, step),
        # Resolved encoder depth (what split_depth=None means): analysis reads it from the
        # database instead of importing the model's size table.
        S.metric_row("encoder_depth", VIT_SIZES[cfg.model.encoder_size].depth, step),
    ]
    return {
        "stage": STAGE,
        "metrics": metrics,
        "artifacts": [
            {"kind": "checkpoint", "path": str((trainer.ckpt_dir / f"step_{step:08d}.pt").resolve())},
            {"kind": "log", "path": str(trainer.log_path.resolve())},
            {"kind": "config", "path": str((run_dir / "config.yaml").resolve())},
        ],
        "info": {
            "seed": cfg.train.seed, "effective_seed": seed, "perceptual_backbone": backbone,
            "device": str(info.device), "world_size": info.world_size, "precision": cfg.train.precision,
            "torch_version": torch.__version__, "steps": step, "config_hash": config_hash(cfg),
            "flops_convention": "FLOPs = 2*MACs, one image, forward only",
            # e.g. the fine-tuning discriminator's backbone: what shaped the weights.
            "objective_backbones": {type(o).__name__: o.backbone_name for o in trainer.objectives
                                    if hasattr(o, "backbone_name")},
            "finetune_schedule": trainer.schedule or None,  # epochs -> steps of the fine-tuning recipe
            "batch_size_per_rank": trainer.cfg.data.batch_size, "compiled_blocks": trainer.compiled_blocks,
        },
    }


def build_trainer(cfg: RunConfig, run_dir: str | Path, info: D.DistInfo) -> tuple[Trainer, str | None, int]:
    """Model, objectives, dataset and :class:`Trainer` of a run (not yet resumed).

    A fine-tuning run's epoch recipe is resolved to steps here; ``trainer.cfg`` is the
    resolved config and ``trainer.schedule`` the conversion (empty when none).

    Returns ``(trainer, perceptual backbone name or None, effective seed of this rank)``.
    """
    dataset = build_dataset(cfg.data, "train")
    schedule = {}
    if cfg.finetune.enabled:
        from core.finetune import resolve_epochs

        # the paper's fine-tuning recipe is in epochs: steps follow from the dataset and global batch
        cfg, schedule = resolve_epochs(cfg, len(dataset), info.world_size)
    seed_everything(cfg.train.seed, 0)  # identical construction on every rank
    model = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size))
    if cfg.finetune.enabled:
        _setup_finetune(cfg, model)
    model.to(info.device)
    objectives = build_objectives(cfg, model, info.device, info)
    backbone = next(o for o in objectives if isinstance(o, ReconstructionObjective)).backbone
    seed = seed_everything(cfg.train.seed, info.rank)
    trainer = Trainer(cfg, run_dir, model, objectives, dataset, info)
    trainer.schedule = schedule
    return trainer, backbone, seed


def train(cfg: RunConfig, run_dir: str | Path, stop_at_step: int | None = None) -> dict:
    """Train (or resume) the tokenizer of ``cfg`` in ``run_dir``; returns the result dict.

    Parameters
    ----------
    cfg : resolved run config.
    run_dir : output directory (created).
    stop_at_step : stop after this many steps, with a checkpoint, without writing result.json
        (for staged runs and tests); the returned dict then has ``"stopped_at"``.
    """
    run_dir = Path(run_dir).resolve()
    done = S.done(run_dir, STAGE, METRICS)
    if done is not None:
        log.info("tokenizer run %s is complete; returning its result.json", run_dir)
        return done
    info = D.init_distributed(cfg.train.device, run_dir)  # rank 0 locks run_dir until cleanup
    try:
        S.claim(cfg, run_dir, STAGE, "a tokenizer run", write=False)  # every rank raises alike, before anyone writes
        D.barrier(info)
        if info.is_main:
            S.claim(cfg, run_dir, STAGE, "a tokenizer run")
        D.barrier(info)
        trainer, backbone, seed = build_trainer(cfg, run_dir, info)
        resumed = trainer.resume()
        if info.is_main:
            steps = trainer.cfg.train.steps
            what = f"resuming at step {trainer.step}/{steps}" if resumed else f"{steps} steps"
            if trainer.schedule:
                log.info("fine-tuning recipe in epochs -> steps: %s", trainer.schedule)
            log.info("tokenizer -> %s (config.yaml, log.jsonl, checkpoints/, result.json); %s on %s, world %d",
                     run_dir, what, info.device, info.world_size)
        trainer.run(stop_at_step)
        if trainer.step < trainer.cfg.train.steps:
            return {"stage": STAGE, "stopped_at": trainer.step, "run_dir": str(run_dir)}
        result = None
        if info.is_main:
            result = _result(cfg, run_dir, trainer, backbone, seed, info)
            write_json_atomic(run_dir / "result.json", result)
        D.barrier(info)
        return result if result is not None else S.done(run_dir, STAGE, METRICS)
    finally:
        D.cleanup(info)


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. model.patch_size=8)")
        overrides[key] = yaml.safe_load(value)  # typed: 8 -> int, null -> None, [1, 2] -> list
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.train", description="Train a TC-AE tokenizer.")
    parser.add_argument("config", nargs="?", help="YAML run config (defaults when omitted)")
    parser.add_argument("--run-dir", required=True, help="output directory (resumed when it holds a checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, repeatable")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop early with a checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, _parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = train(cfg, args.run_dir, args.stop_at_step)
    if result and "metrics" in result and os.environ.get("RANK", "0") == "0":
        summary = ", ".join(f"{m['name']}={m['value']:.4g}" for m in result["metrics"])
        log.info("done: %s", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
