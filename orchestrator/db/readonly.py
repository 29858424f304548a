"""Read-only SQL for ``orchestrate query``: enforced by the database, not by a word filter.

Three layers, each enough on its own for the usual tricks:

1. **One statement, parsed** (:func:`check_statement`, sqlglot): the text must parse as exactly
   one query (SELECT / UNION / VALUES / WITH ... SELECT, or EXPLAIN without ANALYZE of one) with
   no data-changing node anywhere (writable CTE, ``SELECT ... INTO``, ``FOR UPDATE``) and no
   call of a function with side effects (``set_config``, ``nextval``, ``pg_*``, ``lo_*``,
   ``dblink*``, ``query_to_xml`` ...).  What is sent to the server is the statement *re-generated
   from the parse tree*, so a second statement hidden by quoting the parser read differently
   (``$$``, ``E'...'``, comments) cannot reach it.
2. **A role that can only SELECT** (PostgreSQL): ``orchestrate db grant-reader`` creates
   ``tcae_reader`` (:func:`grant_reader`) with SELECT on the project's tables and nothing else.
   A LOGIN reader role is connected to directly (the strongest form: the session user cannot
   write, read server files or change role); a NOLOGIN group role is entered with
   ``SET ROLE`` from the user's own login.  ``query`` refuses to run SQL when the role is missing.
3. **A session that cannot write or run away**: PostgreSQL sessions start with
   ``default_transaction_read_only=on`` and ``statement_timeout`` (libpq ``options``, before any
   statement); SQLite is opened ``mode=ro`` + ``query_only`` with an authorizer that allows only
   reads and harmless functions, a progress handler that stops the statement at the time budget,
   a heap limit and a string/blob length limit.
"""
from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

DEFAULT_ROLE = "tcae_reader"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_ROWS = 1_000_000
SQLITE_HEAP_LIMIT = 512 * 2**20  # bytes; a recursive-CTE bomb stops here, not at the machine's RAM
SQLITE_MAX_LENGTH = 64 * 2**20  # longest string / blob a query may build
PASSWORD_ENV = "ORCHESTRATE_READER_PASSWORD"
ROLE_ENV = "ORCHESTRATE_READER_ROLE"

# Functions refused by name (lower case): side effects, server files, other connections, roles.
_DENY_FUNCS = {"set_config", "nextval", "setval", "currval", "lastval", "query_to_xml", "query_to_xmlschema",
               "query_to_xml_and_xmlschema", "cursor_to_xml", "cursor_to_xmlschema", "table_to_xml",
               "table_to_xml_and_xmlschema", "schema_to_xml", "database_to_xml", "load_extension",
               "readfile", "writefile", "edit", "fts3_tokenizer", "txid_current", "xmlparse",
               "ts_stat", "ts_rewrite"}  # the last two run a query given as text
_DENY_PREFIXES = ("pg_", "lo_", "dblink", "sqlite_", "current_setting_")
_ROLE_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class ReadOnlyViolation(ValueError):
    """The SQL is not one read-only query; the message says why."""


class QueryTimeout(ValueError):
    """The statement ran past its time (or memory) budget."""


@dataclass
class Rows:
    columns: list[str]
    rows: list[tuple]
    truncated: bool  # more than max_rows rows; only the first max_rows kept


# ----------------------------------------------------------------------------- 1. the statement


def _forbidden_nodes():
    from sqlglot import exp

    names = ("Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter", "AlterTable", "Command", "Copy",
             "Lock", "Into", "Set", "Transaction", "Commit", "Rollback", "Pragma", "Attach", "Detach", "Use",
             "Grant", "Revoke", "Analyze", "Refresh", "TruncateTable", "LoadData", "Cache", "Uncache")
    return tuple(getattr(exp, n) for n in names if hasattr(exp, n))


