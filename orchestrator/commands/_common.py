"""Helpers shared by the database commands (ingest, status, query, db)."""
from __future__ import annotations

import argparse
import os

from orchestrator.cli import db_url
from orchestrator.errors import UsageError

DEFAULT_RUNS_DIR = "runs"


def runs_dir_default() -> str:
    return os.environ.get("ORCHESTRATE_RUNS") or DEFAULT_RUNS_DIR


def open_existing(args: argparse.Namespace, readonly: bool = False) -> "Store":
    """The store named by ``--db``; it must exist and be at the head revision (else exit 2)."""
    from orchestrator.db.store import SchemaError, Store, sqlite_path  # lazy: parsing the CLI needs no SQLAlchemy

    url = db_url(args)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise UsageError(f"no database at {path} ({url}); create it with `orchestrate ingest` or "
                         f"`orchestrate db upgrade --db {url}`")
    store = Store(url, readonly=readonly)
    try:
        store.check_schema()
    except SchemaError as e:
        store.dispose()
        raise UsageError(str(e)) from None
    return store
