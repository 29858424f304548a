"""Every database write of the orchestrator, as batched statements (a few per 500 runs, not
per run); :class:`orchestrator.db.store.Store` is their API (``store.record_plan``,
``store.set_states``, ...; its per-row methods are one-item calls of these), ingest loads
result files through the same run-status and mirroring functions.

* :func:`record_runs` / :func:`record_plan` — create/update a sweep's runs (params, stages
  ``pending``) and each stage's identity, inputs, length, directory and source (the row of
  another run whose result it reuses) before anything is handed to an executor;
* :func:`set_states` — stage states (queued with job ids and attempts, running, final);
* :func:`refresh_run_statuses` — a run's status and attempts, derived from its stages (the
  one place: :func:`run_status`);
* :func:`mirror_shared` — a reused stage mirrors the state of the row it points at.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from orchestrator.db.configs import config_delta, flatten
from orchestrator.db.models import STATUSES, Param, Run, RunStage, Sweep, param_columns, utcnow

CHUNK = 500  # bound on IN (...) lists


def _chunks(items: list, n: int = CHUNK) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def run_status(stage_statuses: Sequence[str]) -> str:
    """A run's status from its stages': a failure anywhere wins, then anything still active,
    and only all-finished is finished."""
    if not stage_statuses:
        return "pending"
    for s in ("failed", "cancelled", "preempted", "running", "queued", "pending"):
        if s in stage_statuses:
            return s
    return "finished"


def sweep_id(session: Session, name: str, spec_yaml: str | None = None, git_commit: str | None = None) -> int:
    """Id of sweep ``name`` in ``session``'s transaction, creating it if missing."""
    sweep = session.scalars(select(Sweep).where(Sweep.name == name)).one_or_none()
    if sweep is None:
        sweep = Sweep(name=name, spec_yaml=spec_yaml, git_commit=git_commit, created_at=utcnow())
        session.add(sweep)
    else:
        sweep.spec_yaml = spec_yaml if spec_yaml is not None else sweep.spec_yaml
        sweep.git_commit = git_commit if git_commit is not None else sweep.git_commit
    session.flush()
    return sweep.id


def sweep_bases(conn, candidates: Mapping[int, dict]) -> dict[int, dict]:
    """Base configs of sweeps ``candidates`` (sweep id -> flat config of a new run), setting
    each missing base from its candidate.  The conditional UPDATE makes the first writer win
    when two ingesters race (the loser re-reads the winner's base)."""
    for sid, flat in candidates.items():
        conn.execute(update(Sweep).where(Sweep.id == sid, Sweep.base_config.is_(None)).values(base_config=flat))
    rows = conn.execute(select(Sweep.id, Sweep.base_config).where(Sweep.id.in_(list(candidates))))
    return {sid: base for sid, base in rows}


