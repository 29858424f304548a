"""The one entry to the results database.

API (used by ingest, submission and analysis)::

    store = Store("sqlite:///results.db")        # any SQLAlchemy URL (postgresql://...)
    Store(url, readonly=True)                    # query / analysis: cannot write
    store.upgrade()                              # create / migrate; only the orchestrator calls it
    with store.session() as s: ...               # commit on success, rollback on error
    store.get_or_create_sweep(name, spec_yaml=None, git_commit=None) -> int (sweep id)
    store.record_plan(sweep, spec_yaml, runs, executor, stages, steps) -> {run_hash: run id}   (batched)
    store.set_states({(run_hash, stage): {"status": ..., ...}}, only_if=None) -> pairs written   (batched)
    store.upsert_run(run_hash, sweep, config, params, executor=None, stages=()) -> int   (one-item calls)
    store.set_stage_state(run_hash, stage, status, attempt=None, slurm_job_id=None,
                          error_tail=None, slurm_array_id=None) -> None
    store.add_predictions(rows) -> int                  (append-only; one transaction)
    store.runs(sweep=None, status=None, with_config=False) -> list[Run]   (detached ORM rows)
    store.finished_run_hashes(sweep=None) -> set[str]
    store.sweep_names() -> list[str]
    store.current_revision() / head_revision() / check_schema() / stamp(revision)

Every write goes through these methods (statements in :mod:`orchestrator.db.writes`; ingest
loads files inside a Store transaction with the same status derivation); each takes
``session=`` to join a caller's transaction.  A run's ``status`` is derived from its stages in
one function (:func:`orchestrator.db.writes.run_status`): register every stage of a run at
submission so that a run is ``finished`` only when all its stages are.

Migrations never run implicitly: :meth:`check_schema` (called by :meth:`session` unless
``check=False``) raises :class:`SchemaError` telling the user to run ``orchestrate db upgrade``.
"""
from __future__ import annotations

import functools
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from sqlalchemy import create_engine, event, inspect, select, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, defer, selectinload, sessionmaker

from orchestrator.db import writes
from orchestrator.db.engine import (JSON_CODEC, NETWORK_FS, _read_only_transaction, _sqlite_engine,  # noqa: F401
                                    is_network_fs, sqlite_path, with_driver)
from orchestrator.db.models import VERSION_TABLE, Prediction, Run, RunStage, Sweep, utcnow
from orchestrator.db.writes import run_status, sweep_bases, sweep_id  # noqa: F401 (API)

MIGRATIONS = Path(__file__).parent / "migrations"





