"""GPU smoke benchmark: is the training code fast on one GPU, and does every GPU path run?

    python benchmarks/gpu_smoke.py [--out gpu_smoke.json]            # one CUDA GPU, <= 5 min
    python benchmarks/gpu_smoke.py --device cpu --tiny --out x.json   # seconds on a CPU (the test)

Measures, in one process (numbers in benchmarks/README.md):

1. a bf16 matmul (8192², CUDA) — the achievable FLOP/s that MFU is stated against;
2. the TC-AE S/16 tokenizer at 256 px on synthetic data, one real trainer step
   (:func:`core.trainer.loop.train_step`: reconstruction objective, AdamW fused on CUDA),
   bf16 autocast, eager and with the transformer blocks compiled
   (:func:`core.trainer.loop.compile_blocks`): step time (median), img/s, MFU = counted
   FLOPs (3 × forward, 2·MACs, :func:`core.eval.flops.tokenizer_flops`) / step time /
   matmul FLOP/s, peak memory;
3. one DiT-XL flow-matching step (batch 32 = 256 over 8 GPUs) on (128, 8, 8) latents;
4. Inception-v3 (torch-fidelity) feature throughput — with random weights when
   ``--inception-weights`` is not given (the JSON says so; speed only, never a metric).

``--tiny`` shrinks every model (micro tokenizer at 32 px, micro DiT, a few images) so the
same code runs in seconds; the test runs it with ``--device cpu --tiny``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.config import GeneratorConfig, load_config  # noqa: E402
from core.eval.fid import FidelityFeatures, write_random_inception_weights  # noqa: E402
from core.eval.flops import tokenizer_flops  # noqa: E402
from core.generator.flow import flow_loss  # noqa: E402
from core.generator.train import build_generator  # noqa: E402
from core.io import write_json_atomic  # noqa: E402
from core.models.tokenizer import build_tokenizer, tokenizer_args  # noqa: E402
from core.trainer.distributed import DistInfo  # noqa: E402
from core.trainer.loop import compile_blocks, train_step  # noqa: E402
from core.trainer.objective import ReconstructionObjective  # noqa: E402
from core.trainer.optim import build_optimizer  # noqa: E402

# (tokenizer overrides, batch, DiT size, DiT batch, latent shape, Inception batch)
FULL = ({"data.image_size": 256, "model.encoder_size": "S", "model.decoder_size": "S", "model.patch_size": 16,
         "model.split_depth": 12, "model.latent_size": 8, "model.latent_channels": 128}, 64, "XL", 32, (128, 8, 8), 200)
TINY = ({"data.image_size": 32, "model.patch_size": 8, "model.latent_size": 4, "model.latent_channels": 8},
        4, "micro", 4, (8, 4, 4), 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (device synced)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def matmul_flops(device: torch.device, n: int, reps: int) -> float:
    """Achieved FLOP/s of an n×n bf16 matmul (CUDA) or fp32 (CPU, where bf16 is not the fast path)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = timed(lambda: a @ b, device, warmup=2, steps=reps)
    return 2 * n**3 / statistics.median(times)


