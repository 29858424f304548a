"""Peak memory of latent caching and of ``evaluate()`` against the number of images N.

One fresh subprocess per (task, N) reports its own peak RSS (``resource.getrusage``
``ru_maxrss``) and its RSS right before the measured call (after imports, model and
dataset construction), so the difference is what the call itself added:

* ``cache``: ``core.generator.latents.cache_latents`` of N synthetic 64-px train images
  with a random micro tokenizer (patch 8, latents 32 x 8 x 8 = 2048 float32 = 8 KB each,
  so holding all latents would cost N x 8 KB), ``num_workers=0`` so all work is in the
  measured process.
* ``evaluate``: ``core.evaluate.evaluate`` with eval.num_samples = probe_train =
  probe_val = N (train and val splits of N images) on that tokenizer trained for one step
  (in its own subprocess, not measured).

``--code-root /tmp/base`` runs the children against another checkout (the pre-streaming
code, whose ``cached_latents``/``evaluate`` keep every latent/image) for comparison.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --sizes 2000,8000,32000 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _overrides(n: int) -> dict:
    return {
        "data.image_size": 64, "data.train_size": n, "data.val_size": n, "data.batch_size": 8,
        "model.patch_size": 8, "model.latent_size": 8, "model.latent_channels": 32, "loss.perceptual": 0.0,
        "optim.warmup_steps": 1, "train.steps": 1, "train.ckpt_every": 1, "train.log_every": 1, "train.device": "cpu",
        "eval.num_samples": n, "eval.probe_train": n, "eval.probe_val": n, "eval.batch_size": 64,
    }


def child(task: str, n: int, work: Path) -> dict:
    """Runs in the subprocess: one measured call, result as a dict."""
    import torch

    from core.config import load_config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(None, _overrides(n))
    if task == "train":
        from core.train import train

        train(cfg, work / "tok")
        return {}
    if task == "cache":
        from core.data import build_dataset
        from core.generator import latents as lat
        from core.models.tokenizer import build_tokenizer, TokenizerArgs

        torch.manual_seed(0)
        tok = build_tokenizer(TokenizerArgs(image_size=64, patch_size=8, latent_size=8, latent_channels=32)).eval()
        ds = build_dataset(cfg.data, "train")
        before, t0 = _rss_mb(), time.perf_counter()
        if hasattr(lat, "cache_latents"):
            out = lat.cache_latents(tok, ds, work / "latents", batch_size=64, num_workers=0)
        else:  # the old in-memory cache
            out, _ = lat.cached_latents(tok, ds, work / "latents.pt", batch_size=64)
        shape = list(out.shape)
    else:
        from core.evaluate import evaluate

        before, t0 = _rss_mb(), time.perf_counter()
        result = evaluate(cfg, work / "tok", work / "eval")
        shape = {m["name"]: round(m["value"], 4) for m in result["metrics"]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    import core

    return {"task": task, "n": n, "code": str(Path(core.__file__).parents[1]), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak, 1), "added_mb": round(peak - before, 1),
            "time_s": round(time.perf_counter() - t0, 1), "out": shape}


def run_child(task: str, n: int, work: Path, code_root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    cmd = [sys.executable, __file__, "--child", task, "--n", str(n), "--work", str(work)]
    out = subprocess.run(cmd, env=env, cwd=code_root, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{task} N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,8000,32000")
    parser.add_argument("--tasks", default="cache,evaluate")
    parser.add_argument("--code-root", default=str(ROOT), help="checkout whose core/ the children import")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        print(json.dumps(child(args.child, args.n, Path(args.work))))
        return 0
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
            work = Path(tmp)
            for task in args.tasks.split(","):
                if task == "evaluate":
                    run_child("train", n, work, Path(args.code_root))
                row = run_child(task, n, work, Path(args.code_root))
                rows.append(row)
                print(f"{task:>8s} N={n:>6d}: peak RSS {row['peak_rss_mb']:8.1f} MB "
                      f"(+{row['added_mb']:7.1f} MB over {row['rss_before_mb']:.1f} MB before the call), "
                      f"{row['time_s']:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