def check_statement(sql: str, dialect: str) -> str:
    """The SQL text to execute for ``sql`` if it is one read-only query, else raise.

    Parameters
    ----------
    sql : the user's statement (a trailing ``;`` is fine).
    dialect : ``"postgres"`` or ``"sqlite"`` (how the text is read and re-generated).

    Raises
    ------
    ReadOnlyViolation
        naming what was refused: several statements, a non-query, a writing node, a function.
    """
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    body = sql.strip()
    explain = re.match(r"(?is)^explain\s+(?P<opts>\((?:[^()']*)\)\s*|(?:verbose\s+|costs\s+)*)(?P<rest>.*)$", body)
    if explain:
        if re.search(r"(?i)\banaly[sz]e\b", explain.group("opts")):
            raise ReadOnlyViolation("EXPLAIN ANALYZE runs the statement; use EXPLAIN alone")
        body = explain.group("rest")
    try:
        statements = [s for s in sqlglot.parse(body, read=dialect) if s is not None]
    except SqlglotError as e:
        raise ReadOnlyViolation(f"cannot parse the SQL ({str(e).splitlines()[0]})") from None
    if not statements:
        raise ReadOnlyViolation("empty SQL statement")
    if len(statements) > 1:
        raise ReadOnlyViolation(f"only one SQL statement is allowed, got {len(statements)}")
    (stmt,) = statements
    if not isinstance(stmt, (exp.Select, exp.SetOperation, exp.Values)) or isinstance(stmt, exp.Command):
        raise ReadOnlyViolation(f"only SELECT / WITH / VALUES / EXPLAIN queries are allowed, not "
                                f"{type(stmt).__name__.upper()}: {body.split()[0].upper() if body else ''}")
    bad = _forbidden_nodes()
    for node in stmt.walk():
        if isinstance(node, bad):
            what = "SELECT ... FOR UPDATE/SHARE" if isinstance(node, exp.Lock) else (
                "SELECT ... INTO" if isinstance(node, exp.Into) else type(node).__name__.upper())
            raise ReadOnlyViolation(f"statement could write or lock ({what}); query is read-only")
        if isinstance(node, exp.Func):
            name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
            if name in _DENY_FUNCS or name.startswith(_DENY_PREFIXES) or "to_xml" in name:
                raise ReadOnlyViolation(f"function {name}() is not allowed in a read-only query")
    text = stmt.sql(dialect=dialect, comments=False)  # a comment cannot carry text to the server
    return ("EXPLAIN " + text) if explain else text


# ----------------------------------------------------------------------------- 2. the reader role


def role_name(role: str | None = None) -> str:
    role = role or os.environ.get(ROLE_ENV) or DEFAULT_ROLE
    if not _ROLE_RE.match(role):
        raise ReadOnlyViolation(f"reader role name {role!r} must match {_ROLE_RE.pattern}")
    return role


def project_tables() -> list[str]:
    from orchestrator.db.models import VERSION_TABLE, Base

    return [*Base.metadata.tables, VERSION_TABLE]


