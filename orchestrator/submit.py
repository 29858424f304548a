"""Submit a validated sweep: decide what to run, record it, hand it to an executor.

Executors:

* ``slurm`` — one submitit job array per (stage, resource spec), chunked to
  ``MaxArraySize``, linked with ``aftercorr`` / ``afterok``; fire-and-forget unless waited on;
* ``local`` — the same (run, stage) tasks as (forked) processes, at most ``max_parallel`` at a
  time, each starting when its run's parent stages have finished; blocks, then ingests;
* ``debug`` — in-process, sequential (pdb-friendly).

Jobs write result files; this process ingests them (:func:`refresh_states`).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.config import config_dict
from orchestrator import slurm
from orchestrator.db.store import Store
from orchestrator.plan import Plan, build_plan, stages_to_run
from orchestrator.stages import DISTRIBUTED_STAGES, StageTask, log_tail, next_attempt, run_stage
from orchestrator.sweep import RunSpec, Sweep, SweepFile, build_sweep, load_sweep

ACTIVE = ("queued", "running", "preempted")  # submitted and not over: never submit twice
REDO = ("failed", "cancelled")
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclass
class SubmitResult:
    plan: Plan
    executor: str
    job_ids: dict[tuple[str, str], str] = field(default_factory=dict)  # (run_hash, stage) -> slurm id
    states: dict[tuple[str, str], str] = field(default_factory=dict)  # local/debug: final states

    def to_dict(self) -> dict:
        out = self.plan.to_dict()
        out["executor"] = self.executor
        out["job_ids"] = [{"run_hash": h, "stage": s, "job_id": j} for (h, s), j in self.job_ids.items()]
        out["states"] = [{"run_hash": h, "stage": s, "state": st} for (h, s), st in self.states.items()]
        return out


def open_store(url: str) -> Store:
    """The store at ``url``; a database without any schema is created (first submission).

    Raises :class:`orchestrator.cli.UsageError` for a database at an older schema revision
    (migrations never run implicitly: ``orchestrate db upgrade``).
    """
    from orchestrator.cli import UsageError
    from orchestrator.db.store import SchemaError

    store = Store(url)
    if store.current_revision() is None:
        store.upgrade()
    try:
        store.check_schema()
    except SchemaError as e:
        raise UsageError(str(e)) from None
    return store


def stage_states(store: Store, hashes: set[str] | None = None, sweep: str | None = None) -> dict[str, dict[str, str]]:
    """run_hash -> {stage: status} for runs in the database (of ``sweep``, or with these hashes).

    A run is identified by its config hash across sweeps: a config already run by another
    sweep is not run again.
    """
    return {r.run_hash: {st.stage: st.status for st in r.stages} for r in store.runs(sweep=sweep)
            if hashes is None or r.run_hash in hashes}


def decide(sweep: Sweep, known: dict[str, dict[str, str]], retry: bool = False,
           runs: list[RunSpec] | None = None) -> dict[str, list[str]]:
    """Stages to run per run hash.

    ``submit``: stages never submitted (new runs, or stages added to the sweep since),
    for runs with nothing active or failed.  ``retry``: failed/cancelled stages and their
    dependants, for runs with nothing active.  A run with a queued/running stage is left alone.
    """
    needs = {s: sweep.spec.stages[s].needs for s in sweep.stage_order}
    todo: dict[str, list[str]] = {}
    for run in runs if runs is not None else sweep.runs:
        states = known.get(run.run_hash, {})
        if any(v in ACTIVE for v in states.values()):
            continue
        failed = {s for s, v in states.items() if v in REDO}
        if retry:
            if failed:
                done = {s for s, v in states.items() if v == "finished"}
                todo[run.run_hash] = stages_to_run(sweep.stage_order, needs, done, redo=failed)
        elif not failed:
            done = {s for s, v in states.items() if v != "pending"}
            todo[run.run_hash] = stages_to_run(sweep.stage_order, needs, done)
    return todo


def sweep_yaml(sweep: Sweep) -> str:
    """The sweep spec as stored in the database, with ``runs_dir`` made absolute."""
    d = sweep.spec.model_dump(mode="json")
    d["runs_dir"] = str(sweep.runs_root.parent)
    return yaml.safe_dump(d, sort_keys=False)


def stored_sweep(store: Store, name: str) -> SweepFile | None:
    from sqlalchemy import select

    from orchestrator.db.models import Sweep as SweepRow

    with store.session() as s:
        text = s.scalars(select(SweepRow.spec_yaml).where(SweepRow.name == name)).one_or_none()
    return SweepFile.model_validate(yaml.safe_load(text)) if text else None


def write_run_dirs(sweep: Sweep, plan: Plan, executor: str) -> None:
    """``config.yaml`` + ``run.json`` per run: all a job reads (it pickles only the path)."""
    stage_params = {name: st.params for name, st in sweep.spec.stages.items()}
    for h, run in plan.runs.items():
        root = sweep.runs_root / h
        root.mkdir(parents=True, exist_ok=True)
        # = core.config.save_config, with libyaml's dumper when present (4x faster; 1,000 runs)
        (root / "config.yaml").write_text(yaml.dump(config_dict(run.config), Dumper=_DUMPER, sort_keys=False))
        # plain writes: the files exist before any job that reads them (an fsync per run
        # costs ~30 ms here, i.e. 30 s for a 1,000-run sweep)
        (root / "run.json").write_text(json.dumps({"run_hash": h, "sweep": sweep.name, "params": _scalar(run.params),
                                                   "label": run.label, "executor": executor, "stages": stage_params}))


def _scalar(params: dict) -> dict:
    return {k: v if v is None or isinstance(v, (str, int, float, bool)) else str(v) for k, v in params.items()}


def submit_sweep(store: Store | None, sweep: Sweep, executor: str | None = None, dry_run: bool = False,
                 wait: bool = False, retry: bool = False, runs: list[RunSpec] | None = None,
                 poll_s: float = 2.0) -> SubmitResult:
    """Plan and submit ``sweep`` (see the module docstring).

    Parameters
    ----------
    store : results database (may be None only with ``dry_run``).
    executor : overrides the sweep file's ``executor``.
    retry : resubmit failed/cancelled stages (and their dependants) instead of new ones.
    runs : runs to consider (default: the sweep's grid; the search driver passes trials).
    wait : block until every submitted stage is over, then ingest (local/debug always do).
    """
    executor = executor or sweep.spec.executor
    if runs is not None:
        runs = list({r.run_hash: r for r in runs}.values())  # two trials may land on one config
    hashes = {r.run_hash for r in (runs if runs is not None else sweep.runs)}
    known = stage_states(store, hashes) if store is not None else {}
    todo = decide(sweep, known, retry=retry, runs=runs)
    max_size = slurm.max_array_size() if executor == "slurm" else 10**9
    plan = build_plan(sweep, todo, runs if runs is not None else sweep.runs, max_size)
    result = SubmitResult(plan=plan, executor=executor)
    if dry_run or not plan.runs:
        return result
    write_run_dirs(sweep, plan, executor)
    with store.session() as s:
        store.get_or_create_sweep(sweep.name, spec_yaml=sweep_yaml(sweep), session=s)
        for h, run in plan.runs.items():
            store.upsert_run(h, sweep.name, config_dict(run.config), _scalar(run.params), executor=executor,
                             stages=sweep.stage_order, session=s)
    if executor == "slurm":
        result.job_ids = _submit_slurm(sweep, plan)
        _mark_queued(store, sweep, plan, result.job_ids)
        if wait:
            wait_for_sweep(store, sweep.name, poll_s=poll_s)
    else:
        _mark_queued(store, sweep, plan, {})
        run_fn = _run_debug if executor == "debug" else _run_local
        result.states = run_fn(sweep, plan)
        _ingest_sweep(store, sweep.runs_root)
        with store.session() as s:  # stages that never ran because a parent failed
            for (h, stage), st in result.states.items():
                if st == "cancelled":
                    store.set_stage_state(h, stage, "cancelled", session=s)
    return result


def _mark_queued(store: Store, sweep: Sweep, plan: Plan, job_ids: dict[tuple[str, str], str]) -> None:
    """Record every planned (run, stage) as queued, with its Slurm job id when it has one."""
    with store.session() as s:
        for h, stages in plan.todo.items():
            for stage in stages:
                jid = job_ids.get((h, stage))
                store.set_stage_state(h, stage, "queued", attempt=next_attempt(sweep.runs_root / h, stage),
                                      slurm_job_id=jid, slurm_array_id=jid.split("_")[0] if jid else None,
                                      session=s)


def sweep_name(store: Store, arg: str) -> str:
    """A sweep named on the command line: a sweep file (its ``name``) or a name in the database."""
    if Path(arg).is_file():
        return yaml.safe_load(Path(arg).read_text())["name"]
    if arg in store.sweep_names():
        return arg
    raise LookupError(f"no sweep file or sweep named '{arg}' in {store.url} (known: {store.sweep_names()})")


def retry_sweep(store: Store, arg: str, executor: str | None = None, dry_run: bool = False,
                wait: bool = False) -> SubmitResult:
    """Resubmit the failed/cancelled stages of the runs recorded for sweep ``arg``.

    The runs come from the database (so search trials and runs dropped from the file are
    covered); stages, resources and executor come from the sweep file when ``arg`` is one,
    else from the spec stored at submission.
    """
    from core.config import load_config

    name = sweep_name(store, arg)
    if Path(arg).is_file():
        sweep = load_sweep(arg)
    else:
        spec = stored_sweep(store, name)
        sweep = build_sweep(spec, Path(spec.runs_dir) / f"{name}.yaml")
    runs = []
    for r in store.runs(sweep=name, with_config=True):
        meta_path = sweep.runs_root / r.run_hash / "run.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"params": {}, "label": "[?]"}
        runs.append(RunSpec(params=meta["params"], config=load_config(r.config, origin=f"run {r.run_hash}"),
                            run_hash=r.run_hash, label=meta["label"]))
    return submit_sweep(store, sweep, executor=executor, dry_run=dry_run, wait=wait, retry=True, runs=runs)


# ----------------------------------------------------------------------------- slurm


def _sbatch_params(sweep: Sweep, stage: str, res, dependency: str | None) -> dict:
    extra = {k: v for k, v in res.extra.items()}
    if dependency:
        extra["dependency"] = dependency
        extra.setdefault("kill-on-invalid-dep", "yes")  # never hang behind a failed parent
    params = dict(job_name=f"{sweep.name}.{stage}", time=res.time_min, cpus_per_task=res.cpus,
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


def _submit_slurm(sweep: Sweep, plan: Plan) -> dict[tuple[str, str], str]:
    """One sbatch call per planned array; returns (run_hash, stage) -> job id (``123_4``)."""
    import submitit

    folder = sweep.runs_root / ".submitit"
    ids: dict[tuple[str, str], str] = {}
    for arr in plan.arrays:
        deps = []
        for parent, kind in arr.depends_on:
            single = len(arr.runs) == 1  # submitit submits one element as a plain job
            deps.append(f"{'afterok' if single else kind}:{plan.arrays[parent].job_id.split('_')[0]}")
        ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=3)
        ex.update_parameters(**_sbatch_params(sweep, arr.stage, arr.resources, ",".join(deps) or None))
        with ex.batch():
            jobs = [ex.submit(StageTask(arr.stage, str(sweep.runs_root / h))) for h in arr.runs]
        arr.job_id = jobs[0].job_id
        for h, job in zip(arr.runs, jobs):
            ids[(h, arr.stage)] = job.job_id
    return ids


def wait_for_sweep(store: Store, sweep: str, poll_s: float = 2.0, timeout_s: float | None = None) -> None:
    """Refresh until no stage of ``sweep`` is queued/running/preempted."""
    t0 = time.time()
    while True:
        counts = refresh_states(store, sweep)
        if not any(counts.get(s) for s in ACTIVE):
            return
        if timeout_s is not None and time.time() - t0 > timeout_s:
            raise TimeoutError(f"sweep {sweep} still has active stages after {timeout_s}s: {counts}")
        time.sleep(poll_s)


def _ingest_sweep(store: Store, runs_root: Path):
    from orchestrator.ingest import ingest

    return ingest(store, [runs_root]) if runs_root.exists() else None


SLURM_TO_STATUS = {"PENDING": "queued", "RUNNING": "running", "COMPLETING": "running", "CONFIGURING": "running",
                   "REQUEUED": "preempted", "PREEMPTED": "preempted", "REQUEUE_HOLD": "preempted",
                   "SUSPENDED": "preempted"}


def refresh_states(store: Store, sweep: str) -> dict[str, int]:
    """Ingest new result files, then update active stages from one batched ``sacct`` call.

    PREEMPTED/REQUEUED count as not done; a job that ended without a result file
    (killed, cancelled, or never started because a parent failed) takes Slurm's final
    state.  Returns per-status stage counts of the sweep.
    """
    spec = stored_sweep(store, sweep)
    runs_root = Path(spec.runs_dir) / sweep if spec is not None else None
    if runs_root is not None:
        _ingest_sweep(store, runs_root)
    active = [(r.run_hash, st) for r in store.runs(sweep=sweep) for st in r.stages
              if st.status in ACTIVE + ("pending",) and st.slurm_job_id]
    states = slurm.job_states([st.slurm_job_id for _, st in active]) if active and slurm.available() else {}
    with store.session() as s:
        for h, st in active:
            info = states.get(st.slurm_job_id)
            if info is None:
                continue
            state = info["state"]
            if state in SLURM_TO_STATUS:
                # attempts come only from result files (a requeue writes a 'preempted' one):
                # bumping it here could hide a result file written meanwhile from the ingester
                if SLURM_TO_STATUS[state] != st.status:
                    store.set_stage_state(h, st.stage, SLURM_TO_STATUS[state], session=s)
            elif state in slurm.FINAL_STATES and state != "COMPLETED":
                # no result file was ingested for this attempt: the job died outside our wrapper
                tail = (log_tail(runs_root / ".submitit" / st.slurm_job_id / f"{st.slurm_job_id}_0_log.err", 20)
                        if runs_root is not None else None)
                store.set_stage_state(h, st.stage, slurm.FINAL_STATES[state],
                                      error_tail=f"slurm state {state}" + (f"\n{tail}" if tail else ""), session=s)
    if runs_root is not None and states:
        _ingest_sweep(store, runs_root)  # results written between the first ingest and sacct
    counts: dict[str, int] = {}
    for r in store.runs(sweep=sweep):
        for st in r.stages:
            counts[st.status] = counts.get(st.status, 0) + 1
    return counts


def cancel_sweep(store: Store, sweep: str) -> list[str]:
    """``scancel`` every queued/running stage of ``sweep`` and mark it cancelled."""
    active = [(r.run_hash, st) for r in store.runs(sweep=sweep) for st in r.stages if st.status in ACTIVE]
    job_ids = [st.slurm_job_id for _, st in active if st.slurm_job_id]
    slurm.cancel(job_ids)
    with store.session() as s:
        for h, st in active:
            store.set_stage_state(h, st.stage, "cancelled", session=s)
    return job_ids


# ----------------------------------------------------------------------------- local / debug


def _ready(plan: Plan, h: str, stage: str, states: dict) -> str | None:
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


def _run_debug(sweep: Sweep, plan: Plan) -> dict[tuple[str, str], str]:
    states: dict[tuple[str, str], str] = {}
    os.environ["ORCHESTRATE_EXECUTOR"] = "debug"
    for stage in sweep.stage_order:
        for h in plan.runs:
            if stage not in plan.todo[h]:
                continue
            if _ready(plan, h, stage, states) != "run":
                states[(h, stage)] = "cancelled"
                continue
            try:
                run_stage(stage, sweep.runs_root / h)
                states[(h, stage)] = "finished"
            except Exception:
                states[(h, stage)] = "failed"
    return states


def _local_child(stage: str, run_root: str, log: str, threads: int) -> None:
    """Body of one local task (a forked process): stdout/stderr to its log file."""
    if "torch" in sys.modules and "OMP_NUM_THREADS" not in os.environ:
        sys.modules["torch"].set_num_threads(threads)  # max_parallel tasks share the cores
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


def _run_local(sweep: Sweep, plan: Plan) -> dict[tuple[str, str], str]:
    """Process pool: one process per (run, stage), at most ``max_parallel`` at once.

    Processes are forked where the OS allows (the parent has already imported torch and
    the core; a fresh interpreter would pay that import per task), else spawned.
    """
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    waiting = [(h, stage) for h in plan.runs for stage in plan.todo[h]]
    running: dict = {}  # process -> (run_hash, stage)
    states: dict[tuple[str, str], str] = {}
    while waiting or running:
        for task in list(waiting):
            if len(running) >= sweep.spec.max_parallel:
                break
            verdict = _ready(plan, *task, states)
            if verdict == "cancel":
                states[task] = "cancelled"
                waiting.remove(task)
            elif verdict == "run":
                h, stage = task
                root = sweep.runs_root / h
                log = root / "logs" / f"{stage}.attempt{next_attempt(root, stage)}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                threads = max(1, (os.cpu_count() or 1) // sweep.spec.max_parallel)
                proc = ctx.Process(target=_local_child, args=(stage, str(root), str(log), threads), daemon=False)
                proc.start()
                running[proc] = task
                waiting.remove(task)
        for proc in [p for p in running if not p.is_alive()]:
            proc.join()
            states[running.pop(proc)] = "finished" if proc.exitcode == 0 else "failed"
        if running:
            time.sleep(0.05)
    return states
