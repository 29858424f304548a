"""Training throughput of a tokenizer config on this machine (run by hand; numbers go in reports).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_speed.py [CONFIG.yaml] [--set key=value ...] [--steps 30]

Runs ``core.train.train`` in a temporary directory and reports optimizer steps per second
over the steps after the first ``--warmup`` (the first ones pay one-off costs).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml

from core.config import load_config
from core.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.overrides)}
    overrides.update({"train.steps": args.steps, "train.log_every": 1, "train.ckpt_every": 10**9})
    cfg = load_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, tmp)
        log = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
    t0, t1 = log[args.warmup - 1]["time"], log[-1]["time"]
    rate = (len(log) - args.warmup) / (t1 - t0)
    m = cfg.model
    print(f"{m.encoder_size}/{m.decoder_size} p={m.patch_size} {cfg.data.image_size}px batch={cfg.data.batch_size} "
          f"precision={cfg.train.precision} perceptual={cfg.loss.perceptual} "
          f"({result['info']['perceptual_backbone']}) threads={torch.get_num_threads()}: "
          f"{rate:.2f} steps/s, {rate * cfg.data.batch_size:.0f} images/s")


if __name__ == "__main__":
    main()
