"""Cost of joint SSL training: step time with SSL on vs off, and the share of the SSL step
spent drawing multi-crops and block masks.

Run by hand (numbers go to the report, never to tests):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ssl.py [--steps 10] [--head small] [--device cpu]

SSL-off and SSL-on steps alternate, so load on a shared machine affects both alike.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ssl.py --loop-before HEAD [--steps 10] [--rounds 3]

times the real loop (``Trainer.run``: loader, device augmentations, joint iBOT step) of this
tree against the code of git revision ``HEAD`` (exported with ``git archive``), each in a
fresh process, alternating: main-thread CPU seconds and wall seconds per step, and the
ratio before / after.  On a CPU the "device" work is this process's work too, so the CPU
time here is the step's total, not the host overhead a GPU run would see.

A step is: tokenizer forward, L1 reconstruction loss [+ λ_ssl · SSL loss], backward,
AdamW step [+ teacher EMA].  Perceptual loss is left out so the ratio isolates SSL.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.config import load_config
from core.models.tokenizer import build_tokenizer, tokenizer_args
from core.ssl import SSLObjective
from core.ssl.augment import step_generator
from core.ssl.masking import block_masks

CONFIGS = {
    # name: (overrides, batch size)
    "tiny": ({"data.image_size": 32, "model.patch_size": 4, "model.encoder_size": "micro",
              "model.decoder_size": "micro", "model.split_depth": 2, "model.latent_size": 4}, 16),
    "small": ({"data.image_size": 64, "model.patch_size": 4, "model.encoder_size": "mini",
               "model.decoder_size": "mini", "model.split_depth": 3, "model.latent_size": 4}, 16),
}


class Timed:
    """Wrap a callable and accumulate its wall time (synchronising CUDA around it)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.total = fn, device, 0.0

    def __call__(self, *args, **kwargs):
        _sync(self.device)
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        _sync(self.device)
        self.total += time.perf_counter() - t
        return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """A tokenizer, its optimizer and (SSL on) the objective, with timed crops and masks."""

    def __init__(self, name: str, method: str, steps: int, device: torch.device, ssl_head: dict):
        overrides, batch = CONFIGS[name]
        cfg = load_config(None, {**overrides, "ssl.method": method, **ssl_head})
        torch.manual_seed(0)
        self.device = device
        self.model = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size)).to(device)
        self.obj = SSLObjective(cfg.ssl, self.model, cfg.loss.ssl, steps, 0) if method != "none" else None
        params = list(self.model.parameters()) + (list(self.obj.heads.parameters()) if self.obj else [])
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.x = torch.rand(batch, 3, cfg.data.image_size, cfg.data.image_size, device=device) * 2 - 1
        if self.obj is not None:
            self.obj.crops = self.crops = Timed(self.obj.crops, device)
            self.obj.masks = self.masks = Timed(self.obj.masks, device)
        self.times: list[float] = []

    def step(self, step: int) -> None:
        _sync(self.device)
        t = time.perf_counter()
        recon, _ = self.model(self.x)
        loss = (recon - self.x).abs().mean()
        if self.obj is not None:
            loss = loss + self.obj.loss(self.model, self.x, None, step)[0]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.obj is not None:
            self.obj.after_step(self.model, step)
        _sync(self.device)
        self.times.append(time.perf_counter() - t)

    def reset(self) -> None:
        self.times = []
        if self.obj is not None:
            self.crops.total = self.masks.total = 0.0


def run(name: str, method: str, steps: int, device: torch.device, ssl_head: dict) -> dict:
    """Alternate SSL-off and SSL-on steps, so that load on a shared machine hits both alike."""
    off, on = Setup(name, "none", steps, device, ssl_head), Setup(name, method, steps, device, ssl_head)
    for step in range(2):  # warm-up
        off.step(step)
        on.step(step)
    off.reset()
    on.reset()
    for step in range(2, steps + 2):
        off.step(step)
        on.step(step)
    on_s, off_s = sum(on.times) / steps, sum(off.times) / steps
    return {"config": name, "method": method, "off_s": off_s, "on_s": on_s, "ratio": on_s / off_s,
            "augment_share": on.crops.total / steps / on_s, "masking_share": on.masks.total / steps / on_s}


