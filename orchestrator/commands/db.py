"""`orchestrate db upgrade|current|stamp|grant-reader`: the results database schema (alembic)
and, on PostgreSQL, the SELECT-only role that `orchestrate query` reads as."""
from __future__ import annotations

import argparse

from orchestrator.cli import db_url
from orchestrator.errors import UsageError

NAME = "db"
HELP = "create / migrate the results database schema, show or stamp its revision"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["upgrade", "current", "stamp", "grant-reader"])
    p.add_argument("revision", nargs="?", default=None,
                   help="target revision (upgrade: default head; stamp: required)")
    p.add_argument("--role", default=None,
                   help="grant-reader: role name (default: $ORCHESTRATE_READER_ROLE or tcae_reader)")
    p.add_argument("--to", default="", help="grant-reader: comma-separated users given the (group) role")
    p.add_argument("--login", action="store_true",
                   help="grant-reader: a LOGIN role that query connects as (password from "
                        "$ORCHESTRATE_READER_PASSWORD if set) instead of a NOLOGIN group role")


def run(args: argparse.Namespace) -> int:
    from alembic.util import CommandError

    from orchestrator.db.store import Store

    store = Store(db_url(args))
    try:
        if args.action == "grant-reader":
            return _grant_reader(store, args)
        if args.action == "upgrade":
            store.upgrade(args.revision or "head")
            adopted = 0
            if store.current_revision() == store.head_revision():  # identities of runs recorded before 0005
                from orchestrator.adopt import adopt

                adopted = adopt(store)
            print(f"{store.url}: at revision {store.current_revision()} (head {store.head_revision()})"
                  + (f"; {adopted} run(s) adopted with stage identities" if adopted else ""))
        elif args.action == "current":
            current, head = store.current_revision(), store.head_revision()
            store.check_not_newer(current)
            print(f"{store.url}: revision {current or '<none>'} (head {head})"
                  + ("" if current == head else " - run `orchestrate db upgrade`"))
        else:
            if not args.revision:
                raise UsageError("db stamp needs a revision (e.g. head)")
            store.stamp(args.revision)
            print(f"{store.url}: stamped {store.current_revision()}")
    except CommandError as e:
        raise UsageError(f"{store.url}: {e}") from None
    finally:
        store.dispose()
    return 0


def _grant_reader(store, args: argparse.Namespace) -> int:
    import os

    from sqlalchemy.exc import DBAPIError

    from orchestrator.db.readonly import PASSWORD_ENV, ReadOnlyViolation, grant_reader, role_name

    if store.dialect != "postgresql":
        raise UsageError(f"{store.url}: grant-reader is for PostgreSQL (SQLite query connections are "
                         f"opened read-only already)")
    try:
        role = role_name(args.role)
        members = [m.strip() for m in args.to.split(",") if m.strip()]
        with store.engine.begin() as conn:
            done = grant_reader(conn, role, members, login=args.login,
                                password=os.environ.get(PASSWORD_ENV) if args.login else None)
    except ReadOnlyViolation as e:
        raise UsageError(str(e)) from None
    except DBAPIError as e:
        raise UsageError(f"{store.url}: grant-reader failed: {str(e.orig).strip().splitlines()[0]}") from None
    print("\n".join(done))
    print(f"{store.url}: role {role} can SELECT the project's tables and nothing else")
    return 0
