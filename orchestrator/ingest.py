"""Load result files (``orchestrator.results``) into the database, idempotently.

* The same file twice changes nothing (``ingested_files.path`` is unique; so is
  (run_hash, stage, attempt) — a copy of a loaded file elsewhere is a duplicate too).
* A later attempt of a (run, stage) supersedes an earlier one: its metrics and artifacts
  replace the earlier attempt's.  An earlier attempt arriving after a later one is recorded
  but loads nothing.
* A truncated / malformed / hostile file (bad JSON, wrong types, an integer beyond 64 bits,
  a NUL character, NaN outside a metric value, deeper than 64 levels, over 64 MiB) is reported
  with its path and the reason, and skipped; the others load.
* A file already ingested from the same path with the same size is skipped unread (result
  files are immutable; ``status`` re-scans every run directory).
* Files are loaded in batch transactions for speed; if anything in a batch fails at the
  database level (e.g. a concurrent ingester inserted the same run), the batch is rolled
  back and its files are re-done one transaction each, so one bad file never costs others.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from sqlalchemy import Connection, String, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from orchestrator.db import fastjson
from orchestrator.db.configs import flatten, tree_delta, unflatten
from orchestrator.db.models import Artifact, IngestedFile, Metric, Param, Run, RunStage, Sweep, param_columns
from orchestrator.db.store import Store
from orchestrator.db.writes import mirror_shared, run_status, sweep_bases
from orchestrator.results import MAX_FILE_BYTES, ResultFileError, iter_result_files, parse_time, validate_payload

BATCH = 500  # files per transaction
_LONG_DIGITS = re.compile(rb"\d{19}")
ERROR_TAIL_CHARS = 4000


@dataclass
class IngestReport:
    """Outcome of one :func:`ingest` call.

    loaded: files newly recorded whose data is now the current data of their (run, stage);
    skipped_duplicate: files (or copies of files) already ingested;
    superseded: earlier attempts whose data a newer file replaced, plus files that arrived
        after a newer attempt of their (run, stage) had been loaded (recorded, nothing loaded);
    errors: (path, reason) of files that were skipped.
    """

    loaded: int = 0
    skipped_duplicate: int = 0
    superseded: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"loaded {self.loaded}, duplicates {self.skipped_duplicate}, "
                f"superseded {self.superseded}, errors {len(self.errors)}")


@dataclass
class _File:
    path: str
    sha256: str
    size: int
    payload: dict


def _read(path: Path) -> _File:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)  # never more than the cap in memory
    except OSError as e:
        raise ResultFileError(f"{path}: cannot read: {e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ResultFileError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB; not a result file")
    try:
        # orjson reads an integer beyond 64 bits as a float (silently): such text goes to the
        # stdlib parser, whose exact int the validator then refuses.
        payload = json.loads(data) if _LONG_DIGITS.search(data) else fastjson.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ResultFileError(f"{path}: not valid JSON (truncated?): {str(e)[:200]}") from None
    validate_payload(payload, str(path))
    return _File(str(path), hashlib.sha256(data).hexdigest(), len(data), payload)


def _utc(t: datetime | str) -> datetime:
    t = parse_time(t, "", "") if isinstance(t, str) else t
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # SQLite returns naive UTC times


def _error_tail(err: dict | None) -> str | None:
    if not err:
        return None
    head = ": ".join(str(err[k]) for k in ("type", "message") if err.get(k))
    text = "\n".join(x for x in (head, str(err.get("log_tail") or "")) if x)
    return text[-ERROR_TAIL_CHARS:] or None


def _chunks(seq: list, n: int = 500):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _rows_in(conn: Connection, stmt, column, values) -> list:
    """``stmt.where(column IN values)``, chunked (bound-parameter limits)."""
    out: list = []
    for chunk in _chunks(sorted(values)):
        out.extend(conn.execute(stmt.where(column.in_(chunk))).all())
    return out


METRIC_COLUMNS = ("run_id", "stage", "name", "value", "step", "backbone", "num_samples", "attempt", "source_file")


def _insert(conn: Connection, model, rows: list[dict] | list[tuple], columns: Sequence[str] | None = None) -> None:
    """Multi-row INSERT of dicts, or of tuples in the order of ``columns``.  On SQLite straight
    to the driver's executemany with the dialect's bind processors: SQLAlchemy's per-row
    parameter handling costs more than SQLite itself at 100k metric rows."""
    if not rows:
        return
    cols = list(columns) if columns is not None else list(rows[0])
    if conn.dialect.name != "sqlite":
        conn.execute(insert(model), rows if columns is None else [dict(zip(cols, r)) for r in rows])
        return
    table = model.__table__
    procs = [(i, p) for i, c in enumerate(cols) if (p := table.c[c].type._cached_bind_processor(conn.dialect))]
    values = [tuple(r.values()) for r in rows] if columns is None else rows
    if procs:
        values = [list(v) for v in values]
        for v in values:
            for i, p in procs:
                if v[i] is not None:
                    v[i] = p(v[i])
        values = [tuple(v) for v in values]
    sql = f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    conn.exec_driver_sql(sql, values)


def _load_files(conn: Connection, files: list[_File]) -> tuple[list[str], list[tuple[str, str]]]:
    """Load validated files in the caller's transaction with a fixed number of statements.

    Returns (outcome per file: loaded|superseded|stale|duplicate|conflict, conflicts as (path, reason)).
    """
    now = datetime.now(timezone.utc)
    pg = conn.dialect.name == "postgresql"

    # 1. Duplicates: already in the database, or twice in this batch.
    seen: dict[object, tuple[str, str]] = {}  # path or (run_hash, stage, attempt) -> (path, sha256)
    rows = _rows_in(conn, select(IngestedFile.path, IngestedFile.sha256, IngestedFile.run_hash,
                                 IngestedFile.stage, IngestedFile.attempt),
                    IngestedFile.run_hash, {f.payload["run_hash"] for f in files})
    rows += _rows_in(conn, select(IngestedFile.path, IngestedFile.sha256, IngestedFile.run_hash,
                                  IngestedFile.stage, IngestedFile.attempt),
                     IngestedFile.path, {f.path for f in files})
    for r in rows:
        seen[r.path] = seen[(r.run_hash, r.stage, r.attempt)] = (r.path, r.sha256)
    outcome: dict[int, str] = {}
    conflicts: list[tuple[str, str]] = []
    new: list[_File] = []
    for i, f in enumerate(files):
        p = f.payload
        key = (p["run_hash"], p["stage"], p["attempt"])
        prior = [seen[k] for k in (f.path, key) if k in seen]
        if prior:
            bad = [pp for pp, sha in prior if sha != f.sha256]
            if bad:
                outcome[i] = "conflict"
                conflicts.append((f.path, f"differs from the already ingested {bad[0]} (run {key[0]} stage "
                                          f"{key[1]} attempt {key[2]}); result files are immutable"))
            else:
                outcome[i] = "duplicate"
            continue
        seen[f.path] = seen[key] = (f.path, f.sha256)
        new.append(f)
    if not new:
        return [outcome[i] for i in range(len(files))], conflicts

    # 2. Sweeps and runs (created on first sight; a run's config and params come from its first file).
    names = {f.payload["sweep"] for f in new}
    sweep_ids = dict(_rows_in(conn, select(Sweep.name, Sweep.id), Sweep.name, names))
    if names - sweep_ids.keys():
        _insert(conn, Sweep, [dict(name=n, created_at=now) for n in sorted(names - sweep_ids.keys())])
        sweep_ids = dict(_rows_in(conn, select(Sweep.name, Sweep.id), Sweep.name, names))
    hashes = {f.payload["run_hash"] for f in new}
    run_cols = (Run.id, Run.run_hash, Run.attempts, Run.started_at, Run.ended_at, Run.git_commit, Run.executor,
                Run.slurm_job_id, Run.slurm_array_id, Run.error_tail)
    runs = {r.run_hash: r._asdict() for r in _rows_in(conn, select(*run_cols), Run.run_hash, hashes)}
    first = {}
    for f in new:
        first.setdefault(f.payload["run_hash"], f.payload)
    missing = sorted(hashes - runs.keys())
    if missing:
        # A new sweep's base config is the flat config of its first run (lowest hash) in the batch.
        candidate = {sweep_ids[first[h]["sweep"]]: h for h in reversed(missing)}
        bases = sweep_bases(conn, {sid: flatten(first[h]["config"]) for sid, h in candidate.items()})
        trees = {sid: unflatten(base) for sid, base in bases.items()}
        _insert(conn, Run, [dict(run_hash=h, sweep_id=sweep_ids[first[h]["sweep"]], config=first[h]["config"],
                                 config_delta=tree_delta(first[h]["config"], trees[sweep_ids[first[h]["sweep"]]]),
                                 status="pending", executor=first[h].get("executor"), attempts=0,
                                 created_at=now) for h in missing])
        runs = {r.run_hash: r._asdict() for r in _rows_in(conn, select(*run_cols), Run.run_hash, hashes)}
        params = [dict(run_id=runs[h]["id"], key=k, **param_columns(v))
                  for h in missing for k, v in first[h]["params"].items()]
        if params:
            _insert(conn, Param, params)

    # 3. Stage rows of these runs, locked (PostgreSQL) so that concurrent ingesters serialise on them.
    run_ids = {r["id"] for r in runs.values()}
    stage_q = select(RunStage.id, RunStage.run_id, RunStage.stage, RunStage.status, RunStage.attempt,
                     RunStage.result_attempt)
    if pg:
        stage_q = stage_q.with_for_update()
    stages = {(r.run_id, r.stage): r._asdict() for r in _rows_in(conn, stage_q, RunStage.run_id, run_ids)}
    want = {(runs[f.payload["run_hash"]]["id"], f.payload["stage"]) for f in new}
    if want - stages.keys():
        _insert(conn, RunStage, [dict(run_id=r, stage=s, status="pending") for r, s in sorted(want - stages.keys())])
        stages = {(r.run_id, r.stage): r._asdict() for r in _rows_in(conn, stage_q, RunStage.run_id, run_ids)}
    had_data = {k for k, st in stages.items() if st["result_attempt"] is not None}

    # 4. Decide, oldest attempt first: a newer attempt replaces an older one's data.
    winners: dict[tuple[int, str], _File] = {}
    touched_runs: dict[str, list[_File]] = {}
    index = {id(f): i for i, f in enumerate(files)}
    for f in sorted(new, key=lambda f: f.payload["attempt"]):
        p = f.payload
        key = (runs[p["run_hash"]]["id"], p["stage"])
        st = stages[key]
        current = st["result_attempt"]
        if current is not None and p["attempt"] <= current:
            outcome[index[id(f)]] = "stale"
            continue
        outcome[index[id(f)]] = "loaded" if current is None else "superseded"
        st["result_attempt"] = p["attempt"]
        # The submitter may already know a newer attempt (requeued, running): keep its state then.
        if st["attempt"] is None or p["attempt"] >= st["attempt"]:
            st["status"], st["attempt"] = p["status"], p["attempt"]
            st["slurm_job_id"] = p.get("slurm_job_id")
        winners[key] = f
        touched_runs.setdefault(p["run_hash"], []).append(f)

    # 5. Write: replace data of superseded stages, update stage and run rows, record files.
    if winners:
        gone = [dict(r=k[0], s=k[1]) for k in winners if k in had_data]
        if gone:
            conn.execute(delete(Metric).where(Metric.run_id == bindparam("r"), Metric.stage == bindparam("s")), gone)
            conn.execute(delete(Artifact).where(Artifact.run_id == bindparam("r"), Artifact.stage == bindparam("s")),
                         gone)
        # Tuples, not dicts: ~10 metric rows per file is the bulk of the insert.
        metrics = [(k[0], k[1], m["name"], m.get("value"), m.get("step"), m.get("backbone"), m.get("num_samples"),
                    f.payload["attempt"], f.path) for k, f in winners.items() for m in f.payload["metrics"]]
        _insert(conn, Metric, metrics, METRIC_COLUMNS)
        artifacts = [dict(run_id=k[0], stage=k[1], kind=a["kind"], path=a["path"], attempt=f.payload["attempt"])
                     for k, f in winners.items() for a in f.payload["artifacts"]]
        if artifacts:
            _insert(conn, Artifact, artifacts)
        conn.execute(
            update(RunStage).where(RunStage.id == bindparam("b_id")).values(
                status=bindparam("b_status"), attempt=bindparam("b_attempt"), result_attempt=bindparam("b_result"),
                slurm_job_id=func.coalesce(bindparam("b_job", type_=String), RunStage.slurm_job_id),
                host=bindparam("b_host"), started_at=bindparam("b_started"), ended_at=bindparam("b_ended"),
                error_tail=bindparam("b_error")),
            [dict(b_id=stages[k]["id"], b_status=stages[k]["status"], b_attempt=stages[k]["attempt"],
                  b_result=f.payload["attempt"], b_job=stages[k].get("slurm_job_id"), b_host=f.payload.get("host"),
                  b_started=_utc(f.payload["started_at"]), b_ended=_utc(f.payload["ended_at"]),
                  b_error=_error_tail(f.payload.get("error"))) for k, f in winners.items()])
        run_updates = []
        by_run: dict[int, list[str]] = {}
        for (rid, _), st in stages.items():
            by_run.setdefault(rid, []).append(st["status"])
        for h, fs in touched_runs.items():
            r = runs[h]
            for f in sorted(fs, key=lambda f: f.payload["ended_at"]):
                p = f.payload
                started, ended = _utc(p["started_at"]), _utc(p["ended_at"])
                r["stage"], r["host"] = p["stage"], p.get("host")
                r["attempts"] = max(r["attempts"] or 0, p["attempt"])
                r["started_at"] = min(_utc(r["started_at"]), started) if r["started_at"] else started
                r["ended_at"] = max(_utc(r["ended_at"]), ended) if r["ended_at"] else ended
                for k in ("git_commit", "executor", "slurm_job_id", "slurm_array_id"):
                    r[k] = p.get(k) or r[k]
                if p["status"] != "finished":
                    r["error_tail"] = _error_tail(p.get("error")) or r["error_tail"]
            status = run_status(by_run[r["id"]])
            run_updates.append({f"b_{k}": v for k, v in r.items() if k != "run_hash"} | {"b_status": status})
        conn.execute(update(Run).where(Run.id == bindparam("b_id")).values(
            {k: bindparam(f"b_{k}") for k in ("status", "stage", "host", "attempts", "started_at", "ended_at",
                                              "git_commit", "executor", "slurm_job_id", "slurm_array_id",
                                              "error_tail")}), run_updates)
        mirror_shared(conn, [stages[k]["id"] for k in winners])  # runs that reuse these stages
    _insert(conn, IngestedFile, [dict(path=f.path, sha256=f.sha256, size=f.size, run_hash=f.payload["run_hash"],
                                             stage=f.payload["stage"], attempt=f.payload["attempt"], ingested_at=now)
                                        for f in new])
    return [outcome[i] for i in range(len(files))], conflicts


def _count(report: IngestReport, outcomes: list[str], conflicts: list[tuple[str, str]]) -> None:
    for o in outcomes:
        if o == "duplicate":
            report.skipped_duplicate += 1
        elif o == "stale":
            report.superseded += 1
        elif o in ("loaded", "superseded"):
            report.loaded += 1
            report.superseded += o == "superseded"
    report.errors.extend(conflicts)


def _load_batch(store: Store, files: list[_File], report: IngestReport, retries: int = 5) -> None:
    """One transaction for the batch; on a database error, one transaction per file."""
    for attempt in range(retries if len(files) == 1 else 1):
        try:
            with store.engine.begin() as conn:
                outcomes, conflicts = _load_files(conn, files)
            _count(report, outcomes, conflicts)
            return
        except IntegrityError as e:  # a concurrent ingester inserted the same rows: retry sees them
            last = e
        except DBAPIError as e:
            last = e
            if len(files) == 1 and not _retryable(e):
                break
        except (ValueError, TypeError, OverflowError, UnicodeError) as e:  # a value the driver cannot bind
            last = e
            break
    if len(files) > 1:
        for f in files:
            _load_batch(store, [f], report, retries)
        return
    reason = str(getattr(last, "orig", None) or last).strip().splitlines() or [type(last).__name__]
    report.errors.append((files[0].path, f"cannot be stored: {reason[0][:300]}"))


def _retryable(e: DBAPIError) -> bool:
    # deadlock / serialization failure (PostgreSQL), database locked (SQLite past busy_timeout)
    return getattr(e.orig, "pgcode", None) in ("40P01", "40001") or "locked" in str(e.orig)


def _known_sizes(store: Store, files: list[Path]) -> dict[str, int]:
    """Sizes of the already-ingested files among ``files`` (one query per 500 paths)."""
    out: dict[str, int] = {}
    with store.engine.connect() as conn:
        for r in _rows_in(conn, select(IngestedFile.path, IngestedFile.size), IngestedFile.path,
                          {str(f) for f in files}):
            out[r.path] = r.size
    return out


def ingest(store: Store, paths: Iterable[str | Path], batch_size: int = BATCH) -> IngestReport:
    """Load result files (files, or directories searched for ``*/results/*.attemptN.json``).

    The schema must be current (:meth:`Store.check_schema`); the CLI upgrades first.
    Returns an :class:`IngestReport`; malformed files are listed in ``errors`` and skipped.
    A file already ingested from the same path with the same size is counted as a duplicate
    without being read (result files are immutable; ``status`` re-scans every run often).
    """
    store.check_schema()
    report = IngestReport()
    files = iter_result_files(list(paths))
    known = _known_sizes(store, files)
    batch: list[_File] = []
    for path in files:
        size = known.get(str(path))
        if size is not None:
            try:
                if path.stat().st_size == size:
                    report.skipped_duplicate += 1
                    continue
            except OSError:
                pass  # _read reports it
        try:
            batch.append(_read(path))
        except ResultFileError as e:
            report.errors.append((str(path), str(e)))
            continue
        if len(batch) >= batch_size:
            _load_batch(store, batch, report)
            batch = []
    if batch:
        _load_batch(store, batch, report)
    return report
