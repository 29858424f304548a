"""`orchestrate query SQL` is read-only in fact: hostile SQL on the real PostgreSQL (as the
SELECT-only reader role) and on SQLite is refused and the data is unchanged; runaway
statements stop at the time / memory budget."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid

import pytest

from orchestrator.db import Store
from orchestrator.db.readonly import QueryTimeout, ReadOnlyViolation, _pg_connect, check_statement
from orchestrator.db.store import with_driver
from orchestrator.query import read_only_sql

TABLES = ["sweeps", "runs", "run_stages", "params", "metrics", "artifacts", "ingested_files", "tcae_schema_version"]

TRICKS = [
    "DELETE FROM metrics",
    "DROP TABLE metrics",
    "TRUNCATE metrics",
    "UPDATE runs SET status = 'failed'",
    "GRANT ALL ON metrics TO PUBLIC",
    "CREATE TEMP TABLE t AS SELECT 1",
    "SELECT 1; DROP TABLE metrics",
    "SELECT 1 ; ; DELETE FROM metrics",
    "COMMIT; DELETE FROM metrics",
    "ROLLBACK; DELETE FROM metrics",
    "SELECT $$;$$; DELETE FROM metrics",
    "SELECT $x$ ; $x$ ; DELETE FROM metrics",
    "SELECT 1 /* ; */ ; DELETE FROM metrics -- ",
    "SELECT 1 -- comment\n; DELETE FROM metrics",
    "DO $$ BEGIN DELETE FROM metrics; END $$",
    "WITH d AS (DELETE FROM metrics RETURNING *) SELECT count(*) FROM d",
    "WITH u AS (UPDATE runs SET status = 'x' RETURNING 1) SELECT * FROM u",
    "SELECT * FROM runs FOR UPDATE",
    "SELECT * FROM runs FOR SHARE",
    "SELECT * INTO stolen FROM runs",
    "EXPLAIN ANALYZE DELETE FROM metrics",
    "EXPLAIN (ANALYZE) DELETE FROM metrics",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_catalog.pg_read_file('/etc/hostname')",
    "SELECT \"pg_read_file\"('/etc/hostname')",
    "COPY runs TO '/tmp/tcae_pwned.csv'",
    "COPY (SELECT 1) TO PROGRAM 'touch /tmp/tcae_pwned'",
    "SELECT lo_import('/etc/passwd')",
    "SELECT * FROM dblink('dbname=postgres', 'DELETE FROM metrics') AS t(a text)",
    "SET ROLE postgres",
    "RESET ROLE",
    "SET SESSION AUTHORIZATION postgres",
    "SELECT set_config('role', 'postgres', false)",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT nextval('runs_id_seq')",
    "SELECT setval('runs_id_seq', 1)",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity",
    "SELECT pg_sleep(60)",
    "SELECT query_to_xml('DELETE FROM metrics', true, true, '')",
    "SELECT database_to_xmlschema(true, true, '')",
    "SELECT * FROM ts_stat('SELECT set_config(''role'', ''postgres'', false)::tsvector')",
    "SELECT ts_rewrite('a'::tsquery, 'SELECT pg_read_file(''/etc/hostname'')')",
    "SELECT (SELECT set_config('role', 'postgres', false))",
    "SELECT * FROM runs WHERE id IN (SELECT nextval('runs_id_seq'))",
    "SELECT pg_advisory_lock(1)",
    "CALL something()",
    "PREPARE p AS DELETE FROM metrics",
    "LISTEN x",
    "VACUUM",
    "",
    "   ;  ",
]
# Quoting that hides a second statement from a word filter: read as ONE string literal by both
# the parser and the server, so it returns that string and nothing else runs.
HARMLESS = ["SELECT E'\\'; DELETE FROM metrics; --'", "SELECT $q$'; DELETE FROM metrics; $q$ AS s",
            "SELECT 'a'';DELETE FROM metrics;--' AS s", "SELECT 1 -- */ ; DELETE FROM metrics"]
SQLITE_TRICKS = [
    "PRAGMA journal_mode=DELETE",
    "PRAGMA query_only=OFF",
    "ATTACH DATABASE '/tmp/tcae_pwned.db' AS x",
    "REPLACE INTO sweeps (id, name, created_at) VALUES (1, 'x', '2025')",
    "INSERT OR REPLACE INTO sweeps (id, name, created_at) VALUES (1, 'x', '2025')",
    "SELECT load_extension('/tmp/x.so')",
    "SELECT writefile('/tmp/tcae_pwned', 'x')",
    "VACUUM INTO '/tmp/tcae_pwned.db'",
    "SELECT 1; DELETE FROM metrics",
    "WITH d AS (SELECT 1) DELETE FROM metrics",
]


def _fill(url: str) -> None:
    store = Store(url)
    store.upgrade()
    for i in range(3):
        store.upsert_run(f"{i:016x}", "s", {"model": {"patch_size": 4 * (i + 1)}}, stages=["tokenizer"])
    store.dispose()


def _snapshot(url: str) -> dict:
    """Row count and content digest of every project table (as the owner)."""
    import sqlalchemy as sa

    eng = sa.create_engine(with_driver(url))
    out = {}
    with eng.connect() as c:
        for t in TABLES:
            rows = c.exec_driver_sql(f"SELECT * FROM {t}").all()
            out[t] = (len(rows), hashlib.sha256(repr(sorted(map(repr, rows))).encode()).hexdigest())
    eng.dispose()
    return out


def _drop_role(pg_url: str, role: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(with_driver(pg_url), isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql(f"DROP OWNED BY {role}")
        c.exec_driver_sql(f"DROP ROLE {role}")
    eng.dispose()


@pytest.fixture
def pg_reader(pg_url, run_cli):
    """A filled PostgreSQL database and a fresh LOGIN reader role made by `db grant-reader`."""
    import sqlalchemy as sa

    _fill(pg_url)
    role = f"r_{uuid.uuid4().hex[:10]}"
    out = run_cli("db", "grant-reader", "--db", pg_url, "--role", role, "--login")
    assert out.returncode == 0, out.stderr
    yield pg_url, role
    _drop_role(pg_url, role)


@pytest.mark.postgres
def test_pg_tricks_refused_and_data_unchanged(pg_reader, run_cli, tmp_path):
    url, role = pg_reader
    before = _snapshot(url)
    for sql in TRICKS:
        with pytest.raises(ValueError) as e:  # ReadOnlyViolation / SQL error, never rows
            read_only_sql(url, sql, role=role, timeout_s=5)
        assert str(e.value), sql
    for sql in HARMLESS:
        assert len(read_only_sql(url, sql, role=role)) == 1
    out = run_cli("query", "COMMIT; DELETE FROM metrics", "--db", url, "--role", role)
    assert out.returncode == 2 and "one SQL statement" in out.stderr
    assert _snapshot(url) == before
    assert not any((tmp_path / ".." / n).exists() for n in ("tcae_pwned", "tcae_pwned.csv"))
    # Ordinary reads work, as the reader role, in a read-only session.
    df = read_only_sql(url, "SELECT current_user AS u, current_setting('transaction_read_only') AS ro, "
                            "count(*) AS n FROM runs", role=role)
    assert df.iloc[0].tolist() == [role, "on", 3]
    df = read_only_sql(url, "SELECT run_hash, config->'model'->>'patch_size' AS p FROM runs ORDER BY id; ",
                       role=role)
    assert df["p"].tolist() == ["4", "8", "12"]
    assert len(read_only_sql(url, "EXPLAIN SELECT * FROM metrics", role=role)) >= 1


@pytest.mark.postgres
def test_pg_database_enforces_it_without_the_parser(pg_reader):
    """Past the statement check, the reader session itself cannot write, read server files,
    change role or switch off read-only."""
    import psycopg2

    url, role = pg_reader
    before = _snapshot(url)
    for sql in ["DELETE FROM metrics", "INSERT INTO sweeps (name, created_at) VALUES ('x', now())",
                "SELECT pg_read_file('/etc/hostname')", "SELECT set_config('role', 'postgres', false)",
                "SET ROLE postgres", "SET SESSION AUTHORIZATION postgres", "SELECT nextval('runs_id_seq')",
                "COPY runs TO '/tmp/tcae_pwned.csv'", "SELECT lo_import('/etc/hostname')",
                "SELECT * FROM runs FOR UPDATE", "CREATE TABLE t (a int)"]:
        conn = _pg_connect(url, role, timeout_s=5)
        try:
            with pytest.raises(psycopg2.Error):
                with conn.cursor() as cur:
                    cur.execute(sql)
                    cur.execute("COMMIT; DELETE FROM metrics")  # only reached if the first one passed
        finally:
            conn.close()
    conn = _pg_connect(url, role, timeout_s=5)
    with conn.cursor() as cur:  # SET is allowed, but read-only cannot be switched off
        cur.execute("SELECT session_user, current_setting('default_transaction_read_only')")
        assert cur.fetchone() == (role, "on")
    conn.close()
    assert _snapshot(url) == before


@pytest.mark.postgres
def test_pg_group_role_via_set_role(pg_url, run_cli):
    """A NOLOGIN group role: the user's own login enters it with SET ROLE; the parser still refuses
    the role-switching function a superuser session could use to leave it."""
    import sqlalchemy as sa

    _fill(pg_url)
    role = f"g_{uuid.uuid4().hex[:10]}"
    out = run_cli("db", "grant-reader", "--db", pg_url, "--role", role, "--to", "postgres")
    assert out.returncode == 0, out.stderr
    try:
        before = _snapshot(url := pg_url)
        assert read_only_sql(url, "SELECT current_user AS u", role=role)["u"].tolist() == [role]
        for sql in ["SELECT set_config('role', 'postgres', false)", "RESET ROLE", "SELECT pg_read_file('/etc/hostname')",
                    "WITH d AS (DELETE FROM metrics RETURNING 1) SELECT 1"]:
            with pytest.raises(ReadOnlyViolation):
                read_only_sql(url, sql, role=role)
        assert _snapshot(url) == before
        out = run_cli("query", "SELECT 1", "--db", url, "--role", "nosuchrole")
        assert out.returncode == 2 and "grant-reader" in out.stderr
    finally:
        _drop_role(pg_url, role)


@pytest.mark.postgres
def test_pg_runaway_query_stops_at_the_timeout(pg_reader):
    url, role = pg_reader
    t0 = time.monotonic()  # a huge result streams from a server-side cursor: only max_rows arrive
    df = read_only_sql(url, "SELECT a, repeat('x', 100) FROM generate_series(1, 10000) a, generate_series(1, 10000) b",
                       role=role, max_rows=10)  # 10^8 rows, produced lazily
    assert len(df) == 10 and df.attrs["truncated"] and time.monotonic() - t0 < 60  # all 10^8 rows: many minutes
    t0 = time.monotonic()
    with pytest.raises(QueryTimeout, match="timeout of 1 s"):
        read_only_sql(url, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
                      role=role, timeout_s=1)
    assert time.monotonic() - t0 < 60  # without the timeout: never ends (bound generous: 2 loaded cores)


@pytest.mark.parametrize("sql", TRICKS + SQLITE_TRICKS)
def test_sqlite_tricks_refused_and_file_unchanged(sqlite_url, tmp_path, sql):
    _fill(sqlite_url)
    db = tmp_path / "results.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(ValueError):
        read_only_sql(sqlite_url, sql, timeout_s=5)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not (tmp_path.parent / "tcae_pwned.db").exists()


def test_sqlite_connection_enforces_it_without_the_parser(sqlite_url, tmp_path):
    """Past the statement check, SQLite's authorizer and mode=ro refuse every write and escape."""
    import sqlite3

    from orchestrator.db.readonly import _sqlite_connect

    _fill(sqlite_url)
    db = tmp_path / "results.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    conn = _sqlite_connect(db, timeout_s=5)
    for sql in ["DELETE FROM metrics", "PRAGMA query_only=OFF", "PRAGMA writable_schema=ON",
                f"ATTACH DATABASE '{tmp_path}/x.db' AS x", "SELECT load_extension('/tmp/x.so')",
                "CREATE TEMP TABLE t (a)", "BEGIN IMMEDIATE", "VACUUM INTO '/tmp/tcae_pwned.db'"]:
        with pytest.raises(sqlite3.DatabaseError):
            conn.execute(sql)
    assert conn.execute("SELECT count(*) FROM runs").fetchone() == (3,)
    conn.close()
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before and not (tmp_path / "x.db").exists()


