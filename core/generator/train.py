"""Generator training loop: flow matching on normalised latents, EMA, exact resume.

Recipe (RAE stage 2 / LightningDiT): AdamW(lr = generator.lr, betas (0.9, 0.95), wd 0),
constant learning rate, grad-norm clip 1.0, EMA of the weights with decay generator.ema
(after a warm-up, :func:`ema_decay`), class dropout for CFG.  Batches come from
:class:`core.data.DeterministicBatchSampler` (a pure function of (seed, step)) and the flow
noise from one ``torch.Generator`` whose state is checkpointed, so a resumed run continues
the exact random stream.

After each step in ``generator.eval_at`` and after the last step, ``evaluate(ema_model, step)``
returns metric rows; they are saved in the checkpoint written right after, so an evaluation
is never repeated or lost on resume.

Data parallel (``dist_info`` with W ranks): ``generator.batch_size`` is the global batch,
rank r trains on rows r, r + W, ... of it; the flow noise is drawn for the global batch and
sliced (:func:`core.generator.flow.flow_loss` ``shard``), gradients are averaged while
backward runs (:class:`core.trainer.distributed.GradientSync`), so W ranks take the steps
one process takes with the same global batch, and every rank holds the same weights,
optimizer state and noise generator state — rank 0's checkpoint resumes all of them
exactly.  Only rank 0 writes; ``evaluate`` is called on every rank (it may be collective).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from core.data.sampler import DeterministicBatchSampler
from core.generator.flow import flow_loss, shift_for
from core.models.dit import DiT
from core.trainer import distributed as D
from core.trainer.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from core.trainer.ema import EMA
from core.trainer.loop import compile_blocks

if TYPE_CHECKING:
    from core.config import GeneratorConfig

EvaluateFn = Callable[[DiT, int], list[dict]]


def build_generator(gen_cfg: "GeneratorConfig", latent_shape: tuple[int, int, int], num_classes: int) -> DiT:
    """DiT of size ``generator.size`` for latents (c, h, h); patch 1 (latent grids are small)."""
    c, h, w = latent_shape
    if h != w:
        raise ValueError(f"generator needs square latents, got {latent_shape}")
    return DiT(gen_cfg.size, latent_channels=c, latent_size=h, num_classes=num_classes)


def resolve_shift(gen_cfg: "GeneratorConfig", latent_shape) -> float:
    """generator.time_shift, or RAE's sqrt(prod(latent_shape) / 4096) when it is None."""
    if gen_cfg.time_shift is None:
        return shift_for(latent_shape)
    if gen_cfg.time_shift <= 0:
        raise ValueError(f"generator.time_shift={gen_cfg.time_shift} must be positive")
    return gen_cfg.time_shift


def ema_decay(target: float, step: int) -> float:
    """EMA decay at optimizer step ``step`` (0-based): min(target, (1 + step) / (10 + step)).

    The warm-up keeps short runs meaningful: with RAE's 0.9995 and no warm-up, the EMA of a
    300-step run would still be 86% initial weights; long runs reach ``target`` (~18k steps).
    """
    return min(target, (1 + step) / (10 + step))


def eval_steps(gen_cfg: "GeneratorConfig") -> list[int]:
    """Steps after which gFID/IS are measured: generator.eval_at within (0, steps], plus the last."""
    bad = [s for s in gen_cfg.eval_at if not 0 < s <= gen_cfg.steps]
    if bad:
        raise ValueError(f"generator.eval_at={gen_cfg.eval_at}: steps {bad} are outside (0, generator.steps={gen_cfg.steps}]")
    return sorted(set(gen_cfg.eval_at) | {gen_cfg.steps})


