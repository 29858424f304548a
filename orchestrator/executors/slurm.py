"""Slurm through submitit: one sbatch (one job array) per planned array.

Every job is named ``{sweep}.{stage}.{submission}-{array index}``: the name is decided and
recorded (:mod:`orchestrator.reconcile`) before its sbatch, so a submission killed between
sbatch returning and the database write is found again by name, never submitted twice.
An sbatch refusal becomes :class:`~orchestrator.executors.SubmissionRefused` naming
the stage and the option (one line, no submitit traceback).
"""
from __future__ import annotations

import contextlib
import io

from orchestrator import slurm
from orchestrator.executors import SubmissionRefused
from orchestrator.executors.base import Executor, External, OnQueued
from orchestrator.plan import ArrayPlan, Plan
from orchestrator.stages import DISTRIBUTED_STAGES, StageTask
from orchestrator.sweep import Resources, Sweep

def job_name(sweep: str, stage: str, submission: str, index: int) -> str:
    return f"{sweep}.{stage}.{submission}-{index}"


def element_ids(base: str, n: int) -> list[str]:
    """Job ids of an array's elements (submitit submits a one-element array as a plain job)."""
    return [base] if n == 1 else [f"{base}_{k}" for k in range(n)]


def sbatch_params(sweep: Sweep, stage: str, res: Resources, dependency: str | None, name: str | None = None) -> dict:
    """submitit ``SlurmExecutor`` parameters of one array.

    ``res.cpus`` is the job's CPUs (per node: jobs here are one node); a distributed stage
    runs one task per GPU, each with ``cpus / gpus`` (:func:`orchestrator.slurm.cpus_per_task`;
    sweep validation refuses a count that does not split).
    """
    extra = dict(res.extra)
    if dependency:
        extra["dependency"] = dependency
        extra.setdefault("kill-on-invalid-dep", "yes")  # never hang behind a failed parent
    tasks = res.gpus if res.gpus and stage in DISTRIBUTED_STAGES else 1
    params = dict(job_name=name or f"{sweep.name}.{stage}", time=res.time_min,
                  cpus_per_task=slurm.cpus_per_task(res.cpus, tasks),
                  mem=f"{int(res.mem_gb * 1024)}MB", array_parallelism=sweep.spec.array_parallelism,
                  signal_delay_s=90, additional_parameters=extra)
    for key, value in (("partition", res.partition), ("account", res.account), ("qos", res.qos)):
        if value:
            params[key] = value
    if res.gpus:
        params["gpus_per_node"] = res.gpus
        if stage in DISTRIBUTED_STAGES:
            params["ntasks_per_node"] = res.gpus  # one DDP rank per GPU (core.train reads RANK/WORLD_SIZE)
    return params


def dependency(plan: Plan, arr: ArrayPlan, external: External) -> str | None:
    """``aftercorr``/``afterok`` on this plan's parent arrays and on parents queued earlier."""
    single = len(arr.runs) == 1  # submitit submits one element as a plain job: no aftercorr
    deps = [f"{'afterok' if single else kind}:{plan.arrays[p].job_id.split('_')[0]}" for p, kind in arr.depends_on]
    for need in plan.stage_needs[arr.stage]:
        ids = [external.get((h, need)) for h in arr.runs]
        if not any(ids):
            continue
        base = ids[0].split("_")[0] if ids[0] else None
        if not single and base and ids == element_ids(base, len(ids)) and "_" in ids[0]:
            deps.append(f"aftercorr:{base}")  # element k waits only for the old array's element k
        else:
            deps.append("afterok:" + ":".join(sorted({i for i in ids if i})))
    return ",".join(deps) or None


class SlurmExecutor(Executor):
    name = "slurm"

    def max_array_size(self) -> int:
        return slurm.max_array_size()

    def submit(self, sweep: Sweep, plan: Plan, on_queued: OnQueued, external: External | None = None,
               submission: str = "") -> dict[tuple[str, str], str]:
        import submitit
        from submitit.core.utils import FailedJobError

        runs_root = sweep.runs_root
        folder = runs_root / ".submitit"
        ids: dict[tuple[str, str], str] = {}
        for arr in plan.arrays:
            name = job_name(sweep.name, arr.stage, submission, arr.index)
            ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=3)
            ex.update_parameters(**sbatch_params(sweep, arr.stage, arr.resources,
                                                 dependency(plan, arr, external or {}), name))
            try:
                # submitit prints sbatch's stderr itself before raising: keep it for our one line
                with contextlib.redirect_stderr(io.StringIO()), ex.batch():
                    jobs = [ex.submit(StageTask(arr.stage, str(runs_root / h))) for h in arr.runs]
            except FailedJobError as e:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                errs = [ln.removeprefix("sbatch: error:").strip() for ln in lines if ln.startswith("sbatch: error")]
                detail = "; ".join(errs or lines[-1:]) or "sbatch failed"
                raise SubmissionRefused(arr.stage, slurm.refusal(detail), detail) from None
            arr.job_id = jobs[0].job_id
            got = {h: job.job_id for h, job in zip(arr.runs, jobs)}
            on_queued(arr, got)
            ids.update({(h, arr.stage): j for h, j in got.items()})
        return ids
