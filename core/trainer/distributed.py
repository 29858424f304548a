"""Data-parallel training through torch.distributed (gloo on CPU, nccl on CUDA).

The process group is set up from the launcher's environment (:mod:`core.trainer.launch`:
torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*, else an srun step's SLURM_* variables, so
``srun python -m core.train`` runs data parallel as it is).  Instead of wrapping the model in
DDP, gradients are averaged explicitly after ``backward``: objectives call sub-modules
directly (``model.encoder``, ``model.forward_tokens``, SSL heads, ...), which a DDP wrapper's
``forward`` would not see.  Weights start identical because rank 0's are broadcast once.

A failed rank ends the job in minutes: every collective (and forming the group) times out
after ``TCAE_DIST_TIMEOUT_S`` seconds (default 600), and errors every rank can see (the run
directory's lock) are raised on every rank.  Rank-0-only work that others wait for at a
barrier (saving a checkpoint, writing result.json) must stay well under that bound.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from core.trainer.launch import RunDirLocked, launch_env, lock_run_dir, unlock_run_dir

log = logging.getLogger(__name__)

_BUCKET_BYTES = 25 * 2**20
TIMEOUT_ENV = "TCAE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call created the process group (and destroys it)
    run_lock: int | None = None  # fd of rank 0's lock on the run directory (closed by cleanup)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' → CUDA when available else CPU; 'cuda' → this process's local GPU.

    ``cuda:LOCAL_RANK`` when the node's GPUs are all visible (torchrun, ``srun`` without GPU
    binding), ``cuda:0`` when Slurm bound one GPU to the task (CUDA_VISIBLE_DEVICES holds one);
    in general ``LOCAL_RANK mod`` the visible devices.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def dist_timeout() -> timedelta:
    """Timeout of forming the group and of every collective: ``TCAE_DIST_TIMEOUT_S`` (default 600 s)."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = DEFAULT_TIMEOUT_S if raw is None else float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def init_distributed(device: str = "auto", run_dir: str | Path | None = None) -> DistInfo:
    """Join the process group the launcher describes (one process when the world size is 1).

    With ``run_dir``, rank 0 takes the run directory's lock (:func:`core.trainer.launch.lock_run_dir`)
    until :func:`cleanup`; when another process holds it every rank raises ``RunDirLocked``.
    """
    env = launch_env()
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        # Also when a process group already exists (a caller created it): kernels and nccl
        # collectives of this rank must run on its own GPU, never all on cuda:0.
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistInfo(device=dev, run_lock=lock_run_dir(run_dir) if run_dir is not None else None)
    owns = False
    if not dist.is_initialized():
        if env.master_addr is None or env.master_port is None:
            raise RuntimeError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set "
                               "(launch with torchrun, srun or submitit)")
        timeout = dist_timeout()
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=
                                    f"tcp://{env.master_addr}:{env.master_port}", rank=rank,
                                    world_size=world_size, timeout=timeout)
        except Exception as e:
            raise RuntimeError(f"rank {rank} of {world_size}: no process group at {env.master_addr}:"
                               f"{env.master_port} within {timeout.total_seconds():g} s ({TIMEOUT_ENV}); "
                               f"did another rank fail to start? ({e})") from e
        owns = True
    info = DistInfo(rank, world_size, local_rank, dev, owns)
    if run_dir is not None:
        lock, error = None, ""
        if info.is_main:
            try:
                lock = lock_run_dir(run_dir)
            except RunDirLocked as e:
                error = str(e)
            except OSError as e:  # e.g. a read-only directory: every rank must hear it, not wait
                error = f"cannot lock the run directory {run_dir}: {e}"
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            cleanup(info)
            raise RunDirLocked(box[0])
        info = DistInfo(rank, world_size, local_rank, dev, owns, lock)
    return info


def cleanup(info: DistInfo) -> None:
    """Release the run directory's lock and leave the group this process created."""
    unlock_run_dir(info.run_lock)
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@torch.no_grad()
def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if info.enabled:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


@torch.no_grad()
def average_gradients(params: Iterable[torch.Tensor], info: DistInfo | None = None) -> None:
    """All-reduce the mean of every gradient, in flattened buckets of ~25 MiB.

    ``info=None`` uses the current process group (for objectives that step an optimizer of
    their own, e.g. a discriminator, and must keep it in sync across ranks).

    A parameter without a gradient on this rank but with one on another joins with zeros,
    so all ranks run the same collectives; one unused on every rank keeps ``grad = None``
    (as in a single process, where the optimizer then skips it).
    """
    params = [p for p in params if p.requires_grad]
    if info is None:
        info = current_info(params[0].device if params else "cpu")
    if not info.enabled or not params:
        return
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=info.device)
    dist.all_reduce(used)
    params = [p for p, n in zip(params, used.tolist()) if n > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for i, p in enumerate(params):
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= _BUCKET_BYTES or i == len(params) - 1:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= info.world_size
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)
            bucket, size = [], 0


