"""GPU smoke benchmark: is the training code fast on one GPU, and does every GPU path run?

    python benchmarks/gpu_smoke.py [--out gpu_smoke.json]            # one CUDA GPU, <= 5 min
    python benchmarks/gpu_smoke.py --device cpu --tiny --out x.json   # a minute on a CPU (the test)

Measures, in one process (numbers in benchmarks/README.md):

1. a bf16 matmul (8192², CUDA) — the achievable FLOP/s that MFU is stated against;
2. the TC-AE S/16 tokenizer at 256 px on synthetic data, bf16 autocast, fixed batch on the
   device (:func:`core.trainer.loop.train_step`): the L1 step eager and compiled
   (:func:`core.trainer.compile.compile_model`, what ``train.compile: true`` does), and the
   paper's joint step (L1 + perceptual + iBOT) eager;
3. the real loop (:class:`core.trainer.loop.Trainer` with its loader: uint8 batches, device
   augmentations) on the joint objective: s/step, its ratio to the fixed-batch joint step,
   the main thread's CPU seconds per step and the GPU utilisation while it runs;
4. one DiT-XL flow-matching step (batch 32 = 256 over 8 GPUs) on (128, 8, 8) latents, and
   the latent sampler (:func:`core.generator.flow.sample`, Euler, bf16 autocast): images/s;
5. Inception-v3 (torch-fidelity) feature throughput — with random weights when
   ``--inception-weights`` is not given (the JSON says so; speed only, never a metric).

``--tiny`` shrinks every model (micro tokenizer at 32 px, micro DiT, a few images) so the
same code runs in seconds; the test runs it with ``--device cpu --tiny``.

JSON schema (``--out``)
-----------------------
``device``, ``torch``, ``tiny``, ``total_s``; ``matmul`` {n, dtype, tflops} (the MFU peak);
``stages``: a list, one row per measured training/sampling stage —

    stage            "tokenizer_l1" | "tokenizer_l1_compiled" | "tokenizer_joint" |
                     "tokenizer_joint_loop" | "generator" | "generator_sampling_bf16"
    step_s           median seconds per step (sampling: per batch of ``batch`` images)
    flops_per_step   FLOPs of one step counted by torch.utils.flop_counter (forward +
                     backward; sampling: every velocity evaluation of one batch)
    mfu              flops_per_step / step_s / matmul peak (null without a count)
    batch, img_per_s images per step and per second
    compiled         whether torch.compile ran (``compile_backend``, ``first_step_s`` with it)
    peak_mem_gib     CUDA peak memory (null on the CPU)

``tokenizer_joint_loop`` adds ``fixed_step_s`` (the ``tokenizer_joint`` step), ``ratio``
(loop / fixed step: the loop's overhead, goal ≤ 1.1), ``cpu_s_per_step`` (main thread CPU
time), ``gpu_util`` (mean % over the run, null where it cannot be read);
``generator_sampling_bf16`` adds ``sample_steps``.  ``compiled_speedup`` = eager / compiled
L1 step.  ``inception`` {weights, batch, image_size, img_per_s}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.config import GeneratorConfig, load_config  # noqa: E402
from core.data import build_dataset  # noqa: E402
from core.eval.fid import FidelityFeatures, write_random_inception_weights  # noqa: E402
from core.generator.flow import flow_loss, guided, sample  # noqa: E402
from core.generator.train import build_generator  # noqa: E402
from core.io import write_json_atomic  # noqa: E402
from core.models.tokenizer import build_tokenizer, tokenizer_args  # noqa: E402
from core.seed import seed_everything  # noqa: E402
from core.trainer.build import build_objectives  # noqa: E402
from core.trainer.distributed import DistInfo  # noqa: E402
from core.trainer.compile import compile_model
from core.trainer.loop import Trainer, train_step  # noqa: E402
from core.trainer.optim import build_optimizer  # noqa: E402

# (tokenizer overrides, batch, DiT size, DiT batch, latent shape, Inception batch)
FULL = ({"data.image_size": 256, "model.encoder_size": "S", "model.decoder_size": "S", "model.patch_size": 16,
         "model.split_depth": 12, "model.latent_size": 8, "model.latent_channels": 128}, 64, "XL", 32, (128, 8, 8), 200)
TINY = ({"data.image_size": 32, "model.patch_size": 8, "model.latent_size": 4, "model.latent_channels": 8},
        4, "micro", 4, (8, 4, 4), 2)
# the paper's joint objective (s16_joint.yaml): L1 + perceptual + iBOT
JOINT = {"model.class_token": True, "ssl.method": "ibot", "loss.ssl": 0.1, "loss.perceptual": 1.0}
JOINT_TINY = {**JOINT, "ssl.out_dim": 64, "ssl.hidden_dim": 64, "ssl.bottleneck_dim": 32, "ssl.local_crops": 2,
              "model.patch_size": 4, "model.split_depth": 2}


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


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (forward and backward matmuls/convs), counted eagerly."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _row(stage: str, batch: int, times: list[float], flops: int | None, peak: float, device, **extra) -> dict:
    sec = statistics.median(times)
    return {"stage": stage, "step_s": sec, "flops_per_step": flops, "mfu": flops / sec / peak if flops else None,
            "batch": batch, "img_per_s": batch / sec, "peak_mem_gib": _peak_gib(device), **extra}


def _setup(device: torch.device, overrides: dict, batch: int):
    cfg = load_config(None, {**overrides, "data.batch_size": batch, "train.device": device.type,
                             "train.precision": "bf16"})
    seed_everything(0)
    model = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size)).to(device)
    return cfg, model, build_objectives(cfg, model, device)


def tokenizer_step(device: torch.device, overrides: dict, batch: int, compiled: bool, backend: str,
                   warmup: int, steps: int, peak: float, stage: str) -> dict:
    """The real trainer step of the tokenizer on a fixed batch on the device, bf16 autocast."""
    cfg, model, objectives = _setup(device, overrides, batch)
    modules = {"model": model, **{k: m for o in objectives for k, m in o.modules().items()}}
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = build_optimizer(modules, cfg.optim, fused=device.type == "cuda")
    s = cfg.data.image_size
    images = torch.rand(batch, 3, s, s, device=device) * 2 - 1  # synthetic data
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    info = DistInfo(device=device)
    step = lambda: train_step(model, objectives, opt, params, images, labels, 0, 1e-4, 3.0,  # noqa: E731
                              bf16=True, dist_info=info)
    flops = count_flops(step)
    parts = compile_model(model, backend=backend) if compiled else []
    _reset_peak(device)
    t_first = time.perf_counter()
    step()  # includes compilation when compiled
    _sync(device)
    first = time.perf_counter() - t_first
    return _row(stage, batch, timed(step, device, warmup, steps), flops, peak, device, compiled=compiled,
                compiled_modules=parts, compile_backend=backend if compiled else None, first_step_s=round(first, 3))


def gpu_utilization(device: torch.device) -> float | None:
    """GPU busy % now (torch.cuda.utilization via NVML, else nvidia-smi); None on the CPU or when unreadable."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 — no pynvml: try the command line tool
        if shutil.which("nvidia-smi") is None:
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        return float(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def joint_loop(device: torch.device, overrides: dict, batch: int, warmup: int, steps: int, fixed: dict,
               peak: float, workers: int) -> dict:
    """The real loop (Trainer + loader + device augmentations) on the joint objective, synthetic data."""
    over = {**overrides, "data.name": "synthetic", "data.train_size": batch * (warmup + steps + 2),
            "data.num_workers": workers, "train.steps": warmup + steps, "train.log_every": warmup + steps,
            "train.ckpt_every": warmup + steps}
    cfg, model, objectives = _setup(device, over, batch)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, model, objectives, build_dataset(cfg.data, "train"), DistInfo(device=device))
        trainer.run(stop_at_step=warmup)
        samples, done = [], threading.Event()

        def sample_util():
            while not done.wait(0.2):
                u = gpu_utilization(device)
                if u is not None:
                    samples.append(u)

        watcher = threading.Thread(target=sample_util, daemon=True)
        watcher.start()
        _sync(device)
        t0, cpu0, train0 = time.perf_counter(), time.thread_time(), trainer.train_time_s
        trainer.run()  # the last step logs (one sync) and checkpoints (not counted in train_time_s)
        cpu = time.thread_time() - cpu0
        done.set()
        watcher.join()
        per_step = (trainer.train_time_s - train0) / steps
    return _row("tokenizer_joint_loop", batch, [per_step], fixed["flops_per_step"], peak, device, compiled=False,
                fixed_step_s=fixed["step_s"], ratio=per_step / fixed["step_s"], cpu_s_per_step=cpu / steps,
                gpu_util=statistics.mean(samples) if samples else None, num_workers=workers)