class SchemaError(RuntimeError):
    """The database is missing, not a results database, or at another schema revision than
    this code (the CLI reports it with exit code 2)."""


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every revision of the migration scripts (a database at any other one is newer than this code)."""
    revs = set()
    for script in (MIGRATIONS / "versions").glob("*.py"):
        rev = re.search(r'^revision\s*=\s*["\']([^"\']+)', script.read_text(), re.M)
        if rev:
            revs.add(rev.group(1))
    return frozenset(revs)


@functools.cache
def head_revision() -> str:
    """Head of the migration scripts, read from their ``revision`` / ``down_revision`` lines
    (importing alembic costs ~1 s, too much for every ``status``; a test checks it agrees)."""
    revs, downs = set(), set()
    for script in (MIGRATIONS / "versions").glob("*.py"):
        src = script.read_text()
        rev = re.search(r'^revision\s*=\s*["\']([^"\']+)', src, re.M)
        down = re.search(r'^down_revision\s*=\s*["\']([^"\']+)', src, re.M)
        if rev:
            revs.add(rev.group(1))
        if down:
            downs.add(down.group(1))
    heads = revs - downs
    if len(heads) != 1:
        raise RuntimeError(f"migrations in {MIGRATIONS} have {len(heads)} heads: {sorted(heads)}")
    return heads.pop()


class Store:
    """The results database at ``url``; see the module docstring for the API.

    ``readonly=True`` (query, analysis): SQLite is opened with ``mode=ro`` (a missing file is a
    FileNotFoundError), PostgreSQL transactions are READ ONLY.
    """

    def __init__(self, url: str, readonly: bool = False):
        self.url, self.readonly = url, readonly
        url = with_driver(url)
        if make_url(url).get_backend_name() == "sqlite":
            path = sqlite_path(url)
            if path is not None and not readonly:
                path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = _sqlite_engine(url, readonly)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, **JSON_CODEC)
            if readonly:
                event.listen(self.engine, "begin", _read_only_transaction)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._schema_ok = False

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def dispose(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ schema

    def _alembic_config(self, connection=None):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", with_driver(self.url).replace("%", "%%"))
        cfg.attributes["connection"] = connection
        return cfg

    def head_revision(self) -> str:
        return head_revision()

    def current_revision(self) -> str | None:
        """The alembic revision stamped in the database (None: no schema yet).

        Raises :class:`SchemaError` for a SQLite file that is not a database."""
        try:
            with self.engine.connect() as conn:
                if not inspect(conn).has_table(VERSION_TABLE):
                    return None
                return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        except DatabaseError as e:
            if self.dialect == "sqlite" and isinstance(e.orig, sqlite3.DatabaseError) and not isinstance(
                    e.orig, sqlite3.OperationalError):
                raise SchemaError(f"{sqlite_path(self.url)} is not a results database ({e.orig}); "
                                  f"check --db / $ORCHESTRATE_DB") from None
            first = (str(e.orig).strip().splitlines() or [""])[0]
            if self.dialect == "postgresql" and re.search(r"does not exist|authentication failed|no password", first):
                raise SchemaError(f"cannot open {make_url(self.url).render_as_string()}: {first}; "
                                  f"check --db / $ORCHESTRATE_DB") from None
            raise

    def check_not_newer(self, current: str | None) -> None:
        if current is not None and current not in known_revisions():
            raise SchemaError(f"database {self.url} is at schema revision {current}, newer than this code "
                              f"(head {self.head_revision()}): update the code (git pull / pip install) "
                              f"rather than the database")

    def upgrade(self, revision: str = "head") -> None:
        """Create the schema or migrate it to ``revision`` (alembic); refuses a newer database."""
        from alembic import command

        self.check_not_newer(self.current_revision())
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # two orchestrators upgrading at once: one waits
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(724500103)")
            command.upgrade(self._alembic_config(conn), revision)
        self._schema_ok = False

    def stamp(self, revision: str) -> None:
        """Mark the database as being at ``revision`` without running migrations."""
        from alembic import command

        with self.engine.begin() as conn:
            command.stamp(self._alembic_config(conn), revision)
        self._schema_ok = False

    def check_schema(self) -> None:
        """Raise :class:`SchemaError` unless the database is at the head revision."""
        if self._schema_ok:
            return
        current, head = self.current_revision(), self.head_revision()
        self.check_not_newer(current)
        if current != head:
            what = "has no results schema" if current is None else f"is at schema revision {current}"
            raise SchemaError(f"database {self.url} {what}, this code needs {head}: "
                              f"run `orchestrate db upgrade --db {self.url}`")
        self._schema_ok = True

    # ------------------------------------------------------------------ sessions

    @contextmanager
    def session(self, check: bool = True) -> Iterator[Session]:
        """One transaction: commit on success, rollback on any error."""
        if check:
            self.check_schema()
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    # ------------------------------------------------------------------ writes
    # Every write of the orchestrator goes through these methods (statements: orchestrator.db.writes);
    # each takes ``session=`` to join a caller's transaction.

    def _write(self, fn, *args, session: Session | None = None, **kwargs):
        if session is None:
            with self.session() as s:
                return fn(s, *args, **kwargs)
        return fn(session, *args, **kwargs)

    def get_or_create_sweep(self, name: str, spec_yaml: str | None = None, git_commit: str | None = None,
                            session: Session | None = None) -> int:
        """Id of sweep ``name``, creating it (with its spec and commit) if missing.
        A given ``spec_yaml`` / ``git_commit`` replaces the stored one (re-submission)."""
        return self._write(writes.sweep_id, name, spec_yaml, git_commit, session=session)

    def record_plan(self, sweep: str, spec_yaml: str | None, runs: Mapping[str, tuple[dict, dict]],
                    executor: str | None, stages: Sequence[str], steps: Mapping[str, Mapping] | None = None,
                    session: Session | None = None) -> dict[str, int]:
        """Create/update ``runs`` (run_hash -> (config dict, params)) in ``sweep`` with ``stages``
        pending, and each stage's identity / directory / source from the plan's ``steps``
        (``orchestrator.decide.Step``).  Returns run_hash -> run id."""
        return self._write(writes.record_plan, sweep, spec_yaml, runs, executor, list(stages), steps or {},
                           session=session)

    def set_states(self, states: Mapping[tuple[str, str], Mapping[str, Any]], only_if: tuple[str, ...] | None = None,
                   session: Session | None = None) -> list[tuple[str, str]]:
        """Stage states ``{(run_hash, stage): {"status", "attempt"?, "slurm_job_id"?, "error_tail"?,
        "slurm_array_id"?}}`` (see :func:`orchestrator.db.writes.set_states`); returns the pairs written."""
        return self._write(writes.set_states, states, only_if, session=session)

    def upsert_run(self, run_hash: str, sweep: str, config: Mapping[str, Any],
                   params: Mapping[str, Any] | None = None, executor: str | None = None,
                   stages: Sequence[str] = (), session: Session | None = None) -> int:
        """One run of :meth:`record_plan`: create it in ``sweep`` or update its executor and params;
        ``stages`` are registered ``pending`` if not known yet.  Returns the run id."""
        ids = self.record_plan(sweep, None, {run_hash: (dict(config), dict(params or {}))}, executor, stages,
                               session=session)
        return ids[run_hash]

    def set_stage_state(self, run_hash: str, stage: str, status: str, attempt: int | None = None,
                        slurm_job_id: str | None = None, error_tail: str | None = None,
                        slurm_array_id: str | None = None, session: Session | None = None) -> None:
        """One stage of :meth:`set_states` (KeyError for a run or stage not in the database)."""
        given = {"attempt": attempt, "slurm_job_id": slurm_job_id, "error_tail": error_tail,
                 "slurm_array_id": slurm_array_id}
        fields = {"status": status, **{k: v for k, v in given.items() if v is not None}}
        if not self.set_states({(run_hash, stage): fields}, session=session):
            raise KeyError(f"run {run_hash} stage {stage} is not in the database (upsert_run it first)")

    def add_predictions(self, rows: Sequence[Mapping[str, Any]], session: Session | None = None) -> int:
        """Append recorded predictions (dicts with the columns of :class:`Prediction`, ``id``
        and ``created_at`` optional) in one transaction; returns how many were written."""
        if session is None:
            with self.session() as s:
                return self.add_predictions(rows, session=s)
        now = utcnow()
        session.add_all(Prediction(**{"created_at": now, **row}) for row in rows)
        session.flush()
        return len(rows)

    # ------------------------------------------------------------------ reads

    def runs(self, sweep: str | None = None, status: str | Sequence[str] | None = None,
             with_config: bool = False) -> list[Run]:
        """Runs (detached ORM rows with ``stages`` and ``sweep`` loaded), oldest first, optionally
        filtered.  ``config`` is loaded only with ``with_config=True`` (decoding 10k configs costs
        seconds); reading it otherwise raises."""
        # stage inputs (identity JSON) are the plan's business: not decoded for 2,000 stages here
        opts = [selectinload(Run.stages).defer(RunStage.inputs, raiseload=True), selectinload(Run.sweep)]
        if not with_config:
            opts.append(defer(Run.config, raiseload=True))
        q = select(Run).options(*opts).order_by(Run.id)
        if sweep is not None:
            q = q.join(Sweep).where(Sweep.name == sweep)
        if status is not None:
            q = q.where(Run.status.in_([status] if isinstance(status, str) else list(status)))
        with self.session() as s:
            return list(s.scalars(q))

    def finished_run_hashes(self, sweep: str | None = None) -> set[str]:
        q = select(Run.run_hash).where(Run.status == "finished")
        if sweep is not None:
            q = q.join(Sweep).where(Sweep.name == sweep)
        with self.session() as s:
            return set(s.scalars(q))

    def sweep_names(self) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(Sweep.name).order_by(Sweep.id)))
