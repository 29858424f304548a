"""The training loop: one optimizer over the model and the objectives' modules, exact resume.

Resume is exact: a checkpoint holds the model, EMA, optimizer, step, every rank's RNG
states, the data position and each objective's state, and the data order is a pure
function of (seed, epoch) (:class:`core.data.DeterministicBatchSampler`), so N straight
steps and N/2 + kill + resume give bit-identical weights.  (With ``data.num_workers > 0``,
randomness drawn inside workers — none for the built-in datasets — would not be restored.)

GPU-ready: loss terms stay on the device and are summed there; the host reads them (one
sync) only at log steps, where a non-finite loss is also detected.  Gradients are averaged
over ranks while backward runs (:class:`core.trainer.distributed.GradientSync`), transformer
blocks are compiled in place when ``train.compile`` (state-dict keys unchanged), and AdamW
is fused on CUDA.  ``data.hflip`` flips training images at random, per image, from
(seed, step, global image index), so resume stays exact.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core.config import config_dict
from core.data.sampler import DeterministicBatchSampler
from core.io import write_atomic
from core.trainer import distributed as D
from core.trainer.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from core.trainer.ema import EMA
from core.trainer.objective import Objective
from core.trainer.optim import build_optimizer
from core.seed import BatchRNG, step_generator
from core.trainer.schedule import cosine_lr, set_lr

_FLIP_STREAM = 20  # step_generator stream of the random horizontal flips

if TYPE_CHECKING:
    from core.config import RunConfig


def _logged_step(line: str) -> float:
    """Step of a log.jsonl line; a torn last line (killed mid-write) counts as after everything."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def random_hflip(images: torch.Tensor, seed: int, step: int, dist_info: D.DistInfo) -> torch.Tensor:
    """Flip each image (B, 3, H, W) horizontally with probability 1/2, from (seed, step, global index)."""
    rng = BatchRNG(step_generator(seed, step, _FLIP_STREAM), dist_info.rank, dist_info.world_size)
    flip = (rng.rand(len(images)) < 0.5).to(images.device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def train_step(model: nn.Module, objectives: Sequence[Objective], optimizer: torch.optim.Optimizer,
               params: list[torch.Tensor], images: torch.Tensor, labels: torch.Tensor, step: int, lr: float,
               grad_clip: float, bf16: bool, dist_info: D.DistInfo,
               grad_sync: D.GradientSync | None = None) -> dict[str, "float | torch.Tensor"]:
    """One optimizer step on the summed objective losses.

    Returns logs whose values are floats or detached 0-d device tensors (``loss``,
    ``grad_norm``, the objectives' terms): nothing here waits for the device.  Gradients are
    averaged over ranks by ``grad_sync`` during backward, else after it.
    """
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    logs: dict[str, float | torch.Tensor] = {}
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        total = 0.0
        for obj in objectives:
            loss, obj_logs = obj.loss(model, images, labels, step)
            total = total + loss
            logs.update(obj_logs)
    if grad_sync is not None:
        grad_sync.start()
    total.backward()
    if grad_sync is not None:
        grad_sync.finish()
    else:
        D.average_gradients(params, dist_info)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    for obj in objectives:
        obj.after_step(model, step)
    logs.update(loss=total.detach(), lr=lr, grad_norm=grad_norm.detach())
    return logs


def use_compile(train_cfg, device: torch.device) -> bool:
    """``train.compile``, or (None) on for CUDA and off on the CPU."""
    return device.type == "cuda" if train_cfg.compile is None else bool(train_cfg.compile)


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` every transformer block of ``model`` in place; returns how many.

    Compiling blocks (not the whole model) covers every entry the objectives use
    (``model(x)``, ``forward_tokens``, the encoder alone) and keeps parameter names, so
    checkpoints are those of an eager run.
    """
    from timm.models.vision_transformer import Block

    from core.models.dit import DiTBlock

    blocks = [m for m in model.modules() if isinstance(m, (Block, DiTBlock))]
    for m in blocks:
        m.compile(**compile_kwargs)  # e.g. backend="aot_eager" (CPU tests)
    return len(blocks)


class Trainer:
    """Owns the optimizer, EMA, data stream, checkpoints and log of one run.

    Parameters
    ----------
    cfg : the resolved run config (sections optim, train, data are read).
    run_dir : outputs: ``checkpoints/``, ``log.jsonl``.
    model : the tokenizer, already on ``dist_info.device``.
    objectives : summed each step (see :mod:`core.trainer.objective`).
    dataset : training split.
    dist_info : from :func:`core.trainer.distributed.init_distributed`.
    """

    def __init__(self, cfg: "RunConfig", run_dir: str | Path, model: nn.Module, objectives: Sequence[Objective],
                 dataset: Dataset, dist_info: D.DistInfo):
        self.cfg, self.run_dir, self.info = cfg, Path(run_dir), dist_info
        self.model, self.objectives, self.dataset = model, list(objectives), dataset
        modules = {"model": model}
        for obj in self.objectives:
            modules.update(obj.modules())
        for module in modules.values():
            D.broadcast_module(module, dist_info)
        self.params: list[torch.Tensor] = []  # trainable, each once (gradient sync and clipping)
        for module in modules.values():
            for p in module.parameters():
                if p.requires_grad and all(p is not q for q in self.params):
                    self.params.append(p)
        self.optimizer = build_optimizer(modules, cfg.optim, fused=dist_info.device.type == "cuda")
        self.ema = EMA(model, cfg.optim.ema) if cfg.optim.ema else None
        # after the EMA copy (and the objectives' teacher copies): those stay eager
        self.compiled_blocks = compile_blocks(model) if use_compile(cfg.train, dist_info.device) else 0
        self.grad_sync = D.GradientSync(self.params, dist_info) if dist_info.enabled else None
        self.schedule: dict = {}  # a fine-tuning run's epochs -> steps conversion (set by core.train)
        self.step = 0  # optimizer steps done
        self.train_time_s = 0.0
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log_path = self.run_dir / "log.jsonl"
        self.last_logs: dict[str, float] = {}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything needed to resume; collective (every rank must call it)."""
        rngs = D.gather_objects(rng_state(), self.info)
        sampler = self._sampler(self.step)
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"lr": self.cfg.optim.lr, "min_lr": self.cfg.optim.min_lr,
                         "warmup_steps": self.cfg.optim.warmup_steps, "total_steps": self.cfg.train.steps},
            "objectives": [obj.state_dict() for obj in self.objectives],
            "rng": rngs,  # one entry per rank
            "data": sampler.position(self.step),
            "world_size": self.info.world_size,
            "train_time_s": self.train_time_s,
            "config": config_dict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"] if state["ema"] is not None else state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if len(state["objectives"]) != len(self.objectives):
            raise ValueError(f"checkpoint has {len(state['objectives'])} objective states, run has {len(self.objectives)}")
        for obj, obj_state in zip(self.objectives, state["objectives"]):
            obj.load_state_dict(obj_state)
        self.step, self.train_time_s = state["step"], state["train_time_s"]
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:  # resumed on another world size: data order still follows the step, RNG is reseeded
            torch.manual_seed(self.cfg.train.seed + 1000 * self.step + self.info.rank)

    def save(self) -> Path | None:
        state = self.state_dict()
        path = None
        if self.info.is_main:
            path = save_checkpoint(self.ckpt_dir, self.step, state, self.cfg.train.keep_last)
        D.barrier(self.info)
        return path

    def resume(self) -> bool:
        """Load ``checkpoints/latest.pt`` when present; drop log lines written after it."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        self.load_state_dict(load_checkpoint(path, map_location=self.info.device))
        if self.info.is_main and self.log_path.exists():
            kept = [line for line in self.log_path.read_text().splitlines() if _logged_step(line) <= self.step]
            write_atomic(self.log_path, "".join(line + "\n" for line in kept).encode())
        return True

    # ------------------------------------------------------------------ loop

    def _sampler(self, start_step: int) -> DeterministicBatchSampler:
        return DeterministicBatchSampler(len(self.dataset), self.cfg.data.batch_size, self.cfg.train.seed,
                                         self.info.rank, self.info.world_size, start_step)

    def _log(self, record: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, stop_at_step: int | None = None) -> dict[str, float]:
        """Train from ``self.step`` to ``train.steps`` (or ``stop_at_step``); returns the last logs."""
        tc, oc = self.cfg.train, self.cfg.optim
        end = tc.steps if stop_at_step is None else min(stop_at_step, tc.steps)
        if self.step >= end:
            return self.last_logs
        device = self.info.device
        loader = DataLoader(self.dataset, batch_sampler=self._sampler(self.step), num_workers=self.cfg.data.num_workers,
                            pin_memory=device.type == "cuda",
                            # Own generator: creating the iterator must not draw from the global RNG,
                            # or a resumed run's random stream would shift by one draw.
                            generator=torch.Generator().manual_seed(self.cfg.train.seed))
        batches = iter(loader)
        bar = tqdm(total=tc.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=None if self.info.is_main else True)
        window: dict[str, list[float]] = {}  # key -> [sum, count] since the last record
        t_last = time.perf_counter()
        self.model.train()
        while self.step < end:
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            lr = cosine_lr(self.step, tc.steps, oc.warmup_steps, oc.lr, oc.min_lr)
            if self.cfg.data.hflip:
                images = random_hflip(images, tc.seed, self.step, self.info)
            logs = train_step(self.model, self.objectives, self.optimizer, self.params, images, labels, self.step,
                              lr, oc.grad_clip, tc.precision == "bf16", self.info, self.grad_sync)
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.model)
            for k, v in logs.items():  # some keys appear only on some steps (e.g. after a start step)
                acc = window.setdefault(k, [0.0, 0])  # sums stay on the device until the log step
                acc[0], acc[1] = acc[0] + v, acc[1] + 1
            now = time.perf_counter()
            self.train_time_s += now - t_last
            t_last = now
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == end:
                # Mean over the steps since the last record and over ranks; the one host sync.
                means = {k: float(total) / n for k, (total, n) in window.items()}
                if not math.isfinite(means["loss"]):  # NaN/inf in any step of the window stays in its sum
                    raise FloatingPointError(f"non-finite loss in steps {self.step - window['loss'][1] + 1}.."
                                             f"{self.step}: {means}")
                means = D.mean_over_ranks(means, self.info)
                self.last_logs = means
                record = {"step": self.step, **means, "lr": lr, "time": round(self.train_time_s, 3)}
                window = {}
                if self.info.is_main:
                    self._log(record)
                    bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}")
            if self.step % tc.ckpt_every == 0 or self.step == end:
                self.save()
                t_last = time.perf_counter()  # checkpoint I/O is not training time
        bar.close()
        del batches  # shuts down loader workers
        return self.last_logs