def train_generator(
    gen_cfg: "GeneratorConfig",
    latents: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    out_dir: str | Path,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    evaluate: EvaluateFn | None = None,
    ckpt_every: int = 50,
    keep_last: int = 3,
    log_every: int = 10,
    bf16: bool = False,
    stop_at_step: int | None = None,
    dist_info: D.DistInfo | None = None,
    compile: bool = False,
) -> dict:
    """Train (or resume) the DiT on normalised ``latents`` (N, c, h, h) with ``labels`` (N,).

    Writes ``out_dir/checkpoints/`` (core.trainer.checkpoint layout) and appends to
    ``out_dir/log.jsonl`` (rank 0).  ``stop_at_step`` stops early with a checkpoint (staged
    runs, tests).  ``latents``/``labels`` may be any objects indexable by an index tensor
    with ``len`` and ``shape`` (e.g. memory-mapped shards).  ``dist_info``: data
    parallelism (None: one process); ``compile``: torch.compile the DiT blocks.

    Returns
    -------
    dict with ``model`` (the raw DiT), ``ema`` (the EMA DiT, eval mode), ``step``, ``shift``,
    ``metrics`` (rows returned by ``evaluate``, in step order) and ``train_time_s``
    (optimisation only, summed over resumes, evaluation excluded).
    """
    info = dist_info or D.DistInfo(device=torch.device(device))
    out_dir = Path(out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    if len(latents) < gen_cfg.batch_size:
        raise ValueError(f"{len(latents)} latents are fewer than one batch (generator.batch_size={gen_cfg.batch_size})")
    if gen_cfg.batch_size % info.world_size:
        raise ValueError(f"generator.batch_size={gen_cfg.batch_size} (global) does not split over "
                         f"{info.world_size} ranks")
    latent_shape = tuple(latents.shape[1:])
    shift = resolve_shift(gen_cfg, latent_shape)
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on ``seed`` only
        torch.manual_seed(seed)
        model = build_generator(gen_cfg, latent_shape, num_classes).to(device)
    D.broadcast_module(model, info)  # identical already (same seed); cheap insurance
    ema = EMA(model, gen_cfg.ema)
    fused = torch.device(device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=gen_cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused or None)
    noise_gen = torch.Generator(device=device).manual_seed(seed)  # t, ε and class dropout; same on every rank
    sampler = DeterministicBatchSampler(len(latents), gen_cfg.batch_size // info.world_size, seed, info.rank,
                                        info.world_size)
    grad_sync = D.GradientSync(list(model.parameters()), info) if info.enabled else None
    if compile:
        compile_blocks(model)  # after the EMA copy, which stays eager
    step, metrics, train_time = 0, [], 0.0

    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        ckpt = load_checkpoint(last)
        if ckpt["size"] != gen_cfg.size or tuple(ckpt["latent_shape"]) != latent_shape:
            raise ValueError(
                f"{last}: checkpoint of a {ckpt['size']!r} DiT on latents {tuple(ckpt['latent_shape'])}; "
                f"the config asks for generator.size={gen_cfg.size!r} on {latent_shape}"
            )
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        noise_gen.set_state(ckpt["noise_gen"])
        set_rng_state(ckpt["rng"])
        step, metrics, train_time = ckpt["step"], ckpt["metrics"], ckpt["train_time_s"]

    def save() -> None:
        if info.is_main:
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                     "noise_gen": noise_gen.get_state(), "rng": rng_state(), "metrics": metrics,
                     "train_time_s": train_time, "size": gen_cfg.size, "latent_shape": list(latent_shape),
                     "num_classes": num_classes, "world_size": info.world_size}
            save_checkpoint(ckpt_dir, step, state, keep_last)
        D.barrier(info)

    def log(row: dict) -> None:
        if info.is_main:
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    evals = set(eval_steps(gen_cfg))
    end = gen_cfg.steps if stop_at_step is None else min(stop_at_step, gen_cfg.steps)
    model.train()
    bar = tqdm(total=gen_cfg.steps, initial=step, desc=f"generator {gen_cfg.size}", leave=False,
               disable=None if info.is_main else True)
    while step < end:
        t0 = time.perf_counter()
        idx = torch.as_tensor(sampler.batch(step))
        x, y = latents[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = flow_loss(model, x, y, shift=shift, class_dropout=gen_cfg.class_dropout,
                             null_class=model.null_class, generator=noise_gen, shard=(info.rank, info.world_size))
        opt.zero_grad(set_to_none=True)
        if grad_sync is not None:
            grad_sync.start()
        loss.backward()
        if grad_sync is not None:
            grad_sync.finish()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.decay = ema_decay(gen_cfg.ema, step)
        ema.update(model)
        step += 1
        train_time += time.perf_counter() - t0
        bar.update(1)
        if step % log_every == 0 or step == gen_cfg.steps:  # the only host syncs of a step
            row = D.mean_over_ranks({"loss": loss.item(), "grad_norm": grad_norm.item()}, info)
            log({"step": step, **row, "train_time_s": train_time})
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if step in evals and evaluate is not None:
            rows = evaluate(ema.shadow, step)
            metrics.extend(rows)
            for row in rows:
                log({"step": step, "eval": row})
        if step in evals or step % ckpt_every == 0 or step == end:
            save()
    bar.close()
    return {"model": model, "ema": ema.shadow, "step": step, "shift": shift, "metrics": metrics,
            "train_time_s": train_time}
