"""Submit a validated sweep: decide what to run, record it, hand it to an executor.

The executors (:mod:`orchestrator.executors`: ``slurm``, ``local``, ``debug``) know how to run
a plan; this module decides *what* to run and records it:

1. settle earlier submissions (:func:`orchestrator.reconcile.refresh_states`: journals of
   crashed submissions, result files, Slurm states);
2. :func:`decide` the stages still to run and :func:`~orchestrator.plan.build_plan` them;
3. write every run directory (``config.yaml``, ``run.json``), record the runs (pending);
4. write the submission's journal, then hand the arrays over, marking each array queued
   right after the executor accepted it.

A crash anywhere leaves a state the next ``submit``/``status`` completes without running any
run stage twice; an sbatch refusal stops the submission with one line naming the stage and
the option (:class:`~orchestrator.executors.SubmissionRefused`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.config import config_dict
from orchestrator import executors
from orchestrator.db.store import Store
from orchestrator.plan import Plan, build_plan, stages_to_run
from orchestrator.reconcile import (ACTIVE, JOURNALS, Journal, cancel_sweep, ingest_dir,  # noqa: F401 (API)
                                    refresh_states, stored_spec, wait_for_sweep)
from orchestrator.record import mark_queued, record_runs, set_states
from orchestrator.sweep import RunSpec, Sweep, SweepFile, build_sweep, load_sweep

REDO = ("failed", "cancelled")


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

    Raises :class:`orchestrator.errors.UsageError` for a database at an older schema revision
    (migrations never run implicitly: ``orchestrate db upgrade``).
    """
    from orchestrator.errors import UsageError
    from orchestrator.db.store import SchemaError

    store = Store(url)
    if store.current_revision() is None:
        store.upgrade()
    try:
        store.check_schema()
    except SchemaError as e:
        raise UsageError(str(e)) from None
    return store


def stage_info(store: Store, hashes: set[str]) -> dict[str, dict[str, tuple[str, str | None, str | None]]]:
    """run_hash -> {stage: (status, slurm job id, result file of its latest attempt)}.

    A run is identified by its config hash across sweeps: a config already run by another
    sweep is not run again (and its outputs are found where that sweep put them).
    """
    from sqlalchemy import select

    from orchestrator.db.models import IngestedFile, Run, RunStage
    from orchestrator.record import _chunks

    out: dict[str, dict] = {}
    files: dict[tuple[str, str], tuple[int, str]] = {}
    with store.session() as s:
        for part in _chunks(sorted(hashes)):
            q = (select(Run.run_hash, RunStage.stage, RunStage.status, RunStage.slurm_job_id)
                 .join(RunStage, RunStage.run_id == Run.id).where(Run.run_hash.in_(part)))
            for h, st, status, jid in s.execute(q):
                out.setdefault(h, {})[st] = (status, jid, None)
            q = select(IngestedFile.run_hash, IngestedFile.stage, IngestedFile.attempt, IngestedFile.path).where(
                IngestedFile.run_hash.in_(part))
            for h, st, attempt, path in s.execute(q):
                if files.get((h, st), (0, ""))[0] < attempt:
                    files[(h, st)] = (attempt, path)
    for (h, st), (_, path) in files.items():
        if st in out.get(h, {}):
            out[h][st] = out[h][st][:2] + (path,)
    return out


def decide(sweep: Sweep, known: dict[str, dict[str, str]], retry: bool = False,
           runs: list[RunSpec] | None = None, allow_active: bool = False) -> dict[str, list[str]]:
    """Stages to run per run hash (``known``: run_hash -> {stage: status}).

    ``submit``: stages never submitted (new runs, stages added to the sweep since, or the
    arrays a crashed/refused submission never handed over), for runs with nothing failed;
    with ``allow_active`` (Slurm: a child can depend on a queued parent job) also for runs
    with a queued/running stage, else those are left alone.  ``retry``: failed/cancelled
    stages and their dependants, for runs with nothing active.
    """
    needs = {s: sweep.spec.stages[s].needs for s in sweep.stage_order}
    todo: dict[str, list[str]] = {}
    for run in runs if runs is not None else sweep.runs:
        states = known.get(run.run_hash, {})
        active = any(v in ACTIVE for v in states.values())
        if active and (retry or not allow_active):
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
    """The sweep file stored at submission (retry without the file)."""
    spec = stored_spec(store, name)
    return SweepFile.model_validate(spec) if spec else None


