"""The one training loop (nanoGPT keeps one): resume, checkpoints, log, gradient sync, EMA, timing.

:class:`Loop` runs any model whose step is pluggable: a :class:`Step` computes the loss of
optimizer step ``s`` (it fetches its own batch) and owns whatever else it needs saved
(objectives, a noise generator); :class:`Hook` s run after given steps (the generator's
gFID evaluation) and are followed by a checkpoint, so their results are never repeated or
lost on resume.  :class:`Trainer` is the tokenizer's loop (reconstruction + SSL +
fine-tuning objectives); ``core.generator.train`` plugs in the flow-matching step.

Resume is exact: a checkpoint holds the model, EMA, optimizer, step, every rank's RNG
states and the step's and hooks' state; the data order and every augmentation are pure
functions of (seed, step), so N straight steps and N/2 + kill + resume give bit-identical
weights.  Log lines written after the checkpoint are dropped on resume (each step is
logged once).  The run may resume towards a larger ``steps`` than it was started with.

GPU-ready: losses stay on the device and are summed there; the host reads them (one sync)
only at log steps, where the loss is averaged over ranks *before* the non-finite check, so
every rank raises together instead of one rank leaving the others in a collective.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from core.config import config_dict
from core.data.loader import DeviceBatches, random_hflip
from core.data.sampler import DeterministicBatchSampler
from core.io import write_atomic
from core.trainer import distributed as D
from core.trainer.compile import compile_model, use_compile
from core.trainer.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from core.trainer.ema import EMA
from core.trainer.objective import Objective
from core.trainer.optim import build_optimizer
from core.trainer.schedule import cosine_lr, set_lr

if TYPE_CHECKING:
    from core.config import RunConfig

Logs = dict[str, "float | torch.Tensor"]


def _logged_step(line: str) -> float:
    """Step of a log.jsonl line; a torn last line (killed mid-write) counts as after everything."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Step(Protocol):
    """What one optimizer step computes; :class:`Loop` does everything around it."""

    def start(self, step: int) -> None:
        """Open the data stream at ``step`` (called by :meth:`Loop.run` before its first step)."""

    def loss(self, step: int) -> tuple[torch.Tensor, Logs]:
        """(scalar loss, logs) of step ``step``, under the loop's autocast; logs are floats or
        detached 0-d device tensors (read only at log steps)."""

    def after_step(self, step: int) -> None:
        """After the optimizer step ``step`` (an EMA teacher's update, a discriminator step)."""

    def close(self) -> None:
        """Release the data stream (loader workers) at the end of :meth:`Loop.run`."""

    def state_dict(self) -> dict:
        """Saved in the checkpoint (top-level keys, beside the loop's)."""

    def load_state_dict(self, state: dict) -> None:
        """From the whole checkpoint, before the model is loaded (refuse a mismatch here)."""


