"""Debug executor: every task in this process, one after another (pdb-friendly)."""
from __future__ import annotations

import os

from orchestrator.executors.base import Executor, External, OnQueued
from orchestrator.executors.local import ready
from orchestrator.plan import Plan
from orchestrator.stages import run_stage
from orchestrator.sweep import Sweep


class DebugExecutor(Executor):
    name = "debug"
    blocking = True

    def submit(self, sweep: Sweep, plan: Plan, on_queued: OnQueued, external: External | None = None,
               submission: str = "") -> dict[tuple[str, str], str]:
        for arr in plan.arrays:
            on_queued(arr, {})
        states: dict[tuple[str, str], str] = {}
        previous = os.environ.get("ORCHESTRATE_EXECUTOR")
        os.environ["ORCHESTRATE_EXECUTOR"] = "debug"  # for these tasks only: this process lives on
        try:
            for stage in sweep.stage_order:
                for h in plan.runs:
                    if stage not in plan.todo[h]:
                        continue
                    if ready(plan, h, stage, states) != "run":
                        states[(h, stage)] = "cancelled"
                        continue
                    try:
                        run_stage(stage, sweep.runs_root / h)
                        states[(h, stage)] = "finished"
                    except Exception:
                        states[(h, stage)] = "failed"
        finally:
            if previous is None:
                os.environ.pop("ORCHESTRATE_EXECUTOR", None)
            else:
                os.environ["ORCHESTRATE_EXECUTOR"] = previous
        return states
