"""`orchestrate cancel SWEEP`: scancel what is queued or running and mark it cancelled."""
from __future__ import annotations

import argparse
import sys

from orchestrator.cli import db_url
from orchestrator.errors import UsageError

NAME = "cancel"
HELP = "cancel the queued/running jobs of a sweep (scancel) and mark them cancelled"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep name or sweep YAML file")


def run(args: argparse.Namespace) -> int:
    from orchestrator.submit import cancel_sweep, open_store, sweep_name

    store = open_store(db_url(args))
    try:
        name = sweep_name(store, args.sweep)
    except LookupError as e:
        raise UsageError(str(e)) from None
    from orchestrator.slurm import SlurmError

    try:
        ids = cancel_sweep(store, name)
    except SlurmError as e:  # nothing was marked cancelled
        print(f"orchestrate cancel: sweep {name}: {e}", file=sys.stderr)
        return 1
    print(f"sweep {name}: cancelled {len(ids)} jobs")
    return 0
