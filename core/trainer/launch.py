"""Who this process is in a data-parallel launch, and the lock that keeps one launch per run directory.

:func:`launch_env` reads the launcher's environment, in this order of precedence:

1. ``torchrun`` (or anything that exports ``WORLD_SIZE``): ``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` are used as they are.
2. ``srun`` (a Slurm *step*: ``SLURM_STEP_NUM_TASKS`` is set): rank ``SLURM_PROCID``, world
   size ``SLURM_STEP_NUM_TASKS``, local rank ``SLURM_LOCALID``; ``MASTER_ADDR`` (unless set)
   is the first host of ``SLURM_STEP_NODELIST`` (task 0 runs there), ``MASTER_PORT``
   (unless set) ``random.Random(SLURM_JOB_ID).randint(20000, 60000)`` — the port submitit's
   ``TorchDistributedEnvironment`` picks, so both agree.  The batch script of an
   ``sbatch --ntasks=8`` job is not a step (it is one process): it runs alone, with a warning.
3. Otherwise one process.

One launch per run directory: rank 0 holds :mod:`core.dirlock` on ``run_dir`` for the life of
the stage, the lock the orchestrator's stage lock takes on the same directory
(``orchestrator.stages.acquire_stage_lock``).  A process that already holds it (the
orchestrator's rank 0 calling a core entry point) is let through.
"""
from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from core import dirlock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "none"  # "torchrun" (WORLD_SIZE set), "slurm" (an srun step) or "none"


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``"gpu[007-010,001],cpu1"`` -> ``"gpu007"``.

    Only the first host is needed (task 0 of a block distribution runs there); every bracket
    of the first comma-separated group is replaced by its first entry (zero padding kept).
    """
    group = re.match(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", nodelist.strip()).group(0)
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], group)
    if not host:
        raise ValueError(f"cannot read a host name from the Slurm node list {nodelist!r}")
    return host


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None:
        if default is None:
            raise RuntimeError(f"{key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"{key}={value!r} is not an integer") from None


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """This process's place in the launch (see the module docstring for the precedence)."""
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    if "WORLD_SIZE" in env:
        rank = _int(env, "RANK", 0)
        return LaunchEnv(rank, _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", rank), env.get("MASTER_ADDR"),
                         port, "torchrun")
    if "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        addr = env.get("MASTER_ADDR")
        if addr is None and world > 1:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodes:
                raise RuntimeError("an srun step of several tasks without SLURM_STEP_NODELIST: set MASTER_ADDR")
            addr = first_host(nodes)
        if port is None and world > 1:
            port = random.Random(env.get("SLURM_JOB_ID", "0")).randint(20000, 60000)
        return LaunchEnv(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), addr, port, "slurm")
    if _int(env, "SLURM_NTASKS", 1) > 1:
        log.warning("SLURM_NTASKS=%s but this process is not an srun step: running as one process "
                    "(start every task with srun)", env["SLURM_NTASKS"])
    return LaunchEnv()


def torch_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``torch.distributed`` variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
    that :func:`launch_env` resolves and ``env`` lacks: what a job exports so that code reading
    them (e.g. the orchestrator's rank) agrees with core.  Never touches CUDA_VISIBLE_DEVICES."""
    env = os.environ if env is None else env
    le = launch_env(env)
    values = {"RANK": le.rank, "WORLD_SIZE": le.world_size, "LOCAL_RANK": le.local_rank,
              "MASTER_ADDR": le.master_addr, "MASTER_PORT": le.master_port}
    return {k: str(v) for k, v in values.items() if v is not None and k not in env}


# ----------------------------------------------------------------------------- run-directory lock


RunDirLocked = dirlock.DirLocked


def lock_run_dir(run_dir: str | Path) -> int | None:
    """Take the run directory's lock (:mod:`core.dirlock`); returns the fd that holds it.

    None when this process holds it already (through another fd: the orchestrator's stage
    lock), which then stays the holder.  Raises :class:`RunDirLocked` naming the holder."""
    try:
        return dirlock.acquire(run_dir)
    except dirlock.DirLocked as e:
        if dirlock.held_by_me(e.holder):
            return None
        raise


def unlock_run_dir(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
