"""Generator training: the flow-matching step and the gFID hook, run by :class:`core.trainer.loop.Loop`.

Recipe (RAE stage 2 / LightningDiT): AdamW(lr = generator.lr, betas (0.9, 0.95), wd 0)
from :func:`core.trainer.optim.build_optimizer`, constant learning rate (it does not depend
on ``generator.steps``, so a finished run continued to more steps trains as one longer run
would), grad-norm clip 1.0, EMA of the weights with decay generator.ema after a warm-up
that depends on the step only (:func:`ema_decay`), class dropout for CFG.  Batches come
from :class:`core.data.DeterministicBatchSampler` (a pure function of (seed, step)) and the
flow noise from one ``torch.Generator`` whose state is checkpointed, so a resumed run
continues the exact random stream.  Resume, log (each step once), the non-finite-loss stop
and checkpoints are the loop's, shared with the tokenizer.

After each step in ``generator.eval_at`` and after the last step, ``evaluate(ema_model, step)``
returns metric rows (:class:`EvalHook`); they are saved in the checkpoint written right
after, so an evaluation is never repeated or lost on resume.

Data parallel (``dist_info`` with W ranks): ``generator.batch_size`` is the global batch,
rank r trains on rows r, r + W, ... of it; the flow noise is drawn for the global batch and
sliced (:func:`core.generator.flow.flow_loss` ``shard``), gradients are averaged while
backward runs (:class:`core.trainer.distributed.GradientSync`), so W ranks take the steps
one process takes with the same global batch, and every rank holds the same weights,
optimizer state and noise generator state — rank 0's checkpoint resumes all of them
exactly.  Only rank 0 writes; ``evaluate`` is called on every rank (it may be collective).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from core.config import OptimConfig
from core.data.sampler import DeterministicBatchSampler
from core.generator.flow import flow_loss, shift_for
from core.models.dit import DiT
from core.trainer import distributed as D
from core.trainer.ema import EMA
from core.trainer.compile import compile_model
from core.trainer.loop import Loop, LoopSettings
from core.trainer.optim import build_optimizer

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


class FlowStep:
    """The generator's :class:`core.trainer.loop.Step`: flow-matching loss on this rank's latents.

    Rank r of W trains on rows r, r + W, ... of the global batch; the flow noise is drawn
    for the global batch and sliced (:func:`core.generator.flow.flow_loss` ``shard``).
    """

    def __init__(self, model: DiT, gen_cfg: "GeneratorConfig", latents, labels, num_classes: int, shift: float,
                 seed: int, info: D.DistInfo):
        self.model, self.gen_cfg, self.latents, self.labels, self.shift, self.info = (
            model, gen_cfg, latents, labels, shift, info)
        self.meta = {"size": gen_cfg.size, "latent_shape": list(latents.shape[1:]), "num_classes": num_classes}
        self.noise_gen = torch.Generator(device=info.device).manual_seed(seed)  # t, ε, class dropout; same on every rank
        self.sampler = DeterministicBatchSampler(len(latents), gen_cfg.batch_size // info.world_size, seed, info.rank,
                                                 info.world_size)

    def start(self, step: int) -> None:
        pass

    def loss(self, step: int):
        idx = torch.as_tensor(self.sampler.batch(step))
        device = self.info.device
        x, y = self.latents[idx].to(device, non_blocking=True), self.labels[idx].to(device, non_blocking=True)
        loss = flow_loss(self.model, x, y, shift=self.shift, class_dropout=self.gen_cfg.class_dropout,
                         null_class=self.model.null_class, generator=self.noise_gen,
                         shard=(self.info.rank, self.info.world_size))
        return loss, {}

    def after_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"noise_gen": self.noise_gen.get_state(), **self.meta}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.meta["size"] or list(state["latent_shape"]) != self.meta["latent_shape"]:
            raise ValueError(
                f"checkpoint of a {state['size']!r} DiT on latents {tuple(state['latent_shape'])}; the config asks "
                f"for generator.size={self.meta['size']!r} on {tuple(self.meta['latent_shape'])}")
        self.noise_gen.set_state(state["noise_gen"])


class EvalHook:
    """gFID/IS after the steps of :func:`eval_steps`: ``evaluate(ema_model, step)`` -> metric rows,
    logged as ``{"step", "eval": row}`` and kept in the checkpoint (``metrics``)."""

    def __init__(self, evaluate: EvaluateFn | None, steps: list[int]):
        self.evaluate, self.steps, self.metrics = evaluate, set(steps), []

    def due(self, step: int) -> bool:
        return step in self.steps

    def __call__(self, loop: Loop, step: int) -> None:
        if self.evaluate is None:
            return
        rows = self.evaluate(loop.ema.shadow, step)
        self.metrics.extend(rows)
        for row in rows:
            loop.log({"step": step, "eval": row})

    def state_dict(self) -> dict:
        return {"metrics": self.metrics}

    def load_state_dict(self, state: dict) -> None:
        self.metrics = list(state["metrics"])


def train_generator(gen_cfg: "GeneratorConfig", latents, labels, num_classes: int, out_dir: str | Path, *, seed: int,
                    evaluate: EvaluateFn | None = None, stop_at_step: int | None = None,
                    dist_info: D.DistInfo | None = None, device: str | torch.device = "cpu", compile: bool = False,
                    **loop) -> dict:
    """Train (or resume, also to a larger ``generator.steps``) the DiT on normalised ``latents`` (N, c, h, h).

    Writes ``out_dir/checkpoints/`` and ``out_dir/log.jsonl`` (rank 0).  ``stop_at_step``
    stops early with a checkpoint (staged runs, tests).  ``latents``/``labels`` may be any
    objects indexable by an index tensor with ``len`` and ``shape`` (e.g. memory-mapped
    shards).  ``dist_info``: data parallelism (None: one process on ``device``); ``compile``:
    torch.compile the DiT; ``loop``: :class:`core.trainer.loop.LoopSettings` fields
    (``ckpt_every``, ``keep_last``, ``log_every``, ``bf16``).

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
    if len(latents) < gen_cfg.batch_size:
        raise ValueError(f"{len(latents)} latents are fewer than one batch (generator.batch_size={gen_cfg.batch_size})")
    if gen_cfg.batch_size % info.world_size:
        raise ValueError(f"generator.batch_size={gen_cfg.batch_size} (global) does not split over "
                         f"{info.world_size} ranks")
    latent_shape = tuple(latents.shape[1:])
    shift = resolve_shift(gen_cfg, latent_shape)
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on ``seed`` only
        torch.manual_seed(seed)
        model = build_generator(gen_cfg, latent_shape, num_classes).to(info.device)
    D.broadcast_module(model, info)  # identical already (same seed); cheap insurance
    ema = EMA(model, gen_cfg.ema)
    opt = build_optimizer({"model": model}, OptimConfig(lr=gen_cfg.lr, betas=(0.9, 0.95), weight_decay=0.0),
                          fused=info.device.type == "cuda")
    if compile:
        compile_model(model)  # after the EMA copy, which stays eager
    settings = LoopSettings(steps=gen_cfg.steps, lr=lambda s: gen_cfg.lr, grad_clip=1.0, seed=seed,
                            ema_decay=lambda s: ema_decay(gen_cfg.ema, s), desc=f"generator {gen_cfg.size}", **loop)
    hook = EvalHook(evaluate, eval_steps(gen_cfg))
    runner = Loop(out_dir, model, FlowStep(model, gen_cfg, latents, labels, num_classes, shift, seed, info), opt,
                  list(model.parameters()), settings, info, ema=ema, hooks=[hook])
    runner.resume()
    runner.run(stop_at_step)
    return {"model": model, "ema": ema.shadow, "step": runner.step, "shift": shift, "metrics": hook.metrics,
            "train_time_s": runner.train_time_s}
