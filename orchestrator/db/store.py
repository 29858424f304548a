"""The one entry to the results database.

API (used by ingest, submission and analysis)::

    store = Store("sqlite:///results.db")        # any SQLAlchemy URL (postgresql://...)
    Store(url, readonly=True)                    # query / analysis: cannot write
    store.upgrade()                              # create / migrate; only the orchestrator calls it
    with store.session() as s: ...               # commit on success, rollback on error
    store.get_or_create_sweep(name, spec_yaml=None, git_commit=None) -> int (sweep id)
    store.upsert_run(run_hash, sweep, config, params, executor=None, stages=()) -> int (run id)
    store.set_stage_state(run_hash, stage, status, attempt=None, slurm_job_id=None,
                          error_tail=None, slurm_array_id=None) -> None
    store.runs(sweep=None, status=None, with_config=False) -> list[Run]   (detached ORM rows)
    store.finished_run_hashes(sweep=None) -> set[str]
    store.sweep_names() -> list[str]
    store.current_revision() / head_revision() / check_schema() / stamp(revision)

The three writers take ``session=`` to join a caller's transaction (one commit for many calls).
A run's ``status`` is derived from its stages (:func:`run_status`): register every stage
of a run at submission (``upsert_run(..., stages=[...])`` creates them ``pending``) so
that a run is ``finished`` only when all its stages are.

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
from urllib.parse import quote

from sqlalchemy import create_engine, delete, event, inspect, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, defer, selectinload, sessionmaker

from orchestrator.db import fastjson
from orchestrator.db.configs import config_delta, flatten
from orchestrator.db.models import STATUSES, VERSION_TABLE, Param, Run, RunStage, Sweep, param_columns, utcnow

MIGRATIONS = Path(__file__).parent / "migrations"
# File systems where SQLite's WAL (shared-memory index, one host) and even its locks are unsafe.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "9p", "lustre", "gpfs", "ceph", "afs", "beegfs")


JSON_CODEC = {"json_serializer": fastjson.dumps, "json_deserializer": fastjson.loads}


class SchemaError(RuntimeError):
    """The database is missing, not a results database, or at another schema revision than
    this code (the CLI reports it with exit code 2)."""


def _fs_type(directory: Path, mounts_file: Path = Path("/proc/mounts")) -> str:
    """Filesystem type of ``directory`` from /proc/mounts (longest matching mount point)."""
    try:
        mounts = mounts_file.read_text().splitlines()
    except OSError:
        return "unknown"
    target, best, fstype = str(directory.resolve()), -1, "unknown"
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best:
            best, fstype = len(mnt), parts[2]
    return fstype


def is_network_fs(directory: Path, mounts_file: Path = Path("/proc/mounts")) -> bool:
    fstype = _fs_type(directory, mounts_file)
    return fstype.startswith("fuse") or fstype in NETWORK_FS


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other backends or in-memory)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


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


@functools.cache
def _has_psycopg3() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True


def with_driver(url: str) -> str:
    """``postgresql://`` with the driver installed: SQLAlchemy 2.1 defaults to psycopg 3, the
    project ships psycopg2."""
    u = make_url(url)
    if u.drivername == "postgresql" and not _has_psycopg3():
        return u.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def run_status(stage_statuses: Sequence[str]) -> str:
    """A run's status from its stages': a failure anywhere wins, then anything still active,
    and only all-finished is finished."""
    if not stage_statuses:
        return "pending"
    for s in ("failed", "cancelled", "preempted", "running", "queued", "pending"):
        if s in stage_statuses:
            return s
    return "finished"


def _sqlite_engine(url: str, readonly: bool) -> Engine:
    path = sqlite_path(url)
    wal = path is not None and not is_network_fs(path.parent if str(path.parent) else Path("."))
    if readonly:
        if path is None or not path.is_file():
            raise FileNotFoundError(f"database file {path} does not exist ({url})")
        # mode=ro: SQLite itself refuses writes; the file stays byte-identical.
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(
            uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False), **JSON_CODEC)
    else:
        # isolation_level=None hands transaction control to us so that every write
        # transaction can start with BEGIN IMMEDIATE (take the write lock up front; a deferred
        # read->write upgrade can fail with "database is locked" regardless of busy_timeout).
        engine = create_engine(url, connect_args={"timeout": 30, "isolation_level": None}, **JSON_CODEC)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if readonly:
            cur.execute("PRAGMA query_only=ON")
        elif path is not None:
            cur.execute(f"PRAGMA journal_mode={'WAL' if wal else 'DELETE'}")
            cur.execute("PRAGMA synchronous=NORMAL" if wal else "PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def _read_only_transaction(conn) -> None:
    # First statement of every transaction (the driver has opened it implicitly).
    conn.exec_driver_sql("SET TRANSACTION READ ONLY")


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

    def get_or_create_sweep(self, name: str, spec_yaml: str | None = None, git_commit: str | None = None,
                            session: Session | None = None) -> int:
        """Id of sweep ``name``, creating it (with its spec and commit) if missing.
        A given ``spec_yaml`` / ``git_commit`` replaces the stored one (re-submission)."""
        if session is None:
            with self.session() as s:
                return sweep_id(s, name, spec_yaml, git_commit)
        return sweep_id(session, name, spec_yaml, git_commit)

    def upsert_run(self, run_hash: str, sweep: str, config: Mapping[str, Any],
                   params: Mapping[str, Any] | None = None, executor: str | None = None,
                   stages: Sequence[str] = (), session: Session | None = None) -> int:
        """Create run ``run_hash`` in ``sweep`` (created if missing) or update its executor and
        params; ``stages`` are registered ``pending`` if not known yet.  Returns the run id."""
        if session is None:
            with self.session() as s:
                return self.upsert_run(run_hash, sweep, config, params, executor, stages, session=s)
        run = session.scalars(select(Run).where(Run.run_hash == run_hash)).one_or_none()
        if run is None:
            sid = sweep_id(session, sweep)
            flat = flatten(config)
            base = sweep_bases(session.connection(), {sid: flat})[sid]
            run = Run(run_hash=run_hash, sweep_id=sid, config=dict(config), config_delta=config_delta(flat, base),
                      status="pending", executor=executor, attempts=0, created_at=utcnow())
            session.add(run)
            session.flush()
        elif executor is not None:
            run.executor = executor
        if params:
            session.execute(delete(Param).where(Param.run_id == run.id, Param.key.in_(list(params))))
            session.add_all(Param(run_id=run.id, key=k, **param_columns(v)) for k, v in params.items())
        known = set(session.scalars(select(RunStage.stage).where(RunStage.run_id == run.id)))
        session.add_all(RunStage(run_id=run.id, stage=st, status="pending") for st in stages if st not in known)
        session.flush()
        refresh_run_status(session, run.id)
        return run.id

    def set_stage_state(self, run_hash: str, stage: str, status: str, attempt: int | None = None,
                        slurm_job_id: str | None = None, error_tail: str | None = None,
                        slurm_array_id: str | None = None, session: Session | None = None) -> None:
        """Record the state of one stage (submitter / Slurm refresh) and re-derive the run's status."""
        if status not in STATUSES:
            raise ValueError(f"stage status {status!r} not in {STATUSES}")
        if session is None:
            with self.session() as s:
                return self.set_stage_state(run_hash, stage, status, attempt, slurm_job_id, error_tail,
                                            slurm_array_id, session=s)
        run = session.scalars(select(Run).where(Run.run_hash == run_hash)).one_or_none()
        if run is None:
            raise KeyError(f"run {run_hash} is not in the database (upsert_run it first)")
        st = session.scalars(select(RunStage).where(RunStage.run_id == run.id, RunStage.stage == stage)
                             ).one_or_none()
        if st is None:
            st = RunStage(run_id=run.id, stage=stage)
            session.add(st)
        st.status = status
        now = utcnow()
        if attempt is not None:
            st.attempt = attempt
            run.attempts = max(run.attempts or 0, attempt)
        if slurm_job_id is not None:
            st.slurm_job_id = run.slurm_job_id = str(slurm_job_id)
        if slurm_array_id is not None:
            run.slurm_array_id = str(slurm_array_id)
        if error_tail is not None:
            st.error_tail = run.error_tail = error_tail
        if status == "running" and st.started_at is None:
            st.started_at = now
            run.started_at = run.started_at or now
        run.stage = stage
        session.flush()
        refresh_run_status(session, run.id)

    # ------------------------------------------------------------------ reads

    def runs(self, sweep: str | None = None, status: str | Sequence[str] | None = None,
             with_config: bool = False) -> list[Run]:
        """Runs (detached ORM rows with ``stages`` and ``sweep`` loaded), oldest first, optionally
        filtered.  ``config`` is loaded only with ``with_config=True`` (decoding 10k configs costs
        seconds); reading it otherwise raises."""
        opts = [selectinload(Run.stages), selectinload(Run.sweep)]
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


def refresh_run_status(session: Session, run_id: int) -> str:
    """Re-derive ``runs.status`` from the run's stages (see :func:`run_status`)."""
    statuses = list(session.scalars(select(RunStage.status).where(RunStage.run_id == run_id)))
    status = run_status(statuses)
    run = session.get(Run, run_id)
    run.status = status
    return status
