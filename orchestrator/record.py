"""Batched database writes of a submission: a few statements per 500 runs, not per run.

* :func:`record_runs` — create/update the sweep, its runs (with params) and their stages
  (``pending``) before anything is handed to an executor;
* :func:`mark_queued` — (run, stage) pairs queued, with their job ids, right after the
  executor accepted their array;
* :func:`set_states` — final/other states from a refresh (``{(run_hash, stage): (status, error)}``).

Each re-derives the runs' ``status`` from their stages (:func:`orchestrator.db.store.run_status`),
like :meth:`~orchestrator.db.store.Store.set_stage_state` does for one stage.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from orchestrator.db.configs import config_delta, flatten
from orchestrator.db.models import Param, Run, RunStage, param_columns, utcnow
from orchestrator.db.store import run_status, sweep_bases, sweep_id
from orchestrator.stages import next_attempt

CHUNK = 500  # bound on IN (...) lists


def _chunks(items: list, n: int = CHUNK) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


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
            conn.execute(insert(Run.__table__), [dict(run_hash=h, sweep_id=sid, config=runs[h][0], status="pending",
                                               config_delta=config_delta(flats[h], base), executor=executor,
                                               attempts=0, created_at=now) for h in part])
    old = [ids[h] for h in runs if h in ids]
    for part in _chunks(old):
        conn.execute(update(Run.__table__).where(Run.__table__.c.id.in_(part)).values(executor=executor))
    ids = run_ids(session, runs)
    params = [dict(run_id=ids[h], key=k, **param_columns(v)) for h, (_, p) in runs.items() for k, v in p.items()]
    for part in _chunks(old):
        session.execute(delete(Param).where(Param.run_id.in_(part)))
    for part in _chunks(params, 5000):
        conn.execute(insert(Param.__table__), part)
    known = set()
    for part in _chunks(list(ids.values())):
        known.update(session.execute(select(RunStage.run_id, RunStage.stage).where(RunStage.run_id.in_(part))).all())
    missing = [dict(run_id=i, stage=st, status="pending") for i in ids.values() for st in stages
               if (i, st) not in known]
    for part in _chunks(missing, 5000):
        conn.execute(insert(RunStage.__table__), part)
    return ids


def bulk_update(session: Session, model, rows: list[dict]) -> None:
    """UPDATE rows by primary key ``id``: one Core executemany per set of keys (the ORM's bulk
    update by primary key costs ~4x more per row)."""
    table = model.__table__
    by_keys: dict[tuple, list] = {}
    for r in rows:
        by_keys.setdefault(tuple(sorted(r)), []).append(r)
    conn = session.connection()
    for keys, group in by_keys.items():
        stmt = (update(table).where(table.c.id == bindparam("b_id"))
                .values({k: bindparam(f"b_{k}") for k in keys if k != "id"}))
        conn.execute(stmt, [{f"b_{k}": v for k, v in r.items()} for r in group])


def refresh_run_statuses(session: Session, ids: Iterable[int], last: Mapping[int, dict] | None = None) -> None:
    """Re-derive ``runs.status`` of ``ids`` from their stages; ``last`` adds per-run columns
    (stage, slurm ids, attempts) to the same update."""
    ids = sorted(set(ids))
    statuses: dict[int, list[str]] = {}
    for part in _chunks(ids):
        for rid, st in session.execute(select(RunStage.run_id, RunStage.status).where(RunStage.run_id.in_(part))):
            statuses.setdefault(rid, []).append(st)
    bulk_update(session, Run, [{"id": rid, "status": run_status(statuses.get(rid, [])), **((last or {}).get(rid) or {})}
                               for rid in ids])


def stage_rows(session: Session, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, int, str]]:
    """(run_hash, stage) -> (run_stage id, run id, status) for the pairs in the database."""
    pairs = set(pairs)
    out = {}
    for part in _chunks(sorted({h for h, _ in pairs})):
        q = (select(Run.run_hash, RunStage.stage, RunStage.id, Run.id, RunStage.status)
             .join(RunStage, RunStage.run_id == Run.id).where(Run.run_hash.in_(part)))
        for h, st, sid, rid, status in session.execute(q):
            if (h, st) in pairs:
                out[(h, st)] = (sid, rid, status)
    return out


def mark_queued(session: Session, runs_root: Path, items: list[tuple[str, str, str | None]],
                only_if: tuple[str, ...] | None = None) -> int:
    """Mark (run_hash, stage, job id or None) queued; ``only_if``: skip stages in other states.

    The attempt recorded is the one the job will write (1 + the highest result file).
    Returns how many stages were marked.
    """
    rows = stage_rows(session, [(h, st) for h, st, _ in items])
    updates, last, root = [], {}, str(runs_root)
    for h, st, jid in items:
        if (h, st) not in rows or (only_if is not None and rows[(h, st)][2] not in only_if):
            continue
        sid, rid, _ = rows[(h, st)]
        # a new run has no results/ yet (checked with one stat, no Path objects: 2,000 stages)
        attempt = next_attempt(runs_root / h, st) if os.path.isdir(os.path.join(root, h, "results")) else 1
        updates.append({"id": sid, "status": "queued", "attempt": attempt, "slurm_job_id": jid, "error_tail": None})
        prev = last.get(rid, {"attempts": 0})
        last[rid] = {"stage": st, "slurm_job_id": jid, "slurm_array_id": jid.split("_")[0] if jid else None,
                     "attempts": max(prev["attempts"], attempt)}
    if updates:
        bulk_update(session, RunStage, updates)
        refresh_run_statuses(session, last, last)
    return len(updates)


def set_states(session: Session, states: Mapping[tuple[str, str], tuple[str, str | None]]) -> None:
    """Set (run_hash, stage) -> (status, error tail or None) for stages in the database."""
    rows = stage_rows(session, states)
    updates, last = [], {}
    for key, (status, err) in states.items():
        if key not in rows:
            continue
        sid, rid, _ = rows[key]
        row = {"id": sid, "status": status, "error_tail": err}
        if status == "running":
            row["started_at"] = utcnow()
        updates.append(row)
        last[rid] = {"stage": key[1], **({"error_tail": err} if err else {})}
    bulk_update(session, RunStage, updates)
    if last:
        refresh_run_statuses(session, last, last)
