"""Data-parallel training through torch.distributed (gloo on CPU, nccl on CUDA).

The process group is set up from the environment that torchrun or submitit's
``TorchDistributedEnvironment().export()`` provides (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT).  Instead of wrapping the model in DDP, gradients are averaged
explicitly after ``backward``: objectives call sub-modules directly (``model.encoder``,
``model.forward_tokens``, SSL heads, ...), which a DDP wrapper's ``forward`` would not see.
Weights start identical because rank 0's are broadcast once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

_BUCKET_BYTES = 25 * 2**20
_TIMEOUT = timedelta(hours=3)  # collectives; see init_distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' → CUDA when available else CPU; 'cuda' → this process's local GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the environment (single process when WORLD_SIZE ≤ 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        # Also when a process group already exists (a caller created it): kernels and nccl
        # collectives of this rank must run on its own GPU, never all on cuda:0.
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistInfo(device=dev)
    owns = False
    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {key} is not set (launch with torchrun or submitit)")
        # Long timeout: in the generator stage the other ranks wait at a barrier while rank 0
        # measures gFID (50k samples), far longer than nccl's default 10 minutes.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=_TIMEOUT)
        owns = True
    return DistInfo(rank, world_size, local_rank, dev, owns)


def cleanup(info: DistInfo) -> None:
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
    ~25 MiB; a bucket's all-reduce is launched asynchronously as soon as all its gradients
    exist and every earlier bucket is launched, so communication overlaps the rest of the
    backward and every rank issues the same collectives in the same order.  :meth:`finish`
    launches what is left (buckets holding a parameter that got no gradient this step: only
    those that have one are reduced, so an unused parameter keeps ``grad = None`` as in one
    process), waits, and writes the means back.  Sums are the same element-wise as
    :func:`average_gradients`, so resume stays exact.

    Which parameters get gradients must be the same on every rank at a given step (it is:
    it depends on the step's phase, never on the data); :func:`average_gradients` is the
    slower path that also handles rank-dependent use.
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
        self._active = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b]

    def start(self) -> None:
        """Call before ``backward``."""
        self._ready = [0] * len(self.buckets)
        self._next = 0
        self._works: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []
        self._active = True

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._active:  # a backward outside the training step (e.g. an objective's own)
            return
        self._ready[self._bucket_of[id(p)]] += 1
        while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: list[torch.Tensor]) -> None:
        grads = [p.grad for p in bucket if p.grad is not None]
        if grads:
            flat = _flatten_dense_tensors(grads)
            self._works.append((dist.all_reduce(flat, async_op=True), flat, grads))

    @torch.no_grad()
    def finish(self) -> None:
        """Call after ``backward``: every gradient is then the mean over ranks."""
        self._active = False
        for bucket in self.buckets[self._next:]:
            self._launch(bucket)
        self._next = len(self.buckets)
        for work, flat, grads in self._works:
            work.wait()
            flat /= self.info.world_size
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        self._works = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
