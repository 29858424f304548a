"""`orchestrate retry SWEEP`: resubmit failed/cancelled stages (and their dependants) only."""
from __future__ import annotations

import argparse

from orchestrator.cli import db_url
from orchestrator.errors import UsageError
from orchestrator.commands.submit import submit_and_report
from orchestrator.sweep import EXECUTORS, SweepError

NAME = "retry"
HELP = "resubmit the failed runs of a sweep (only the failed stages and what depends on them)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep name or sweep YAML file")
    p.add_argument("--executor", choices=EXECUTORS, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="with --wait: give up after this long")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from orchestrator.submit import open_store, retry_sweep

    store = open_store(db_url(args))

    def retry():
        try:
            return retry_sweep(store, args.sweep, executor=args.executor, dry_run=args.dry_run, wait=args.wait,
                               timeout_s=args.timeout)
        except (LookupError, SweepError) as e:
            raise UsageError(str(e)) from None

    return submit_and_report(retry, args)
