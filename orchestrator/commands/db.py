"""`orchestrate db upgrade|current|stamp`: the results database schema (alembic)."""
from __future__ import annotations

import argparse

from orchestrator.cli import UsageError, db_url

NAME = "db"
HELP = "create / migrate the results database schema, show or stamp its revision"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["upgrade", "current", "stamp"])
    p.add_argument("revision", nargs="?", default=None,
                   help="target revision (upgrade: default head; stamp: required)")


def run(args: argparse.Namespace) -> int:
    from alembic.util import CommandError

    from orchestrator.db.store import Store

    store = Store(db_url(args))
    try:
        if args.action == "upgrade":
            store.upgrade(args.revision or "head")
            print(f"{store.url}: at revision {store.current_revision()} (head {store.head_revision()})")
        elif args.action == "current":
            current, head = store.current_revision(), store.head_revision()
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