def mask_times(batch: int = 128, grids=(16, 32, 64), repeats: int = 3) -> None:
    """Block-mask drawing alone at token grids of small patches (256 px: p=16/8/4)."""
    for T in grids:
        t = time.perf_counter()
        for r in range(repeats):
            block_masks(batch, T, step_generator(0, r))
        print(f"masks  {batch} x {T}x{T} grid: {(time.perf_counter() - t) / repeats * 1e3:7.1f} ms")


LOOP = {"data.image_size": 32, "data.batch_size": 32, "data.train_size": 1024, "model.patch_size": 4,
        "model.split_depth": 2, "model.latent_size": 4, "model.latent_channels": 8, "model.class_token": True,
        "loss.perceptual": 0.0, "ssl.method": "ibot", "ssl.out_dim": 256, "ssl.hidden_dim": 256,
        "ssl.bottleneck_dim": 64, "ssl.local_crops": 2, "data.hflip": True, "train.device": "cpu"}


def loop_child(steps: int) -> None:
    """In a fresh process whose ``core`` is the tree under test: CPU and wall seconds per loop step."""
    from core.config import load_config
    from core.seed import seed_everything
    from core.train import build_trainer
    from core.trainer.distributed import DistInfo

    cfg = load_config(None, {**LOOP, "train.steps": steps + 2, "train.log_every": steps + 2,
                             "train.ckpt_every": steps + 2})
    seed_everything(0)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer, _, _ = build_trainer(cfg, run_dir, DistInfo())
        trainer.run(stop_at_step=2)  # warm-up
        cpu, wall = time.thread_time(), time.perf_counter()
        trainer.run()
        print(json.dumps({"cpu_s": (time.thread_time() - cpu) / steps, "wall_s": (time.perf_counter() - wall) / steps}))


def loop_before_after(rev: str, steps: int, rounds: int) -> None:
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev, "core"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        trees, runs = {"before": old, "after": str(root)}, {"before": [], "after": []}
        for _ in range(rounds):  # alternate, so load on a shared machine hits both alike
            for name, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": tree}
                out = subprocess.run([sys.executable, __file__, "--loop-child", "--steps", str(steps)], env=env,
                                     cwd=tree, check=True, capture_output=True, text=True)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {n: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in ("cpu_s", "wall_s")} for n, rs in runs.items()}
    print(f"real loop, joint iBOT, batch {LOOP['data.batch_size']} at {LOOP['data.image_size']} px, "
          f"threads={os.environ.get('OMP_NUM_THREADS', 'all')}, median of {rounds}: before = {rev}")
    for n, m in med.items():
        print(f"  {n:6s} main-thread CPU {m['cpu_s'] * 1e3:8.1f} ms/step   wall {m['wall_s'] * 1e3:8.1f} ms/step")
    print(f"  before/after: CPU {med['before']['cpu_s'] / med['after']['cpu_s']:.2f}x  "
          f"wall {med['before']['wall_s'] / med['after']['wall_s']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="ibot,dino,dinov2")
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--head", default="default", choices=["default", "small"],
                        help="SSL head size: config defaults (out 1024, hidden 2048) or small (256/256)")
    parser.add_argument("--masks-only", action="store_true", help="only time block masks on large grids")
    parser.add_argument("--loop-before", default=None, metavar="REV",
                        help="time the real loop of this tree against git revision REV (CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="--loop-before: alternating runs per tree")
    parser.add_argument("--loop-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop_child:
        loop_child(args.steps)
        return
    if args.loop_before:
        loop_before_after(args.loop_before, args.steps, args.rounds)
        return
    device = torch.device(args.device)
    if args.masks_only:
        mask_times()
        return
    head = {} if args.head == "default" else {"ssl.out_dim": 256, "ssl.hidden_dim": 256, "ssl.bottleneck_dim": 64}
    print(f"device={device} threads={torch.get_num_threads()} steps={args.steps} head={args.head}")
    for name in args.configs.split(","):
        for method in args.methods.split(","):
            r = run(name, method, args.steps, device, head)
            print(f"{name:6s} {method:7s} off {r['off_s'] * 1e3:8.1f} ms  on {r['on_s'] * 1e3:8.1f} ms  "
                  f"ratio {r['ratio']:5.2f}  augment {100 * r['augment_share']:5.1f}%  "
                  f"masking {100 * r['masking_share']:5.1f}%")
    mask_times()


if __name__ == "__main__":
    main()