def tokenizer_step(device: torch.device, overrides: dict, batch: int, compiled: bool, backend: str,
                   warmup: int, steps: int, peak: float) -> dict:
    """The real trainer step of the tokenizer (reconstruction objective), bf16 autocast."""
    cfg = load_config(None, {**overrides, "loss.perceptual": 0.0, "train.device": device.type})
    torch.manual_seed(0)
    model = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size)).to(device)
    objectives = [ReconstructionObjective(cfg.loss, device)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer({"model": model}, cfg.optim, fused=device.type == "cuda")
    s = cfg.data.image_size
    flops = 3 * tokenizer_flops(model, s)["total"] * batch  # forward + backward ≈ 3 × forward (eager count)
    blocks = compile_blocks(model, backend=backend) if compiled else 0
    images = torch.rand(batch, 3, s, s, device=device) * 2 - 1  # synthetic data
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    info = DistInfo(device=device)
    step = lambda: train_step(model, objectives, opt, params, images, labels, 0, 1e-4, 3.0,  # noqa: E731
                              bf16=True, dist_info=info)
    _reset_peak(device)
    t_first = time.perf_counter()
    step()  # includes compilation when compiled
    _sync(device)
    first = time.perf_counter() - t_first
    times = timed(step, device, warmup, steps)
    sec = statistics.median(times)
    return {"compiled": compiled, "compile_backend": backend if compiled else None, "compiled_blocks": blocks,
            "batch": batch, "first_step_s": round(first, 3), "step_s": sec, "img_per_s": batch / sec,
            "step_flops": flops, "achieved_tflops": flops / sec / 1e12, "mfu": flops / sec / peak,
            "peak_mem_gib": _peak_gib(device)}


def dit_step(device: torch.device, size: str, batch: int, latent_shape: tuple[int, int, int], steps: int) -> dict:
    """One flow-matching DiT training step (bf16 autocast, fused AdamW on CUDA), median of ``steps``."""
    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(size=size), latent_shape, num_classes=1000).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda" or None)
    x = torch.randn(batch, *latent_shape, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = flow_loss(model, x, y, class_dropout=0.1, null_class=model.null_class, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _reset_peak(device)
    times = timed(step, device, warmup=1, steps=steps)
    return {"size": size, "params": sum(p.numel() for p in model.parameters()), "batch": batch,
            "latent_shape": list(latent_shape), "step_s": statistics.median(times),
            "peak_mem_gib": _peak_gib(device)}


def inception_throughput(device: torch.device, weights: str | None, batch: int, reps: int, size: int) -> dict:
    """Images/s of torch-fidelity's Inception-v3 on uint8 images (FID '2048' + IS logits)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = weights or str(write_random_inception_weights(Path(tmp) / "random_inception.pth"))
        feats = FidelityFeatures("inception", path, isc=True, device=device.type)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    times = timed(lambda: feats.features(images), device, warmup=1 if reps > 1 else 0, steps=reps)
    return {"weights": "file" if weights else "random (no --inception-weights; speed only)",
            "weights_path": weights, "batch": batch, "image_size": size,
            "img_per_s": batch / statistics.median(times)}


def run(device: str = "cuda", tiny: bool = False, inception_weights: str | None = None,
        compile_backend: str | None = None) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available (use --device cpu --tiny)")
    overrides, batch, dit_size, dit_batch, latent_shape, inc_batch = TINY if tiny else FULL
    backend = compile_backend or ("inductor" if dev.type == "cuda" else "aot_eager")
    warmup, steps = (1, 2) if tiny else (3, 10)
    t0 = time.perf_counter()
    peak = matmul_flops(dev, 256 if tiny else 8192, 3 if tiny else 20)
    eager = tokenizer_step(dev, overrides, batch, False, backend, warmup, steps, peak)
    compiled = tokenizer_step(dev, overrides, batch, True, backend, warmup, steps, peak)
    out = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "tiny": tiny,
        "matmul": {"n": 256 if tiny else 8192, "dtype": "bf16" if dev.type == "cuda" else "fp32",
                   "tflops": peak / 1e12},
        "tokenizer": {"config": overrides, "precision": "bf16 autocast", "objective": "l1 (perceptual off)",
                      "eager": eager, "compiled": compiled, "compiled_speedup": eager["step_s"] / compiled["step_s"]},
        "dit": dit_step(dev, dit_size, dit_batch, latent_shape, 1 if tiny else 3),
        "inception": inception_throughput(dev, inception_weights, inc_batch, 1 if tiny else 5, 32 if tiny else 256),
    }
    out["total_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU test of every code path)")
    parser.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05 weights")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor on CUDA, aot_eager on the CPU)")
    parser.add_argument("--out", default="gpu_smoke.json", help="JSON output path")
    args = parser.parse_args(argv)
    result = run(args.device, args.tiny, args.inception_weights, args.compile_backend)
    write_json_atomic(args.out, result)
    tok = result["tokenizer"]
    print(json.dumps({"eager_img_per_s": tok["eager"]["img_per_s"], "compiled_img_per_s": tok["compiled"]["img_per_s"],
                      "mfu_eager": tok["eager"]["mfu"], "mfu_compiled": tok["compiled"]["mfu"],
                      "dit_step_s": result["dit"]["step_s"], "inception_img_per_s": result["inception"]["img_per_s"],
                      "total_s": result["total_s"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