def current_info(device: torch.device | str = "cpu") -> DistInfo:
    """The DistInfo of the process group that exists now (one process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(device=torch.device(device))
    return DistInfo(dist.get_rank(), dist.get_world_size(), device=torch.device(device))


def mean_tensor(t: torch.Tensor, info: DistInfo | None = None) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` itself when not distributed)."""
    info = info or current_info(t.device)
    if not info.enabled:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / info.world_size


def mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average a dict of floats (same keys on every rank) over ranks."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class GradientSync:
    """Average gradients over ranks *while* backward runs (what DDP's reducer does).

    Every trainable parameter gets a post-accumulate-grad hook.  Parameters are packed in
    reverse order (backward produces the last layers' gradients first) into buckets of
    ~25 MiB; a bucket's all-reduce is launched asynchronously as soon as the gradients it
    expects exist and every earlier bucket is launched, so communication overlaps the rest of
    the backward and every rank issues the same collectives in the same order.

    A bucket expects the parameters of it that got a gradient in the previous step (all of
    them in the first step after construction): a parameter that gets none in a phase (the
    iBOT prototypes while frozen, a frozen encoder) then holds no bucket back past the first
    step of that phase.  A gradient that arrives after its bucket left (a parameter that
    starts getting gradients) is reduced by :meth:`finish` with the buckets that backward did
    not complete.  Only parameters that got a gradient this step are reduced, so an unused
    parameter keeps ``grad = None`` as in one process.  Each element's sum is the same
    whatever bucket carries it (with 2 ranks bit for bit: the sum of two numbers), so results
    and resume stay exact.

    Which parameters get gradients must be the same on every rank at a given step (it is:
    it depends on the step's phase, never on the data); :func:`average_gradients` is the
    slower path that also handles rank-dependent use.

    ``overlapped`` / ``launched``: buckets of the last step whose all-reduce started while
    backward ran / at all (a measurement, e.g. for tests and benchmarks).
    """

    def __init__(self, params: list[torch.Tensor], info: DistInfo, bucket_bytes: int = _BUCKET_BYTES):
        self.info = info
        self.buckets: list[list[torch.Tensor]] = []
        size = bucket_bytes
        for p in reversed([p for p in params if p.requires_grad]):
            if size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._expect = set(self._bucket_of)  # ids of the parameters the buckets wait for
        self._active = False
        self.overlapped = self.launched = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b]

    def start(self) -> None:
        """Call before ``backward``."""
        self._waiting = [sum(id(p) in self._expect for p in b) for b in self.buckets]
        self._next = 0
        self._arrived: set[int] = set()  # ids of the parameters whose gradient arrived this step
        self._unsent: set[int] = set()  # ... and is in no launched all-reduce yet
        self._works: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []
        self.overlapped = self.launched = 0
        self._active = True
        self._launch_ready()  # buckets that expect nothing

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._active:  # a backward outside the training step (e.g. an objective's own)
            return
        key = id(p)
        self._arrived.add(key)
        self._unsent.add(key)
        i = self._bucket_of[key]
        if i >= self._next and key in self._expect:
            self._waiting[i] -= 1
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self._waiting[self._next] == 0:
            self.overlapped += self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, params: list[torch.Tensor]) -> int:
        sent = [p for p in params if id(p) in self._unsent]
        if not sent:
            return 0
        self._unsent.difference_update(id(p) for p in sent)
        grads = [p.grad for p in sent]
        flat = _flatten_dense_tensors(grads)
        self._works.append((dist.all_reduce(flat, async_op=True), flat, grads))
        self.launched += 1
        return 1

    @torch.no_grad()
    def finish(self) -> None:
        """Call after ``backward``: every gradient is then the mean over ranks."""
        self._active = False
        for bucket in self.buckets[self._next:]:
            self._launch(bucket)
        self._next = len(self.buckets)
        # gradients that came after their bucket left, in bucket order (the same on every rank)
        self._launch([p for b in self.buckets for p in b if id(p) in self._unsent])
        self._expect = self._arrived  # what the next step's buckets wait for
        for work, flat, grads in self._works:
            work.wait()
            flat /= self.info.world_size
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        self._works = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
