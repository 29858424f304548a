"""Decide, per run and stage, what a submission does: ``reuse``, ``run``, ``re-run`` or ``extend``.

Each stage of each run has an identity (:mod:`orchestrator.identity`).  Against what the
database knows (:func:`known_stages`: the grid point's own rows, found by run key, and every
stage result by identity, in any run of any sweep), a stage is

* ``reuse``: a result with this identity is finished (or, on Slurm, queued/running: the
  dependants wait for its job) — in this run's directory or another run's, of any sweep;
* ``extend``: the generator with this identity finished shorter than asked: the stage runs
  again in this run's directory, continuing from that result's last checkpoint, and evaluates
  only the new points (its learning rate does not depend on the total steps);
* ``re-run``: this grid point had the stage with other inputs (a changed key, a new file
  hash, a protocol version), or a retry of a failed stage; the reason says which;
* ``run``: nothing like it exists yet; or ``shared``: another run of this plan runs it.

Runs with a failed/cancelled stage are left to ``retry``; runs with a stage in flight are
left alone by blocking executors (local/debug).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import literal, select

from orchestrator.db.models import Param, Run, RunStage, Sweep as SweepRow
from orchestrator.db.store import Store
from orchestrator.identity import StageKey, canonical, digest, stage_keys, why_different
from orchestrator.sweep import RunSpec, Sweep

ACTIVE = ("queued", "running", "preempted")  # submitted and not over: never submit twice
REDO = ("failed", "cancelled")
CHUNK = 500


@dataclass
class Step:
    """One (run, stage) of a plan."""

    action: str  # reuse | shared | run | re-run | extend | active (in flight) | skip
    reason: str
    identity: str
    dir: str  # where the result is (reuse) or will be written
    key: StageKey = field(repr=False, default=None)
    source: tuple[str, str] | None = None  # (run_hash, stage) whose row holds the result, if another run's
    sweep: str | None = None  # sweep of the reused result
    job_id: str | None = None  # reuse of a stage in flight: its Slurm job
    extend_from: str | None = None  # extend: the directory whose last checkpoint it continues

    @property
    def runs_here(self) -> bool:
        return self.action in ("run", "re-run", "extend")

    def to_dict(self) -> dict:
        d = {"action": self.action, "reason": self.reason, "identity": self.identity, "dir": self.dir}
        if self.source:
            d["from_run"], d["from_sweep"] = self.source[0], self.sweep
        if self.extend_from:
            d["extend_from"] = self.extend_from
        return d


@dataclass
class Row:
    id: int
    run_hash: str
    stage: str
    status: str
    identity: str | None
    dir: str | None
    inputs: dict | None
    length: dict | None
    source_id: int | None
    job_id: str | None
    sweep: str


def _chunks(items: list, n: int = CHUNK):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def grid_points(session, sweep: str) -> dict[str, str]:
    """Axis values (canonical JSON) -> the latest run of ``sweep`` at that grid point: the
    earlier version of a run whose config changed (the plan's re-run reasons)."""
    out: dict[int, dict] = {}
    q = (select(Run.id, Run.run_hash, Param.key, Param.kind, Param.value_float, Param.value_int, Param.value_str,
                Param.value_bool).join(SweepRow, SweepRow.id == Run.sweep_id).outerjoin(Param, Param.run_id == Run.id)
         .where(SweepRow.name == sweep).order_by(Run.id))
    hashes = {}
    for rid, h, key, kind, *values in session.execute(q):
        hashes[rid] = h
        if key is not None:
            out.setdefault(rid, {})[key] = None if kind == "null" else values[("float", "int", "str", "bool").index(kind)]
    return {point_key(out.get(rid, {})): h for rid, h in sorted(hashes.items())}


def point_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def known_stages(store: Store, run_keys: set[str], identities: set[str], earlier: dict[str, str | None]
                 ) -> tuple[dict[str, str], dict[str, str | None], dict[tuple[str, str], Row], dict[str, list[Row]],
                            dict[int, Row]]:
    """What the database knows of these runs and stage identities: (run_key -> run_hash, new
    run_key -> the run hash of its grid point's earlier version (``earlier``: run_key -> axis
    values as JSON), (run_hash, stage) -> own row, identity -> result rows, id -> row).
    ``inputs`` are not read here (JSON of every stage: the plan reads them only for re-runs)."""
    cols = (RunStage.id, Run.run_hash, RunStage.stage, RunStage.status, RunStage.identity, RunStage.dir,
            literal(None), RunStage.length, RunStage.source_id, RunStage.slurm_job_id, SweepRow.name)
    base = select(*cols).join(Run, Run.id == RunStage.run_id).join(SweepRow, SweepRow.id == Run.sweep_id)
    keys: dict[str, str] = {}
    own: dict[tuple[str, str], Row] = {}
    by_identity: dict[str, list[Row]] = {}
    by_id: dict[int, Row] = {}
    with store.session() as s:
        for part in _chunks(sorted(run_keys)):
            for key, h in s.execute(select(Run.run_key, Run.run_hash).where(Run.run_key.in_(part)).order_by(Run.id)):
                keys.setdefault(key, h)
        new = {k: v for k, v in earlier.items() if k not in keys}
        previous: dict[str, str | None] = {}
        if new:  # grid points whose config changed: their earlier version explains the re-runs
            points = grid_points(s, next(iter(new.values()))[0]) if new else {}
            previous = {k: points.get(point) for k, (_, point) in new.items()}
        for part in _chunks(sorted(set(keys.values()) | {h for h in previous.values() if h})):
            for r in s.execute(base.where(Run.run_hash.in_(part))):
                row = Row(*r)
                own[(row.run_hash, row.stage)] = by_id[row.id] = row
        for part in _chunks(sorted(identities)):
            for r in s.execute(base.where(RunStage.identity.in_(part), RunStage.source_id.is_(None))):
                row = by_id.get(r[0]) or Row(*r)
                by_identity.setdefault(row.identity, []).append(row)
                by_id[row.id] = row
        sources = {r.source_id for r in own.values() if r.source_id is not None} - by_id.keys()
        for part in _chunks(sorted(sources)):
            for r in s.execute(base.where(RunStage.id.in_(part))):
                by_id[r[0]] = Row(*r)
    return keys, previous, own, by_identity, by_id


def load_inputs(store: Store, rows: list[Row]) -> None:
    """Fill ``inputs`` of ``rows`` (the stages a plan re-runs: their reasons)."""
    by_id = {r.id: r for r in rows}
    with store.session() as s:
        for part in _chunks(sorted(by_id)):
            for i, inputs in s.execute(select(RunStage.id, RunStage.inputs).where(RunStage.id.in_(part))):
                by_id[i].inputs = inputs


def _extendable(done: dict | None, want: dict) -> str | None:
    """Why a result of length ``done`` can be continued to ``want`` (None: it cannot)."""
    if not done or "generator.steps" not in want:
        return None
    old_steps, new_steps = done.get("generator.steps", 0), want["generator.steps"]
    old_at = set(done.get("generator.eval_at", [])) | {old_steps}
    new_at = set(want.get("generator.eval_at", [])) | {new_steps}
    if new_steps < old_steps or any(p <= old_steps and p not in old_at for p in new_at):
        return None  # shorter, or a new evaluation point before the last checkpoint
    fresh = sorted(p for p in new_at if p > old_steps)
    return f"continues from step {old_steps} to {new_steps}, evaluates at {fresh}"


def _best(rows: list[Row], want: dict, allow_active: bool) -> tuple[Row | None, str | None]:
    """A result to reuse (exact length) or extend among rows of one identity."""
    finished = [r for r in rows if r.status == "finished"]
    for r in finished:
        if (r.length or {}) == want:
            return r, None
    for r in finished:
        why = _extendable(r.length, want)
        if why:
            return r, why
    if allow_active:
        for r in rows:
            if r.status in ACTIVE and (r.length or {}) == want:
                return r, None
    return None, None


def plan_steps(store: Store | None, sweep: Sweep, runs: list[RunSpec], retry: bool = False,
               allow_active: bool = False
               ) -> tuple[list[RunSpec], dict[str, dict[str, Step]], dict[str, dict], set[str]]:
    """Steps of every run (see the module docstring).

    Returns (runs with their database run hash — a run recorded before stage identities keeps
    its directory —, run_hash -> {stage: Step}, run_hash -> config dict, run hashes already
    in the database).
    """
    order, spec = sweep.stage_order, sweep.spec
    needs = {s: list(spec.stages[s].needs) for s in order}
    params = {s: spec.stages[s].params for s in order}
    trees, keys, run_keys = {}, {}, {}
    for r in runs:
        tree = r.config_dict()
        flat = r.canon if r.canon is not None else canonical(tree)
        trees[r.run_hash] = tree
        keys[r.run_hash] = stage_keys(flat, tree, order, needs, params)
        # = r.run_hash for a grid point; a retry of a run recorded before 0005 carries its old hash
        run_keys[r.run_hash] = r.run_hash if r.canon is not None else digest(flat)
    if store is not None:
        earlier = {run_keys[r.run_hash]: (sweep.name, point_key(_scalar(r.params))) for r in runs}
        by_key, previous, own, by_identity, by_id = known_stages(
            store, set(run_keys.values()), {k.identity for ks in keys.values() for k in ks.values()}, earlier)
    else:
        by_key, previous, own, by_identity, by_id = {}, {}, {}, {}, {}
    known = set(by_key.values())
    if own:  # inputs of the stages whose identity moved: the reasons of their re-runs
        moved = [row for r in runs for st in order
                 for row in [own.get((by_key.get(run_keys[r.run_hash]) or previous.get(run_keys[r.run_hash]), st))]
                 if row is not None and row.identity != keys[r.run_hash][st].identity]
        if moved:
            load_inputs(store, moved)
    runs_root = sweep.runs_root
    out_runs: list[RunSpec] = []
    steps: dict[str, dict[str, Step]] = {}
    configs: dict[str, dict] = {}
    planned: dict[str, tuple[str, str]] = {}  # identity -> (run_hash, stage) running it in this plan
    for r in runs:
        h = by_key.get(run_keys[r.run_hash], r.run_hash)
        prev = previous.get(run_keys[r.run_hash])
        if h != r.run_hash:
            keys[h], trees[h] = keys.pop(r.run_hash), trees.pop(r.run_hash)
            r = replace(r, run_hash=h)
        out_runs.append(r)
        configs[h] = trees[h]
        mine: dict[str, Step] = {}
        own_states = {st: own[(h, st)] for st in order if (h, st) in own}
        failed = {st for st, row in own_states.items() if row.status in REDO}
        busy = any(row.status in ACTIVE for row in own_states.values())
        for st in order:
            mine[st] = _step(st, keys[h][st], own_states.get(st), mine, needs[st], h, runs_root, by_id,
                             by_identity, planned, retry, failed, busy, allow_active, own.get((prev, st)))
            if mine[st].runs_here:
                planned.setdefault(mine[st].identity, (h, st))
        steps[h] = mine
    return out_runs, steps, configs, known


def _step(st: str, k: StageKey, row: Row | None, mine: dict[str, Step], needs: list[str], h: str, runs_root: Path,
          by_id: dict[int, Row], by_identity: dict[str, list[Row]], planned: dict[str, tuple[str, str]],
          retry: bool, failed: set[str], busy: bool, allow_active: bool, earlier: Row | None = None) -> Step:
    """The step of stage ``st`` of run ``h`` (``row``: its own database row, if any; ``earlier``:
    the stage of the grid point's earlier version, when its config changed)."""
    here = f"{runs_root}/{h}/{st}"  # str, not Path: 2,000 steps
    upstream_runs = any(mine[n].runs_here for n in needs)
    if row is not None and row.source_id is not None and row.source_id in by_id:
        row = by_id[row.source_id]  # a reused stage: judge by the result it points at
    same = row is not None and row.identity == k.identity
    if same and row.status == "finished" and (row.length or {}) == k.length and not upstream_runs:
        return _reuse(k, row, h, st)
    if retry or failed:
        if retry and not busy and (st in failed or upstream_runs):
            return Step("re-run", "retry: failed or cancelled" if st in failed else "upstream re-runs",
                        k.identity, here, k)
        why = "a stage failed: `orchestrate retry`" if failed and not retry else "not retried"
        return Step("skip", row.status + ": " + why if row else why, k.identity, (row.dir if row else None) or here, k)
    if same and row.status in ACTIVE:
        if allow_active:
            return _reuse(k, row, h, st, active=True)
        return Step("active", f"{row.status} since an earlier submission", k.identity, row.dir or here, k)
    if busy and not allow_active:
        return Step("skip", "another stage of this run is in flight", k.identity, here, k)
    hit, extend = _best(by_identity.get(k.identity, []), k.length, allow_active) if not upstream_runs else (None, None)
    if hit is not None and extend is None:
        return _reuse(k, hit, h, st, active=hit.status != "finished")
    if hit is not None:
        return Step("extend", extend, k.identity, here, k, extend_from=hit.dir)
    if k.identity in planned and not upstream_runs:
        src = planned[k.identity]
        return Step("shared", f"run by {src[0]} in this plan", k.identity, str(runs_root / src[0] / st), k,
                    source=src)
    if row is not None and row.inputs and not same:
        return Step("re-run", why_different(row.inputs, k.inputs), k.identity, here, k)
    if same and row.status == "finished":  # same identity, other length, not extendable
        return Step("re-run", f"length {row.length} -> {k.length} cannot continue the finished one",
                    k.identity, here, k)
    if earlier is not None and earlier.inputs and earlier.identity != k.identity:
        return Step("re-run", why_different(earlier.inputs, k.inputs) + f" (was {earlier.run_hash})",
                    k.identity, here, k)
    return Step("run", "new", k.identity, here, k)


def _reuse(k: StageKey, row: Row, h: str, st: str, active: bool = False) -> Step:
    mine = row.run_hash == h and row.stage == st
    where = "this run" if mine else f"run {row.run_hash} of sweep {row.sweep}"
    what = f"{row.status} (job {row.job_id})" if active else "finished"
    return Step("reuse", f"{what} in {where}: {row.dir}", k.identity, row.dir or "", k,
                source=None if mine else (row.run_hash, row.stage), sweep=row.sweep,
                job_id=row.job_id if active else None)


def _scalar(params: dict) -> dict:
    """Axis values as recorded (``params`` table): non-scalars as text."""
    return {k: v if v is None or isinstance(v, (str, int, float, bool)) else str(v) for k, v in params.items()}


def todo_of(steps: dict[str, dict[str, Step]]) -> dict[str, list[str]]:
    """run_hash -> stages that run in this plan (dependency order)."""
    return {h: [st for st, s in mine.items() if s.runs_here] for h, mine in steps.items()}


def upstream_of(steps: dict[str, Step], run_dir: Path) -> dict[str, str]:
    """{stage: dir} of a run's stages whose result lives outside ``run_dir`` (``run.json``)."""
    return {st: s.dir for st, s in steps.items() if s.action in ("reuse", "shared") and s.dir
            and Path(s.dir) != run_dir / st}
