"""Engines for the results database: SQLite (WAL on local disk, BEGIN IMMEDIATE for every write
transaction, ``mode=ro`` for readers) and PostgreSQL (READ ONLY transactions for readers)."""
from __future__ import annotations

import functools
import sqlite3
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url

from orchestrator.db import fastjson

# File systems where SQLite's WAL (shared-memory index, one host) and even its locks are unsafe.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "9p", "lustre", "gpfs", "ceph", "afs", "beegfs")

JSON_CODEC = {"json_serializer": fastjson.dumps, "json_deserializer": fastjson.loads}


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
