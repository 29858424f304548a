"""Local executor: each (run, stage) task in its own (forked) process on this machine.

At most ``max_parallel`` tasks run at once; a task starts when its run's parent stages have
finished.  :meth:`LocalExecutor.submit` blocks until every task is over.

Tasks die with the orchestrator: each child asks the kernel for SIGKILL when its parent
dies (``prctl(PR_SET_PDEATHSIG)``), so a ``kill -9`` of ``orchestrate submit`` leaves no
orphan training a run directory.  The stages it had queued are recovered by the next
``submit``/``status`` (:mod:`orchestrator.reconcile`: the submission's journal names this
process, which is gone).
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time

from orchestrator.executors.base import Executor, External, OnQueued
from orchestrator.plan import Plan
from orchestrator.stages import next_attempt, preload, run_stage
from orchestrator.sweep import Sweep

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def ready(plan: Plan, h: str, stage: str, states: dict) -> str | None:
    """'run' when every parent of (h, stage) finished, 'cancel' when one did not, None to wait."""
    for need in plan.stage_needs[stage]:
        if need not in plan.todo[h]:
            continue  # finished before this submission
        st = states.get((h, need))
        if st in ("failed", "cancelled"):
            return "cancel"
        if st != "finished":
            return None
    return "run"


def limit_threads(threads: int) -> None:
    """Give this task ``threads`` intra-op threads, so ``max_parallel`` tasks share the cores.

    The limit goes into the environment (for a torch not imported yet: a spawned task) and,
    when the forking parent has already imported torch (:func:`orchestrator.stages.preload`),
    into torch itself; 2 tasks × 2 spinning OpenMP threads on 2 cores ran the quickstart ~10×
    slower.  A user's OMP_NUM_THREADS wins.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _child(stage: str, run_root: str, log: str, threads: int, parent_pid: int) -> None:
    """Body of one local task (a forked process): stdout/stderr to its log file."""
    die_with_parent(parent_pid)
    limit_threads(threads)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # the parent's sys.stdout/err may be wrappers (e.g. pytest capture): write to the fds
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.update(ORCHESTRATE_EXECUTOR="local", ORCHESTRATE_LOG=log)
    try:
        run_stage(stage, run_root)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class LocalExecutor(Executor):
    """Process pool; processes are forked where the OS allows, after the parent imported the
    core entry points its tasks run (:func:`orchestrator.stages.preload`: a fresh interpreter
    would pay that import per task), else spawned."""

    name = "local"
    blocking = True

    def submit(self, sweep: Sweep, plan: Plan, on_queued: OnQueued, external: External | None = None,
               submission: str = "") -> dict[tuple[str, str], str]:
        for arr in plan.arrays:
            on_queued(arr, {})
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        waiting = [(h, stage) for h in plan.runs for stage in plan.todo[h]]
        if ctx.get_start_method() == "fork":
            preload({stage for _, stage in waiting})  # each task sets its own thread count (limit_threads)
        running: dict = {}  # process -> (run_hash, stage)
        states: dict[tuple[str, str], str] = {}
        threads = max(1, (os.cpu_count() or 1) // sweep.spec.max_parallel)
        while waiting or running:
            for task in list(waiting):
                if len(running) >= sweep.spec.max_parallel:
                    break
                verdict = ready(plan, *task, states)
                if verdict == "cancel":
                    states[task] = "cancelled"
                    waiting.remove(task)
                elif verdict == "run":
                    h, stage = task
                    root = sweep.runs_root / h
                    log = root / "logs" / f"{stage}.attempt{next_attempt(root, stage)}.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    proc = ctx.Process(target=_child, args=(stage, str(root), str(log), threads, os.getpid()))
                    proc.start()
                    running[proc] = task
                    waiting.remove(task)
            for proc in [p for p in running if not p.is_alive()]:
                proc.join()
                states[running.pop(proc)] = "finished" if proc.exitcode == 0 else "failed"
            if running:
                time.sleep(0.05)
        return states