def dit_step(device: torch.device, size: str, batch: int, latent_shape: tuple[int, int, int], steps: int,
             peak: float) -> tuple[dict, torch.nn.Module]:
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

    flops = count_flops(step)
    _reset_peak(device)
    times = timed(step, device, warmup=1, steps=steps)
    return _row("generator", batch, times, flops, peak, device, compiled=False, size=size,
                params=sum(p.numel() for p in model.parameters()), latent_shape=list(latent_shape)), model


def sampling_throughput(device: torch.device, model: torch.nn.Module, batch: int, latent_shape, sample_steps: int,
                        reps: int, peak: float) -> dict:
    """Images/s of the latent sampler (Euler, CFG off) under bf16 autocast, one process."""
    model.eval()
    y = torch.randint(0, 1000, (batch,), device=device)
    noise = torch.randn(batch, *latent_shape, device=device)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return sample(guided(model, y), noise, sample_steps, "euler", 1.0)

    flops = count_flops(run)
    times = timed(run, device, warmup=1, steps=reps)
    return _row("generator_sampling_bf16", batch, times, flops, peak, device, compiled=False,
                sample_steps=sample_steps)


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
        compile_backend: str | None = None, workers: int | None = None) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available (use --device cpu --tiny)")
    overrides, batch, dit_size, dit_batch, latent_shape, inc_batch = TINY if tiny else FULL
    joint = {**overrides, **(JOINT_TINY if tiny else JOINT)}
    backend = compile_backend or ("inductor" if dev.type == "cuda" else "aot_eager")
    warmup, steps = (1, 2) if tiny else (3, 10)
    t0 = time.perf_counter()
    peak = matmul_flops(dev, 256 if tiny else 8192, 3 if tiny else 20)
    l1 = {**overrides, "loss.perceptual": 0.0}
    eager = tokenizer_step(dev, l1, batch, False, backend, warmup, steps, peak, "tokenizer_l1")
    compiled = tokenizer_step(dev, l1, batch, True, backend, warmup, steps, peak, "tokenizer_l1_compiled")
    fixed = tokenizer_step(dev, joint, batch, False, backend, warmup, steps, peak, "tokenizer_joint")
    loop = joint_loop(dev, joint, batch, warmup, steps, fixed, peak, 0 if tiny else (workers or 8))
    gen, dit = dit_step(dev, dit_size, dit_batch, latent_shape, 1 if tiny else 3, peak)
    sampling = sampling_throughput(dev, dit, 8 if tiny else 256, latent_shape, 2 if tiny else 50, 1 if tiny else 3, peak)
    out = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "tiny": tiny,
        "matmul": {"n": 256 if tiny else 8192, "dtype": "bf16" if dev.type == "cuda" else "fp32",
                   "tflops": peak / 1e12},
        "tokenizer_config": overrides, "joint_config": joint, "precision": "bf16 autocast",
        "stages": [eager, compiled, fixed, loop, gen, sampling],
        "compiled_speedup": eager["step_s"] / compiled["step_s"],
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
    parser.add_argument("--workers", type=int, default=None, help="loader workers of the real loop (default 8)")
    parser.add_argument("--out", default="gpu_smoke.json", help="JSON output path")
    args = parser.parse_args(argv)
    result = run(args.device, args.tiny, args.inception_weights, args.compile_backend, args.workers)
    write_json_atomic(args.out, result)
    brief = {r["stage"]: {k: r[k] for k in ("step_s", "img_per_s", "mfu", "ratio", "gpu_util") if k in r}
             for r in result["stages"]}
    print(json.dumps({**brief, "compiled_speedup": result["compiled_speedup"], "total_s": result["total_s"]},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
