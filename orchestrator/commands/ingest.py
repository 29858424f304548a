"""`orchestrate ingest [PATH ...]`: load result files into the database (idempotent)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.cli import db_url
from orchestrator.errors import UsageError
from orchestrator.commands._common import runs_dir_default

NAME = "ingest"
HELP = ("load result files (default: the runs directory) into the results database; "
        "exit 1 if any file was skipped")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", help="result files or directories (default: $ORCHESTRATE_RUNS or runs/)")


def run(args: argparse.Namespace) -> int:
    from orchestrator.db.store import Store
    from orchestrator.ingest import ingest

    paths = args.paths or [runs_dir_default()]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise UsageError(f"no such file or directory: {', '.join(missing)}")
    store = Store(db_url(args))
    try:
        if store.current_revision() != store.head_revision():
            store.upgrade()  # ingest is one of the two places that create / migrate the schema
        report = ingest(store, paths)
    finally:
        store.dispose()
    for path, reason in report.errors:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"ingest: {report.summary()}")
    return 1 if report.errors else 0