class Hook(Protocol):
    """Runs after the steps it is :meth:`due` at; a checkpoint follows (its state is saved)."""

    def due(self, step: int) -> bool: ...

    def __call__(self, loop: "Loop", step: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopSettings:
    """How the loop runs (not what a step computes)."""

    steps: int  # total optimizer steps of the run
    lr: Callable[[int], float]  # learning rate of step s (0-based)
    log_every: int = 10
    ckpt_every: int = 50
    keep_last: int = 3
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping (the norm is still logged)
    bf16: bool = False  # autocast the step's forward
    ema_decay: Callable[[int], float] | None = None  # EMA decay of step s; None = the EMA's own
    desc: str = "train"  # progress bar label
    seed: int = 0  # reseeds the global RNG when resumed on another world size


class Loop:
    """Owns the optimizer, EMA, checkpoints, log and progress of one run.

    Parameters
    ----------
    run_dir : outputs: ``checkpoints/``, ``log.jsonl``.
    model : on ``dist_info.device``; its state (and the EMA's) is checkpointed.
    step : the pluggable step (:class:`Step`).
    optimizer, params : the optimizer and the parameters it trains (each once: gradient sync, clipping).
    settings : :class:`LoopSettings`.
    dist_info : data parallelism (rank 0 writes; every rank steps).
    ema : EMA of ``model`` (None: none).
    hooks : :class:`Hook` s.
    """

    def __init__(self, run_dir: str | Path, model: nn.Module, step: Step, optimizer: torch.optim.Optimizer,
                 params: Sequence[torch.Tensor], settings: LoopSettings, dist_info: D.DistInfo,
                 ema: EMA | None = None, hooks: Sequence[Hook] = ()):
        self.run_dir, self.model, self.task, self.optimizer = Path(run_dir), model, step, optimizer
        self.params, self.settings, self.info, self.ema, self.hooks = list(params), settings, dist_info, ema, list(hooks)
        self.grad_sync = D.GradientSync(self.params, dist_info) if dist_info.enabled else None
        self.step = 0  # optimizer steps done
        self.train_time_s = 0.0  # steps and log syncs; checkpoints and hooks excluded
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log_path = self.run_dir / "log.jsonl"
        self.last_logs: dict[str, float] = {}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything needed to resume; collective (every rank must call it)."""
        state = {"step": self.step, "model": self.model.state_dict(),
                 "ema": self.ema.state_dict() if self.ema else None, "optimizer": self.optimizer.state_dict(),
                 "rng": D.gather_objects(rng_state(), self.info),  # one entry per rank
                 "world_size": self.info.world_size, "train_time_s": self.train_time_s}
        for part in (self.task, *self.hooks):
            state.update(part.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        for part in (self.task, *self.hooks):
            part.load_state_dict(state)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"] if state["ema"] is not None else state["model"])
        self.optimizer.load_state_dict(state["optimizer"] if "optimizer" in state else self._regroup(state["opt"]))
        self.step, self.train_time_s = state["step"], state["train_time_s"]
        rngs = state["rng"]
        if isinstance(rngs, dict):  # older generator checkpoints: rank 0's state, restored on every rank
            set_rng_state(rngs)
        elif len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:  # resumed on another world size: data order still follows the step, RNG is reseeded
            torch.manual_seed(self.settings.seed + 1000 * self.step + self.info.rank)

    def _regroup(self, old: dict) -> dict:
        """An older generator checkpoint's optimizer state (one group over ``params`` in order) in
        this optimizer's groups, so runs started before the loops were merged resume exactly."""
        if len(old["param_groups"]) == len(self.optimizer.param_groups):
            return old
        position = {id(p): i for i, p in enumerate(self.params)}
        new = self.optimizer.state_dict()
        state = {}
        for group, live in zip(new["param_groups"], self.optimizer.param_groups):
            for index, p in zip(group["params"], live["params"]):
                if position[id(p)] in old["state"]:
                    state[index] = old["state"][position[id(p)]]
        return {"state": state, "param_groups": new["param_groups"]}

    def save(self) -> Path | None:
        state = self.state_dict()
        path = None
        if self.info.is_main:
            path = save_checkpoint(self.ckpt_dir, self.step, state, self.settings.keep_last)
        D.barrier(self.info)
        return path

    def resume(self) -> bool:
        """Load the newest checkpoint when there is one; drop log lines written after it."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        try:
            self.load_state_dict(load_checkpoint(path, map_location=self.info.device))
        except ValueError as e:  # a checkpoint of another run (size, objectives): name the file
            raise ValueError(f"{path}: {e}") from e
        if self.info.is_main and self.log_path.exists():
            kept = [line for line in self.log_path.read_text().splitlines() if _logged_step(line) <= self.step]
            write_atomic(self.log_path, "".join(line + "\n" for line in kept).encode())
        return True

    def log(self, record: dict) -> None:
        """Append one record to log.jsonl (rank 0)."""
        if self.info.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ loop

    def train_step(self, step: int) -> Logs:
        """One optimizer step; nothing here waits for the device."""
        s = self.settings
        lr = s.lr(step)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=s.bf16):
            loss, logs = self.task.loss(step)
        if self.grad_sync is not None:
            self.grad_sync.start()
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync.finish()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip if s.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.task.after_step(step)
        if self.ema is not None:
            if s.ema_decay is not None:
                self.ema.decay = s.ema_decay(step)
            self.ema.update(self.model)
        logs.update(loss=loss.detach(), lr=lr, grad_norm=grad_norm.detach())
        return logs

    def _record(self, window: dict[str, list], lr: float) -> None:
        """Means over the window's steps and over ranks (the one host sync); stop on a non-finite loss."""
        means = D.mean_over_ranks({k: float(total) / n for k, (total, n) in window.items()}, self.info)
        if not math.isfinite(means["loss"]):  # NaN/inf of any step or rank stays in the mean: all ranks raise
            raise FloatingPointError(f"{self.run_dir}: non-finite loss in steps {self.step - window['loss'][1] + 1}.."
                                     f"{self.step} (on some rank): {means}")
        self.last_logs = means
        self.log({"step": self.step, **means, "lr": lr, "time": round(self.train_time_s, 3)})

    def run(self, stop_at_step: int | None = None) -> dict[str, float]:
        """Train from ``self.step`` to ``settings.steps`` (or ``stop_at_step``); returns the last logs."""
        s = self.settings
        end = s.steps if stop_at_step is None else min(stop_at_step, s.steps)
        if self.step >= end:
            return self.last_logs
        self.task.start(self.step)
        bar = tqdm(total=s.steps, initial=self.step, desc=s.desc, dynamic_ncols=True, leave=False,
                   disable=None if self.info.is_main else True)
        window: dict[str, list] = {}  # key -> [sum, count] since the last record; sums stay on the device
        t_last = time.perf_counter()
        self.model.train()
        while self.step < end:
            logs = self.train_step(self.step)
            self.step += 1
            for k, v in logs.items():  # some keys appear only on some steps (e.g. after a start step)
                acc = window.setdefault(k, [0.0, 0])
                acc[0], acc[1] = acc[0] + v, acc[1] + 1
            bar.update(1)
            if self.step % s.log_every == 0 or self.step == end:
                self._record(window, logs["lr"])
                window = {}
                bar.set_postfix(loss=f"{self.last_logs['loss']:.4f}")
            self.train_time_s += time.perf_counter() - t_last
            hooked = [h for h in self.hooks if h.due(self.step)]
            for hook in hooked:
                hook(self, self.step)
            if hooked or self.step % s.ckpt_every == 0 or self.step == end:
                self.save()
            t_last = time.perf_counter()  # checkpoint I/O and hooks are not training time
        bar.close()
        self.task.close()
        return self.last_logs


# ---------------------------------------------------------------------- the tokenizer


def train_step(model: nn.Module, objectives: Sequence[Objective], optimizer: torch.optim.Optimizer,
               params: list[torch.Tensor], images: torch.Tensor, labels: torch.Tensor, step: int, lr: float,
               grad_clip: float, bf16: bool, dist_info: D.DistInfo) -> Logs:
    """One optimizer step of the tokenizer on a fixed batch (benchmarks, tests): a :class:`Loop`
    step with a batch given instead of drawn."""
    task = ObjectivesStep(model, objectives, None, None, dist_info)
    task.fixed = (images, labels)
    settings = LoopSettings(steps=step + 1, lr=lambda _: lr, grad_clip=grad_clip, bf16=bf16)
    return Loop(".", model, task, optimizer, params, settings, dist_info).train_step(step)


class ObjectivesStep:
    """The tokenizer's step: the sum of the objectives' losses on this rank's batch of the step."""

    def __init__(self, model: nn.Module, objectives: Sequence[Objective], cfg: "RunConfig | None", dataset,
                 dist_info: D.DistInfo):
        self.model, self.objectives, self.cfg, self.dataset, self.info = model, list(objectives), cfg, dataset, dist_info
        self.batches: DeviceBatches | None = None
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # a given batch instead of the data stream

    def sampler(self, start_step: int) -> DeterministicBatchSampler:
        return DeterministicBatchSampler(len(self.dataset), self.cfg.data.batch_size, self.cfg.train.seed,
                                         self.info.rank, self.info.world_size, start_step)

    def start(self, step: int) -> None:
        self.batches = DeviceBatches(self.dataset, self.sampler(step), self.info.device, self.cfg.data.num_workers,
                                     self.cfg.train.seed)

    def loss(self, step: int):
        images, labels = self.fixed if self.fixed is not None else next(self.batches)
        if self.cfg is not None and self.cfg.data.hflip:
            images = random_hflip(images, self.cfg.train.seed, step, self.info)
        total, logs = 0.0, {}
        for obj in self.objectives:
            loss, obj_logs = obj.loss(self.model, images, labels, step)
            total = total + loss
            logs.update(obj_logs)
        return total, logs

    def after_step(self, step: int) -> None:
        for obj in self.objectives:
            obj.after_step(self.model, step)

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
        self.batches = None

    def state_dict(self) -> dict:
        return {"objectives": [obj.state_dict() for obj in self.objectives], "config": config_dict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["objectives"]) != len(self.objectives):
            raise ValueError(f"checkpoint has {len(state['objectives'])} objective states, run has {len(self.objectives)}")
        for obj, obj_state in zip(self.objectives, state["objectives"]):
            obj.load_state_dict(obj_state)


class Trainer(Loop):
    """The tokenizer's loop: one AdamW over the model and the objectives' modules.

    Parameters
    ----------
    cfg : the resolved run config (sections optim, train, data are read).
    run_dir : outputs: ``checkpoints/``, ``log.jsonl``.
    model : the tokenizer, already on ``dist_info.device``.
    objectives : summed each step (see :mod:`core.trainer.objective`).
    dataset : training split (``render_uint8``, ``label``: see :mod:`core.data`).
    dist_info : from :func:`core.trainer.distributed.init_distributed`.
    """

    def __init__(self, cfg: "RunConfig", run_dir: str | Path, model: nn.Module, objectives: Sequence[Objective],
                 dataset: Dataset, dist_info: D.DistInfo):
        modules = {"model": model}
        for obj in objectives:
            modules.update(obj.modules())
        for module in modules.values():
            D.broadcast_module(module, dist_info)
        params: list[torch.Tensor] = []  # trainable, each once (gradient sync and clipping)
        for module in modules.values():
            for p in module.parameters():
                if p.requires_grad and all(p is not q for q in params):
                    params.append(p)
        tc, oc = cfg.train, cfg.optim
        optimizer = build_optimizer(modules, oc, fused=dist_info.device.type == "cuda")
        ema = EMA(model, oc.ema) if oc.ema else None
        settings = LoopSettings(steps=tc.steps, lr=lambda s: cosine_lr(s, tc.steps, oc.warmup_steps, oc.lr, oc.min_lr),
                                log_every=tc.log_every, ckpt_every=tc.ckpt_every, keep_last=tc.keep_last,
                                grad_clip=oc.grad_clip, bf16=tc.precision == "bf16", seed=tc.seed)
        super().__init__(run_dir, model, ObjectivesStep(model, objectives, cfg, dataset, dist_info), optimizer, params,
                         settings, dist_info, ema)
        self.cfg, self.objectives, self.dataset = cfg, self.task.objectives, dataset
        # after the EMA copy (and the objectives' teacher copies): those stay eager
        self.compiled = compile_model(model) if use_compile(tc, dist_info.device) else []
        self.compiled_blocks = len(self.compiled)  # result.json field name kept
        self.schedule: dict = {}  # a fine-tuning run's epochs -> steps conversion (set by core.train)

    def state_dict(self) -> dict:
        state = super().state_dict()
        oc = self.cfg.optim
        state.update(schedule={"lr": oc.lr, "min_lr": oc.min_lr, "warmup_steps": oc.warmup_steps,
                               "total_steps": self.cfg.train.steps},
                     data=self.task.sampler(self.step).position(self.step))
        return state