def upstream_dirs(sweep: Sweep, plan: Plan, info: dict) -> dict[str, dict[str, str]]:
    """run_hash -> {stage: dir} for stages done before this plan whose results were written
    under another run directory (a run first run by another sweep)."""
    out: dict[str, dict[str, str]] = {}
    runs_root = sweep.runs_root  # resolved once (a property that resolves the path)
    for h in plan.runs:
        for stage, (status, _, path) in info.get(h, {}).items():
            if stage in plan.todo[h] or status != "finished" or not path:
                continue
            root = Path(path).resolve().parent.parent  # {run_root}/results/{stage}.attemptN.json
            if root != runs_root / h:
                out.setdefault(h, {})[stage] = str(root / stage)
    return out


def write_run_dirs(sweep: Sweep, plan: Plan, executor: str, configs: dict[str, dict],
                   upstream: dict[str, dict[str, str]] | None = None) -> None:
    """``config.yaml`` + ``run.json`` per run: all a job reads (it pickles only the path)."""
    stage_params = {name: st.params for name, st in sweep.spec.stages.items()}
    upstream = upstream or {}
    runs_root = sweep.runs_root
    for h, run in plan.runs.items():
        root = runs_root / h
        root.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: same file for every reader of config.yaml, ~20x faster to write than
        # yaml.dump (1,000 runs); plain writes, no fsync: the files exist before any job
        # that reads them (an fsync per run costs ~30 ms here, i.e. 30 s for 1,000 runs)
        (root / "config.yaml").write_text(json.dumps(configs[h]) + "\n")
        meta = {"run_hash": h, "sweep": sweep.name, "params": _scalar(run.params), "label": run.label,
                "executor": executor, "stages": stage_params}
        if h in upstream:
            meta["upstream"] = upstream[h]
        (root / "run.json").write_text(json.dumps(meta))


def _scalar(params: dict) -> dict:
    return {k: v if v is None or isinstance(v, (str, int, float, bool)) else str(v) for k, v in params.items()}


def _preflight(sweep: Sweep) -> None:
    """The paths the runs will read (:func:`orchestrator.preflight.preflight`), checked before
    anything is written or handed over: errors -> UsageError (exit 2), warnings -> stderr."""
    import sys

    from orchestrator.errors import UsageError
    from orchestrator.preflight import preflight

    problems = preflight(sweep)
    errors = [p for p in problems if p.level == "error"]
    for p in problems:
        if p.level != "error":
            print(f"orchestrate: {sweep.path}: {p}", file=sys.stderr)
    if errors:
        raise UsageError(f"preflight of {sweep.path} failed ({len(errors)} problems; nothing was submitted):\n"
                         + "\n".join(f"{sweep.path}: {p}" for p in errors))


def submit_sweep(store: Store | None, sweep: Sweep, executor: str | None = None, dry_run: bool = False,
                 wait: bool = False, retry: bool = False, runs: list[RunSpec] | None = None,
                 poll_s: float = 2.0, timeout_s: float | None = None) -> SubmitResult:
    """Plan and submit ``sweep`` (see the module docstring).

    Parameters
    ----------
    store : results database (may be None only with ``dry_run``).
    executor : overrides the sweep file's ``executor``.
    retry : resubmit failed/cancelled stages (and their dependants) instead of new ones.
    runs : runs to consider (default: the sweep's grid; the search driver passes trials).
    wait : block until every submitted stage is over, then ingest (local/debug always do);
        ``timeout_s`` bounds the wait (TimeoutError).

    Raises
    ------
    orchestrator.executors.SubmissionRefused : the scheduler refused an array; the arrays
        before it stay queued and a fixed re-submission queues only the rest.
    """
    name = executor or sweep.spec.executor
    ex = executors.get(name)
    if runs is not None:
        runs = list({r.run_hash: r for r in runs}.values())  # two trials may land on one config
    runs = runs if runs is not None else sweep.runs
    if store is None or dry_run:
        return SubmitResult(plan=_plan(store, sweep, ex, runs, retry)[0], executor=name)
    with _submission_lock(sweep.runs_root):  # one submitter per sweep directory at a time
        refresh_states(store, sweep.name, sweep.runs_root)  # settle crashed submissions first
        plan, info = _plan(store, sweep, ex, runs, retry)
        result = SubmitResult(plan=plan, executor=name)
        if plan.runs:
            _submit(store, sweep, ex, plan, info, result)
    if wait and not ex.blocking:
        wait_for_sweep(store, sweep.name, poll_s=poll_s, timeout_s=timeout_s, runs_root=sweep.runs_root)
    return result


