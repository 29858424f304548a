"""Training-step speed of our vanilla TC-AE encoder vs timm's VisionTransformer.

One step = forward (patch embed + position embedding + blocks + final norm, i.e. the
encoder path to tokens) + backward of a token loss + AdamW step, at the same width, depth,
heads, patch and image size (timm: no class token, no head). Ours and timm's run in
alternating rounds in one process so that background load hits both alike; the per-step
time is the median over rounds. Achieved FLOP/s use the counted forward FLOPs of the timed
path (core.eval.flops, 2·MACs) × 3 for forward + backward, as a fraction of a square
matmul's FLOP/s measured in the same run and precision.

    python benchmarks/bench_tokenizer_step.py --size micro --image-size 64 --patch-size 4 --batch 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.eval.flops import count_flops, tokenizer_flops  # noqa: E402
from core.models.tokenizer import VIT_SIZES, TokenizerArgs, build_tokenizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_s(n: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def make_step(forward, params, x, precision: str, device: torch.device):
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.04)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            tokens = forward(x)  # (B, N, d)
        loss = tokens.float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_steps(step, n: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="micro", choices=sorted(VIT_SIZES))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--matmul-size", type=int, default=None, help="default 1024 on CPU, 8192 on CUDA")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    size = VIT_SIZES[args.size]
    grid = args.image_size // args.patch_size
    torch.manual_seed(0)
    tokenizer = build_tokenizer(TokenizerArgs(args.image_size, args.patch_size, args.size, args.size, None,
                                              "conv", grid, 16))
    encoder_flops = tokenizer_flops(tokenizer, args.image_size)["encoder"]  # per image, incl. bottleneck
    ours = tokenizer.encoder.to(device)
    timm_vit = VisionTransformer(
        img_size=args.image_size, patch_size=args.patch_size, embed_dim=size.width, depth=size.depth,
        num_heads=size.heads, mlp_ratio=4.0, qkv_bias=True, class_token=False, global_pool="avg",
        fc_norm=False, num_classes=0,  # fc_norm=False: the final norm stays inside forward_features
    ).to(device)
    # the bottleneck and mask token are not on the timed path, so they stay out of the optimizer
    our_params = [p for n, p in ours.named_parameters() if not n.startswith("bottleneck") and n != "mask_token"]
    assert sum(p.numel() for p in our_params) == sum(p.numel() for p in timm_vit.parameters())
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)

    def our_forward(inp):
        grid_tokens = ours.tokens(inp)[1]  # (B, T, T, d)
        return grid_tokens.flatten(1, 2)

    with torch.no_grad():
        step_flops = 3 * count_flops(our_forward, x)  # forward + backward ≈ 3 × forward
        timm_flops = 3 * count_flops(timm_vit.forward_features, x)
    assert step_flops == timm_flops, (step_flops, timm_flops)

    matmul_n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    results = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "size": args.size, "image_size": args.image_size, "patch_size": args.patch_size,
        "batch": args.batch, "tokens": grid * grid, "step_gflops": step_flops / 1e9,
        "tokenizer_flops_encoder_per_image": encoder_flops, "load_average": os.getloadavg(), "runs": {},
    }
    for precision in args.precisions.split(","):
        steps = {
            "ours": make_step(our_forward, our_params, x, precision, device),
            "timm": make_step(timm_vit.forward_features, timm_vit.parameters(), x, precision, device),
        }
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        times = {name: [] for name in steps}
        for r in range(args.rounds):  # alternate (and swap order) so background load hits both alike
            for name in (("ours", "timm") if r % 2 == 0 else ("timm", "ours")):
                times[name].append(time_steps(steps[name], args.steps, device))
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = matmul_flops_per_s(matmul_n, dtype, device, reps=5)
        ours_s, timm_s = statistics.median(times["ours"]), statistics.median(times["timm"])
        results["runs"][precision] = {
            "ours_step_ms": 1e3 * ours_s, "timm_step_ms": 1e3 * timm_s, "ratio_ours_timm": ours_s / timm_s,
            "ours_tflops": step_flops / ours_s / 1e12, "timm_tflops": step_flops / timm_s / 1e12,
            "matmul_tflops": peak / 1e12, "matmul_n": matmul_n,
            "ours_fraction_of_matmul": step_flops / ours_s / peak,
            "timm_fraction_of_matmul": step_flops / timm_s / peak,
        }
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
