"""`orchestrate retry SWEEP`: resubmit failed/cancelled stages (and their dependants) only."""
from __future__ import annotations

import argparse

from orchestrator.cli import UsageError, db_url
from orchestrator.commands.submit import print_result
from orchestrator.sweep import EXECUTORS, SweepError

NAME = "retry"
HELP = "resubmit the failed runs of a sweep (only the failed stages and what depends on them)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep name or sweep YAML file")
    p.add_argument("--executor", choices=EXECUTORS, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from orchestrator.submit import open_store, retry_sweep

    store = open_store(db_url(args))
    try:
        result = retry_sweep(store, args.sweep, executor=args.executor, dry_run=args.dry_run, wait=args.wait)
    except (LookupError, SweepError) as e:
        raise UsageError(str(e)) from None
    print_result(result, args.json, args.dry_run)
    return 1 if any(st == "failed" for st in result.states.values()) else 0