def _plan(store: Store | None, sweep: Sweep, ex: executors.Executor, runs: list[RunSpec], retry: bool):
    info = stage_info(store, {r.run_hash for r in runs}) if store is not None else {}
    known = {h: {st: v[0] for st, v in stages.items()} for h, stages in info.items()}
    todo = decide(sweep, known, retry=retry, runs=runs, allow_active=not ex.blocking)
    return build_plan(sweep, todo, runs, ex.max_array_size()), info


def _submit(store: Store, sweep: Sweep, ex: executors.Executor, plan: Plan, info: dict, result: SubmitResult) -> None:
    """Write run dirs, record runs, journal, hand over (steps 3-4 of the module docstring)."""
    from orchestrator.executors.slurm import job_name

    _preflight(sweep)
    configs = {h: config_dict(r.config) for h, r in plan.runs.items()}
    write_run_dirs(sweep, plan, ex.name, configs, upstream_dirs(sweep, plan, info))
    with store.session() as s:
        runs = {h: (configs[h], _scalar(r.params)) for h, r in plan.runs.items()}
        record_runs(s, sweep.name, sweep_yaml(sweep), runs, ex.name, sweep.stage_order)
    external = {(h, st): v[1] for h, stages in info.items() for st, v in stages.items() if v[0] in ACTIVE and v[1]}
    journal = Journal(sweep.runs_root, ex.name)
    journal.write([{"index": a.index, "stage": a.stage, "runs": a.runs,
                    "name": job_name(sweep.name, a.stage, journal.id, a.index)} for a in plan.arrays])

    runs_root = sweep.runs_root

    def on_queued(arr, ids: dict[str, str]) -> None:
        with store.session() as s:
            mark_queued(s, runs_root, [(h, arr.stage, ids.get(h)) for h in arr.runs])

    try:
        out = ex.submit(sweep, plan, on_queued, external, journal.id)
    except executors.SubmissionRefused:
        journal.close()  # every accepted array is recorded; nothing else was handed over
        raise
    if ex.blocking:
        result.states = out
        ingest_dir(store, sweep.runs_root)
        with store.session() as s:  # stages that never ran because a parent failed
            set_states(s, {k: ("cancelled", None) for k, st in out.items() if st == "cancelled"})
    else:
        result.job_ids = out
    journal.close()


@contextlib.contextmanager
def _submission_lock(runs_root: Path):
    """Block until this process is the only submitter of the sweep directory."""
    path = runs_root / JOURNALS / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def sweep_name(store: Store, arg: str) -> str:
    """A sweep named on the command line: a sweep file (its ``name``) or a name in the database."""
    if Path(arg).is_file():
        return yaml.safe_load(Path(arg).read_text())["name"]
    if arg in store.sweep_names():
        return arg
    raise LookupError(f"no sweep file or sweep named '{arg}' in {store.url} (known: {store.sweep_names()})")


def retry_sweep(store: Store, arg: str, executor: str | None = None, dry_run: bool = False,
                wait: bool = False, timeout_s: float | None = None) -> SubmitResult:
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
    return submit_sweep(store, sweep, executor=executor, dry_run=dry_run, wait=wait, retry=True, runs=runs,
                        timeout_s=timeout_s)
