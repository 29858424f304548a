"""gFID sampling throughput: one process vs W data-parallel ranks, fp32 vs bf16 autocast (run by hand).

    .venv/bin/python benchmarks/bench_gfid.py --world 2 --samples 256          # CPU, gloo, 1 thread a rank
    .venv/bin/python benchmarks/bench_gfid.py --device cuda --bf16 --samples 4096 --size S --latent 32 8

Times :func:`core.generator.gfid.generator_fidelity` (sample with a random DiT, decode with a
random tokenizer, featurise with the embedded network, reduce statistics, gather IS logits)
and reports samples per second; the ratio to the single process is the reference.  On a
machine busier than its cores, wall time measures the contention: the busiest rank's CPU
seconds against the single process's say what share of the work a rank does.  With
``--device cuda`` it runs one process only and compares fp32 with bf16 autocast.
"""
from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.multiprocessing as mp


def _setup(args, device):
    from core.config import GeneratorConfig
    from core.generator.latents import LatentStats
    from core.models.dit import DiT
    from core.models.tokenizer import TokenizerArgs, build_tokenizer

    c, h = args.latent
    torch.manual_seed(0)
    tok = build_tokenizer(TokenizerArgs(image_size=args.image_size, patch_size=args.image_size // h, latent_size=h,
                                        latent_channels=c)).to(device).eval()
    dit = DiT(args.size, latent_channels=c, latent_size=h, num_classes=10).to(device).eval()
    return tok, dit, LatentStats(torch.zeros(c), torch.ones(c)), GeneratorConfig(sample_steps=args.sample_steps)


def _run(args, info, bf16: bool) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one gFID evaluation."""
    from core.eval.fid import FidelityFeatures
    from core.generator.gfid import generator_fidelity
    from core.trainer import distributed as D

    tok, dit, stats, gen = _setup(args, info.device)
    features = FidelityFeatures("embedded", isc=True, device=info.device.type)
    reference = {"mu": torch.zeros(128).numpy(), "sigma": torch.eye(128).double().numpy()}
    D.barrier(info)
    t0, c0 = time.perf_counter(), time.process_time()
    generator_fidelity(dit, tok, stats, reference, features, n=args.samples, num_classes=10,
                       latent_shape=tuple(args.latent[:1]) + (args.latent[1],) * 2, gen=gen, shift=1.0, seed=0,
                       batch_size=args.batch, info=info, bf16=bf16)
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def _worker(rank: int, world: int, port: int, args, out) -> None:
    from core.trainer import distributed as D

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    try:
        out.put(_run(args, info, False))
    finally:
        D.cleanup(info)


def main() -> None:
    from core.trainer.distributed import DistInfo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--world", type=int, default=2, help="ranks (CPU, gloo)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", default="micro", help="DiT size")
    p.add_argument("--latent", type=int, nargs=2, default=[16, 4], metavar=("C", "H"))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="CUDA: also time bf16 autocast")
    args = p.parse_args()
    if args.device == "cuda":
        info = DistInfo(device=torch.device("cuda"))
        _run(args, info, False)  # warm-up (kernels, allocator)
        for bf16 in ([False, True] if args.bf16 else [False]):
            s, _ = _run(args, info, bf16)
            print(f"cuda {'bf16' if bf16 else 'fp32'}: {args.samples / s:.1f} samples/s ({s:.2f} s)")
        return
    torch.set_num_threads(1)
    one, one_cpu = _run(args, DistInfo(), False)
    print(f"1 process (1 thread): {args.samples / one:.1f} samples/s ({one:.2f} s wall, {one_cpu:.2f} s CPU)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args.world, port, args, out), nprocs=args.world, join=True, start_method="spawn")
    runs = [out.get() for _ in range(args.world)]
    many, cpu = max(w for w, _ in runs), max(c for _, c in runs)
    # CPU seconds of the busiest rank: the share of the work a rank does, whatever the machine's load
    print(f"{args.world} gloo ranks (1 thread each): {args.samples / many:.1f} samples/s ({many:.2f} s wall, "
          f"{one / many:.2f}x one process; busiest rank {cpu:.2f} s CPU = {cpu / one_cpu:.2f} of one process's)")


if __name__ == "__main__":
    main()
