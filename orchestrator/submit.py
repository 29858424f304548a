"""Submit a validated sweep: decide what to run, record it, hand it to an executor.

The executors (:mod:`orchestrator.executors`: ``slurm``, ``local``, ``debug``) know how to run
a plan; this module decides *what* to run and records it:

1. reconcile what exists (:func:`orchestrator.reconcile.refresh_states`: journals of crashed
   submissions, result files, Slurm states);
2. plan: per run and stage ``reuse`` / ``run`` / ``re-run`` / ``extend`` by stage identity
   (:func:`orchestrator.decide.plan_steps`), grouped into arrays (:func:`~orchestrator.plan.build_plan`);
3. record: every run directory (``config.yaml``, ``run.json``) and every run with its stages'
   identities, directories and sources (pending; :meth:`~orchestrator.db.store.Store.record_plan`);
4. journal the arrays, hand them over (sbatch), marking each array queued right after the
   executor accepted it.

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

from orchestrator import executors
from orchestrator.executors.base import Executor
from orchestrator.db.store import Store
from orchestrator.adopt import adopt
from orchestrator.decide import plan_steps, todo_of, upstream_of
from orchestrator.plan import Plan, build_plan
from orchestrator.reconcile import (ACTIVE, JOURNALS, Journal, cancel_sweep, ingest_dir,  # noqa: F401 (API)
                                    refresh_states, stored_spec, wait_for_sweep)
from orchestrator.stages import queued_states
from orchestrator.sweep import RunSpec, Sweep, SweepFile, build_sweep, load_sweep

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


def sweep_yaml(sweep: Sweep) -> str:
    """The sweep spec as stored in the database, with ``runs_dir`` made absolute."""
    d = sweep.spec.model_dump(mode="json")
    d["runs_dir"] = str(sweep.runs_root.parent)
    return yaml.safe_dump(d, sort_keys=False)


def stored_sweep(store: Store, name: str) -> SweepFile | None:
    """The sweep file stored at submission (retry without the file)."""
    spec = stored_spec(store, name)
    return SweepFile.model_validate(spec) if spec else None


def write_run_dirs(sweep: Sweep, plan: Plan, executor: str, configs: dict[str, dict]) -> None:
    """``config.yaml`` + ``run.json`` per run: all a job reads (it pickles only the path).
    ``run.json`` names where reused parents live (``upstream``) and what an extended stage
    continues (``extend_from``)."""
    stage_params = {name: st.params for name, st in sweep.spec.stages.items()}
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
        steps = plan.steps.get(h, {})
        upstream = upstream_of(steps, root)
        if upstream:
            meta["upstream"] = upstream
        extend = {st: s.extend_from for st, s in steps.items() if s.action == "extend"}
        if extend:
            meta["extend_from"] = extend
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
        return SubmitResult(plan=make_plan(store, sweep, ex, runs, retry)[0], executor=name)
    with _submission_lock(sweep.runs_root):  # one submitter per sweep directory at a time
        refresh_states(store, sweep.name, sweep.runs_root)  # 1. reconcile what exists
        adopt(store)  # rows written before stage identities (orchestrate db upgrade does it too)
        plan, configs, known = make_plan(store, sweep, ex, runs, retry)  # 2. plan
        result = SubmitResult(plan=plan, executor=name)
        if plan.runs or any(h not in known for h in plan.steps):
            _submit(store, sweep, ex, plan, configs, known, result)  # 3. record, 4. journal + sbatch
    if wait and not ex.blocking:
        wait_for_sweep(store, sweep.name, poll_s=poll_s, timeout_s=timeout_s, runs_root=sweep.runs_root)
    return result


def make_plan(store: Store | None, sweep: Sweep, ex: Executor, runs: list[RunSpec],
              retry: bool) -> tuple[Plan, dict[str, dict], set[str]]:
    """Step 2: (the plan, run_hash -> config dict, run hashes already in the database)."""
    runs, steps, configs, known = plan_steps(store, sweep, runs, retry=retry, allow_active=not ex.blocking)
    return build_plan(sweep, todo_of(steps), runs, ex.max_array_size(), steps), configs, known


def _submit(store: Store, sweep: Sweep, ex: Executor, plan: Plan, configs: dict, known: set[str],
            result: SubmitResult) -> None:
    """Steps 3-4 of the module docstring."""
    from orchestrator.executors.slurm import job_name

    _preflight(sweep)
    write_run_dirs(sweep, plan, ex.name, configs)
    new = [h for h in plan.steps if h not in known and h not in plan.runs]  # new grid points made of reused stages
    runs = {h: (configs[h], _scalar(r.params)) for h, r in plan.runs.items()}
    runs.update((h, (configs[h], _scalar(plan.considered[h].params))) for h in new)
    store.record_plan(sweep.name, sweep_yaml(sweep), runs, ex.name, sweep.stage_order, plan.steps)
    if not plan.runs:
        return
    # parents in flight from earlier submissions (reused: the job of the run that holds them)
    external = {(h, st): s.job_id for h, mine in plan.steps.items() for st, s in mine.items() if s.job_id}
    journal = Journal(sweep.runs_root, ex.name)
    runs_root = sweep.runs_root

    def on_queued(arr, ids: dict[str, str]) -> None:
        store.set_states(queued_states(runs_root, [(h, arr.stage, ids.get(h)) for h in arr.runs]))

    waves = [plan] if not ex.blocking else _waves(sweep, plan, ex.max_array_size())
    journal.write([{"index": a.index, "stage": a.stage, "runs": a.runs,
                    "name": job_name(sweep.name, a.stage, journal.id, a.index)} for w in waves for a in w.arrays])
    try:
        for i, wave in enumerate(waves):
            if i and ex.blocking:  # a wave whose shared parent failed does not start
                _cancel_orphans(wave, result.states)
            out = ex.submit(sweep, wave, on_queued, external, journal.id)
            if ex.blocking:
                result.states.update(out)
            else:
                result.job_ids = out
    except executors.SubmissionRefused:
        journal.close()  # every accepted array is recorded; nothing else was handed over
        raise
    if ex.blocking:
        ingest_dir(store, sweep.runs_root)
        # stages that never ran because a parent failed
        store.set_states({k: {"status": "cancelled"} for k, st in result.states.items() if st == "cancelled"})
    journal.close()


def _waves(sweep: Sweep, plan: Plan, max_array_size: int) -> list[Plan]:
    """A blocking executor runs a plan in waves: a stage whose parent another run produces
    (``shared``) waits for the wave that produces it (Slurm gets one plan: array dependencies)."""
    level: dict[tuple[str, str], int] = {}
    for st in sweep.stage_order:
        for h, stages in plan.todo.items():
            if st in stages:
                deps = [(plan.steps[h][n].source, 1) if plan.steps[h][n].action == "shared" else ((h, n), 0)
                        for n in plan.stage_needs[st]]
                level[(h, st)] = max([level[p] + d for p, d in deps if p in level] or [0])
    if not any(level.values()):
        return [plan]
    waves = []
    for k in range(max(level.values()) + 1):
        todo = {h: [st for st in stages if level[(h, st)] == k] for h, stages in plan.todo.items()}
        wave = build_plan(sweep, todo, list(plan.runs.values()), max_array_size, plan.steps)
        for a in wave.arrays:
            a.index += sum(len(w.arrays) for w in waves)
        waves.append(wave)
    return waves


def _cancel_orphans(wave: Plan, states: dict) -> None:
    """Drop (and report cancelled) the stages of ``wave`` whose shared parent did not finish."""
    for h, mine in wave.steps.items():
        if h not in wave.todo:
            continue
        for st in list(wave.todo[h]):
            for n in wave.stage_needs[st]:
                step = mine[n]
                src = step.source if step.action == "shared" else (h, n)
                if src in states and states[src] != "finished" or (h, n) in states and states[(h, n)] != "finished":
                    wave.todo[h].remove(st)
                    states[(h, st)] = "cancelled"
                    break


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