def run_ids(session: Session, hashes: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in _chunks(sorted(set(hashes))):
        out.update(session.execute(select(Run.run_hash, Run.id).where(Run.run_hash.in_(part))).all())
    return out


def record_runs(session: Session, sweep: str, spec_yaml: str, runs: Mapping[str, tuple[dict, dict]],
                executor: str, stages: list[str]) -> dict[str, int]:
    """Create or update ``runs`` (run_hash -> (config dict, params)) in ``sweep``; returns their ids.

    A run already known (from this or another sweep: a config hash is one run) keeps its
    sweep and gets this executor, these params and any stage it lacks.
    """
    sid = sweep_id(session, sweep, spec_yaml)
    conn = session.connection()  # Core executemany: one statement per batch (ORM bulk inserts row by row)
    ids = run_ids(session, runs)
    new = [h for h in runs if h not in ids]
    if new:
        flats = {h: flatten(runs[h][0]) for h in new}
        base = sweep_bases(session.connection(), {sid: flats[new[0]]})[sid]
        now = utcnow()
        for part in _chunks(new):
            conn.execute(insert(Run.__table__), [dict(run_hash=h, run_key=h, sweep_id=sid, config=runs[h][0],
                                                      status="pending",
                                               config_delta=config_delta(flats[h], base), executor=executor,
                                               attempts=0, created_at=now) for h in part])
    old = [ids[h] for h in runs if h in ids]
    for part in _chunks(old) if executor is not None else ():
        conn.execute(update(Run.__table__).where(Run.__table__.c.id.in_(part)).values(executor=executor))
    ids = run_ids(session, runs)
    params = [dict(run_id=ids[h], key=k, **param_columns(v)) for h, (_, p) in runs.items() for k, v in p.items()]
    known = set(old)
    for part in _chunks([ids[h] for h in runs if runs[h][1] and ids[h] in known]):
        session.execute(delete(Param).where(Param.run_id.in_(part)))  # the new axis values replace the old
    for part in _chunks(params, 5000):
        conn.execute(insert(Param.__table__), part)
    known = set()
    for part in _chunks(list(ids.values())):
        known.update(session.execute(select(RunStage.run_id, RunStage.stage).where(RunStage.run_id.in_(part))).all())
    missing = [dict(run_id=i, stage=st, status="pending") for i in ids.values() for st in stages
               if (i, st) not in known]
    for part in _chunks(missing, 5000):
        conn.execute(insert(RunStage.__table__), part)
    grown = {m["run_id"] for m in missing} & set(old)
    if grown:  # a finished run with a stage added since is not finished any more
        refresh_run_statuses(session, grown)
    return ids


def record_plan(session: Session, sweep: str, spec_yaml: str | None, runs: Mapping[str, tuple[dict, dict]],
                executor: str | None, stages: list[str], steps: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """:func:`record_runs`, then each stage's identity / inputs / length / dir / source from the
    plan's steps (``orchestrator.decide.Step``); a reused stage takes its source's state.
    Returns run_hash -> run id."""
    ids = record_runs(session, sweep, spec_yaml, runs, executor, stages)
    pairs = [(h, st) for h, mine in steps.items() for st in mine]
    sources = [s.source for mine in steps.values() for s in mine.values() if s.source]
    rows = stage_rows(session, pairs + sources)
    updates, owners = [], set()
    for h, mine in steps.items():
        for st, step in mine.items():
            if (h, st) not in rows or step.action in ("skip", "active"):
                continue
            row = {"id": rows[(h, st)][0], "identity": step.identity, "inputs": step.key.inputs,
                   "length": step.key.length or None, "dir": step.dir, "source_id": None}
            if step.source and step.source in rows:
                row["source_id"] = rows[step.source][0]
                owners.add(row["source_id"])
            updates.append(row)
    bulk_update(session, RunStage, updates)
    if owners:
        mirror_shared(session.connection(), owners)
    return ids


def set_states(session: Session, states: Mapping[tuple[str, str], Mapping[str, Any]],
               only_if: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """Write stage states: ``{(run_hash, stage): {"status": ..., and any of "attempt",
    "slurm_job_id", "slurm_array_id", "error_tail"}}`` for stages in the database (``only_if``:
    only those now in one of these states).  The runs' ``stage`` / job ids / error follow the
    last change; their status and attempts are re-derived (:func:`refresh_run_statuses`);
    rows reusing these stages mirror them.  Returns the pairs written."""
    rows = stage_rows(session, states, lock=only_if is not None)
    updates, last, done = [], {}, []
    for key, f in states.items():
        if f["status"] not in STATUSES:
            raise ValueError(f"stage status {f['status']!r} not in {STATUSES}")
        if key not in rows or (only_if is not None and rows[key][2] not in only_if):
            continue
        sid, rid, _ = rows[key]
        row = {"id": sid, **{k: f[k] for k in ("status", "attempt", "slurm_job_id", "error_tail") if k in f}}
        if f["status"] == "running":
            row["started_at"] = utcnow()
        updates.append(row)
        run = last.setdefault(rid, {})
        run["stage"] = key[1]
        if f.get("error_tail"):
            run["error_tail"] = f["error_tail"]
        if "slurm_job_id" in f:
            jid = f["slurm_job_id"]
            run["slurm_job_id"] = jid
            run["slurm_array_id"] = f.get("slurm_array_id") or (jid.split("_")[0] if jid else None)
        elif f.get("slurm_array_id"):
            run["slurm_array_id"] = f["slurm_array_id"]
        done.append(key)
    bulk_update(session, RunStage, updates)
    if last:
        refresh_run_statuses(session, last, last)
        mirror_shared(session.connection(), [u["id"] for u in updates])
    return done


def stage_rows(session: Session, pairs: Iterable[tuple[str, str]],
               lock: bool = False) -> dict[tuple[str, str], tuple[int, int, str]]:
    """(run_hash, stage) -> (run_stage id, run id, status) for the pairs in the database.
    ``lock``: hold the stage rows until the transaction ends (PostgreSQL ``FOR UPDATE``; a
    SQLite write transaction already holds the database), so a status read here to decide a
    write (``only_if``) is still the status when the write lands."""
    pairs = set(pairs)
    out = {}
    for part in _chunks(sorted({h for h, _ in pairs})):
        q = (select(Run.run_hash, RunStage.stage, RunStage.id, Run.id, RunStage.status)
             .join(RunStage, RunStage.run_id == Run.id).where(Run.run_hash.in_(part)))
        if lock:
            q = q.with_for_update(of=RunStage)
        for h, st, sid, rid, status in session.execute(q):
            if (h, st) in pairs:
                out[(h, st)] = (sid, rid, status)
    return out


def refresh_run_statuses(session: Session, ids: Iterable[int], last: Mapping[int, dict] | None = None) -> None:
    """Re-derive ``runs.status`` (:func:`run_status`) and ``runs.attempts`` (the highest attempt
    of any stage) of ``ids`` from their stages; ``last`` adds per-run columns to the same update.
    The one place a run's status is derived (ingest and every write here call it)."""
    _refresh_statuses(session.connection(), ids, last)


def _refresh_statuses(conn, ids: Iterable[int], last: Mapping[int, dict] | None = None) -> None:
    ids = sorted(set(ids))
    statuses: dict[int, list[str]] = {}
    attempts: dict[int, int] = {}
    for part in _chunks(ids):
        q = select(RunStage.run_id, RunStage.status, RunStage.attempt).where(RunStage.run_id.in_(part))
        for rid, st, attempt in conn.execute(q):
            statuses.setdefault(rid, []).append(st)
            attempts[rid] = max(attempts.get(rid, 0), attempt or 0)
    _bulk_update(conn, Run, [{"id": rid, "status": run_status(statuses.get(rid, [])), "attempts": attempts.get(rid, 0),
                              **((last or {}).get(rid) or {})} for rid in ids])


def mirror_shared(conn, owner_ids: Iterable[int]) -> None:
    """Copy the state of stage rows ``owner_ids`` to the rows that reuse them (``source_id``)
    and re-derive those runs' status: a shared stage is recorded once and read everywhere."""
    owner_ids = sorted(set(owner_ids))
    cols = (RunStage.status, RunStage.attempt, RunStage.result_attempt, RunStage.slurm_job_id,
            RunStage.started_at, RunStage.ended_at, RunStage.error_tail)
    owners, mirrors = {}, []
    for part in _chunks(owner_ids):
        owners.update((r[0], r[1:]) for r in conn.execute(select(RunStage.id, *cols).where(RunStage.id.in_(part))))
        mirrors += conn.execute(select(RunStage.id, RunStage.run_id, RunStage.source_id)
                                .where(RunStage.source_id.in_(part))).all()
    if not mirrors:
        return
    names = [c.key for c in cols]
    _bulk_update(conn, RunStage, [{"id": i, **dict(zip(names, owners[src]))} for i, _, src in mirrors])
    _refresh_statuses(conn, {rid for _, rid, _ in mirrors})


def bulk_update(session: Session, model, rows: list[dict]) -> None:
    """UPDATE rows by primary key ``id``: one Core executemany per set of keys (the ORM's bulk
    update by primary key costs ~4x more per row)."""
    _bulk_update(session.connection(), model, rows)


def _bulk_update(conn, model, rows: list[dict]) -> None:
    table = model.__table__
    by_keys: dict[tuple, list] = {}
    for r in rows:
        by_keys.setdefault(tuple(sorted(r)), []).append(r)
    for keys, group in by_keys.items():
        stmt = (update(table).where(table.c.id == bindparam("b_id"))
                .values({k: bindparam(f"b_{k}") for k in keys if k != "id"}))
        conn.execute(stmt, [{f"b_{k}": v for k, v in r.items()} for r in group])