def test_sqlite_runaway_queries_stop(sqlite_url):
    _fill(sqlite_url)
    t0 = time.monotonic()
    with pytest.raises(QueryTimeout, match="budget of 1 s"):
        read_only_sql(sqlite_url, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
                                  "SELECT count(*) FROM r", timeout_s=1)
    assert time.monotonic() - t0 < 60  # without the budget: never ends (bound generous: 2 loaded cores)
    with pytest.raises(ValueError, match="too big|budget"):  # a string bomb hits the length limit
        read_only_sql(sqlite_url, "WITH RECURSIVE r(n, s) AS (SELECT 1, 'x' UNION ALL SELECT n + 1, s || s FROM r "
                                  "WHERE n < 40) SELECT max(length(s)) FROM r", timeout_s=10)
    assert read_only_sql(sqlite_url, "SELECT count(*) AS n FROM runs")["n"].tolist() == [3]


def test_sqlite_memory_bomb_is_bounded(sqlite_url):
    """A recursive CTE whose UNION keeps every row (it reached 2.6 GB in 20 s before) stops at the
    heap limit, in a child process whose peak memory is measured."""
    _fill(sqlite_url)
    bomb = ("WITH RECURSIVE r(n, pad) AS (SELECT 1, randomblob(1000) UNION SELECT n + 1, randomblob(1000) FROM r) "
            "SELECT count(*) FROM r")
    # The child reports the peak of its own address space (VmHWM, reset by exec). Neither
    # RUSAGE_CHILDREN (the largest child pytest ever waited for) nor the child's ru_maxrss (which
    # keeps the forked pytest's RSS across exec) measures the query.
    child = ("import re, sys\nfrom orchestrator.cli import main\nrc = main(sys.argv[1:])\n"
             "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
             "print('PEAK_KIB', hwm, file=sys.stderr)\nsys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", child, "query", bomb, "--db", sqlite_url, "--timeout", "60"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "query stopped" in out.stderr, out.stderr
    peak_mib = int(out.stderr.split("PEAK_KIB")[1].split()[0]) / 1024
    assert peak_mib < 1024  # (its time is bounded by the subprocess timeout above)


def test_statement_is_regenerated_from_its_parse_tree():
    assert check_statement("select name from metrics where name = 'delete; drop' -- x\n;", "sqlite") \
        == "SELECT name FROM metrics WHERE name = 'delete; drop'"
    assert check_statement("SELECT replace(name, 'a', 'b') FROM sweeps", "postgres")
    assert check_statement("EXPLAIN SELECT 1", "postgres") == "EXPLAIN SELECT 1"
    assert check_statement("VALUES (1), (2)", "sqlite")