def grant_reader(conn, role: str, members: list[str] = (), login: bool = False, password: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Create (or update) ``role`` so that it can only SELECT the project's tables.

    Run on a PostgreSQL connection of a user that owns the tables (the one that ran
    ``orchestrate db upgrade``).  Idempotent.  Returns the statements run (for the CLI).

    Parameters
    ----------
    login : a LOGIN role (``query`` connects as it) instead of a NOLOGIN group role
        (``query`` uses ``SET ROLE`` from each member's own login).
    password : the LOGIN role's password (None: whatever pg_hba.conf allows, e.g. peer/trust).
    members : users granted the group role (``GRANT role TO user``).
    """
    role = role_name(role)
    for m in members:
        role_name(m)  # same identifier rules; refuses quoting tricks
    done: list[str] = []

    def run(sql: str, params=None) -> None:
        conn.exec_driver_sql(sql, params) if params else conn.exec_driver_sql(sql)
        done.append(sql if password is None else sql.replace(password, "***"))

    exists = conn.exec_driver_sql("SELECT 1 FROM pg_roles WHERE rolname = %(r)s", {"r": role}).scalar()
    flags = f"{'LOGIN' if login else 'NOLOGIN'} NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS"
    run(f"{'ALTER' if exists else 'CREATE'} ROLE {role} {flags}")
    if password is not None:
        conn.exec_driver_sql(f"ALTER ROLE {role} PASSWORD %(p)s", {"p": password})
        done.append(f"ALTER ROLE {role} PASSWORD ***")
    # Applied when the role logs in (LOGIN form); the query command also sets them per session.
    run(f"ALTER ROLE {role} SET default_transaction_read_only = on")
    run(f"ALTER ROLE {role} SET statement_timeout = '{int(timeout_s * 1000)}ms'")
    db = conn.exec_driver_sql("SELECT current_database()").scalar()
    run(f'GRANT CONNECT ON DATABASE "{db}" TO {role}')
    run(f"GRANT USAGE ON SCHEMA public TO {role}")
    existing = set(conn.exec_driver_sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").scalars())
    for table in project_tables():
        if table in existing:
            run(f"GRANT SELECT ON public.{table} TO {role}")
    for m in members:
        run(f"GRANT {role} TO {m}")
    return done


def _pg_connect(url: str, role: str, timeout_s: float):
    """A psycopg2 connection that reads as ``role`` in read-only sessions with a timeout."""
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    opts = (f"-c default_transaction_read_only=on -c statement_timeout={int(timeout_s * 1000)} "
            f"-c lock_timeout={int(timeout_s * 1000)} -c idle_in_transaction_session_timeout={int(timeout_s * 1000)}")
    kw = dict(host=u.host, port=u.port, dbname=u.database, user=u.username, password=u.password,
              options=opts, connect_timeout=10, **{k: v for k, v in u.query.items() if isinstance(v, str)})
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        conn = psycopg2.connect(**kw)
    except psycopg2.OperationalError as e:
        raise ValueError(f"cannot connect to {u.render_as_string()}: {(str(e).strip().splitlines() or [''])[0]}") from None
    conn.autocommit = True  # the SET ROLE below must outlive a transaction (a rolled-back SET is undone)
    with conn.cursor() as cur:
        cur.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (role,))
        row = cur.fetchone()
    if row is None:
        conn.close()
        raise ReadOnlyViolation(f"{u.render_as_string()}: no reader role '{role}'; an owner of the database must "
                                f"run `orchestrate db grant-reader --db URL` first (README: Shared PostgreSQL)")
    if row[0] and u.username != role:
        # A LOGIN reader role: connect as it, so that no role switch can be undone.
        conn.close()
        kw.update(user=role, password=os.environ.get(PASSWORD_ENV) or None)
        try:
            conn = psycopg2.connect(**{k: v for k, v in kw.items() if v is not None})
        except psycopg2.OperationalError as e:
            raise ValueError(f"cannot connect as the reader role {role} (${PASSWORD_ENV}, pg_hba.conf): "
                             f"{(str(e).strip().splitlines() or [''])[0]}") from None
    elif u.username != role:
        with conn.cursor() as cur:
            try:
                cur.execute(f"SET ROLE {role}")
            except psycopg2.Error as e:
                conn.close()
                raise ReadOnlyViolation(f"cannot SET ROLE {role} ({str(e).strip()}); ask an owner of the database "
                                        f"to run `orchestrate db grant-reader --to {u.username}`") from None
    conn.set_session(readonly=True, autocommit=False)
    return conn


# ----------------------------------------------------------------------------- 3. running it


def _sqlite_connect(path: Path, timeout_s: float) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"database file {path} does not exist")
    conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=min(timeout_s, 30))
    try:
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, SQLITE_MAX_LENGTH)
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.execute("PRAGMA query_only=ON")
        conn.execute("PRAGMA temp_store=MEMORY")  # temp b-trees count against the heap limit, not the disk
        conn.execute(f"PRAGMA cache_size=-{16 * 1024}")  # 16 MiB page cache
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()  # reads the header: is it a database?
    except sqlite3.DatabaseError as e:
        conn.close()
        raise ValueError(f"{path} is not a results database ({e}); check --db / $ORCHESTRATE_DB") from None
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 20_000)
    conn.set_authorizer(_sqlite_authorizer)  # from here on: reads only (no PRAGMA, ATTACH, writes)
    return conn


_SQLITE_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                   getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def _sqlite_authorizer(action: int, arg1, arg2, db, trigger) -> int:
    """SQLite's own check of every operation the compiled statement does (the parser's twin)."""
    if action not in _SQLITE_ALLOWED:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION:
        name = (arg2 or "").lower()
        if name in _DENY_FUNCS or name.startswith(_DENY_PREFIXES):
            return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def run_statement(url: str, sql: str, timeout_s: float = DEFAULT_TIMEOUT_S, max_rows: int = DEFAULT_MAX_ROWS,
                  role: str | None = None) -> Rows:
    """Check ``sql`` (:func:`check_statement`) and run it read-only on the database at ``url``.

    Raises
    ------
    ReadOnlyViolation
        for SQL that is not one read-only query, or a PostgreSQL database without the reader role.
    QueryTimeout
        when the statement runs past ``timeout_s`` (or, SQLite, past the heap limit).
    ValueError
        for SQL the database rejects (syntax error, unknown table, permission denied).
    FileNotFoundError
        for a SQLite URL whose file does not exist.
    """
    from sqlalchemy.engine import make_url

    from orchestrator.db.store import sqlite_path

    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ReadOnlyViolation(f"read-only SQL is supported on SQLite and PostgreSQL, not {backend}")
    text = check_statement(sql, "postgres" if backend == "postgresql" else "sqlite")
    if backend == "sqlite":
        path = sqlite_path(url)
        if path is None:
            raise ReadOnlyViolation(f"{url}: read-only SQL needs a database file")
        conn = _sqlite_connect(path, timeout_s)
        # Process-wide in SQLite: set for this statement, restored after (pragmas need the authorizer off).
        conn.set_authorizer(None)
        previous = conn.execute("PRAGMA hard_heap_limit").fetchone()[0]
        conn.execute(f"PRAGMA hard_heap_limit={SQLITE_HEAP_LIMIT}")
        conn.set_authorizer(_sqlite_authorizer)
        errors: tuple = (sqlite3.Error,)
    else:
        import psycopg2

        conn = _pg_connect(url, role_name(role), timeout_s)
        errors = (psycopg2.Error,)
    try:
        # PostgreSQL: a server-side cursor (DECLARE ... CURSOR FOR, which takes exactly one query)
        # streams rows, so a huge result never lands whole in this process; EXPLAIN cannot be declared.
        named = backend == "postgresql" and not text.startswith("EXPLAIN ")
        cur = conn.cursor(name="tcae_query") if named else conn.cursor()
        cur.execute(text)
        rows = cur.fetchmany(max_rows + 1)
        columns = [d[0] for d in cur.description or []]
        return Rows(columns, [tuple(r) for r in rows[:max_rows]], len(rows) > max_rows)
    except MemoryError:  # SQLITE_NOMEM: the heap limit was reached (the statement is over, memory freed)
        raise QueryTimeout(f"query stopped: it needed more than the memory budget of {SQLITE_HEAP_LIMIT >> 20} MiB"
                           ) from None
    except errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if backend == "sqlite" and ("interrupted" in msg or isinstance(e, sqlite3.OperationalError) and "memory" in msg):
            raise QueryTimeout(f"query stopped: it ran past the budget of {timeout_s:g} s / "
                               f"{SQLITE_HEAP_LIMIT >> 20} MiB ({msg}); --timeout changes the time") from None
        if getattr(e, "pgcode", None) == "57014":
            raise QueryTimeout(f"query stopped: it ran past the statement timeout of {timeout_s:g} s "
                               f"(--timeout changes it)") from None
        raise ValueError(f"SQL error: {msg}") from None
    finally:
        if backend == "sqlite":
            try:
                conn.set_authorizer(None)
                conn.execute(f"PRAGMA hard_heap_limit={previous}")
            except sqlite3.Error:
                pass
        else:
            conn.rollback()
        conn.close()
