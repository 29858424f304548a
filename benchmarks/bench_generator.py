"""Generator training-step and sampling time on this machine (run by hand; numbers go to reports).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generator.py --sizes micro mini S --latent 16 4

One step = flow-matching loss, backward, grad clip, AdamW, EMA update (the generator's
step in core.generator.train).  Sampling = one Euler step (one DiT forward) on a batch.
"""
from __future__ import annotations

import argparse
import time

import torch

from core.generator.flow import flow_loss, shift_for
from core.trainer.ema import EMA
from core.models.dit import DiT


def bench_size(size: str, c: int, h: int, batch: int, steps: int, warmup: int, device: str) -> dict:
    torch.manual_seed(0)
    model = DiT(size, latent_channels=c, latent_size=h, num_classes=10).to(device)
    ema = EMA(model, 0.9995)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)
    x = torch.randn(batch, c, h, h, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    shift = shift_for((c, h, h))

    def step():
        loss = flow_loss(model, x, y, shift=shift, class_dropout=0.1, null_class=model.null_class)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)

    def timed(fn, n):
        for _ in range(warmup):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    train_s = timed(step, steps)
    t = torch.full((batch,), 0.5, device=device)
    with torch.no_grad():
        fwd_s = timed(lambda: ema.shadow(x, t, y), steps)
    return {"size": size, "params_M": model.num_params() / 1e6, "train_ms": 1e3 * train_s,
            "train_latents_per_s": batch / train_s, "forward_ms": 1e3 * fwd_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["micro", "mini"])
    parser.add_argument("--latent", nargs=2, type=int, default=[16, 4], metavar=("C", "H"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    c, h = args.latent
    print(f"device={args.device} threads={torch.get_num_threads()} latent=({c},{h},{h}) batch={args.batch}")
    print(f"{'size':>6s} {'params(M)':>10s} {'train ms/step':>14s} {'latents/s':>10s} {'fwd ms':>8s}")
    for size in args.sizes:
        r = bench_size(size, c, h, args.batch, args.steps, args.warmup, args.device)
        print(f"{r['size']:>6s} {r['params_M']:10.2f} {r['train_ms']:14.1f} {r['train_latents_per_s']:10.0f} {r['forward_ms']:8.1f}")


if __name__ == "__main__":
    main()
