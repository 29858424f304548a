"""`orchestrate report SWEEP --out DIR`: one static HTML page of a sweep (no server).

Status table, measured cost, every figure and table (with the paper's values beside yours)
and per-run training curves from the runs' ``log.jsonl`` — running runs included, so
rebuilding it (``--refresh N`` makes an open page reload itself) turns it into a monitor.
Reads the database only (opened read-only) and the run directories.
"""
from __future__ import annotations

import argparse

from orchestrator.errors import UsageError
from orchestrator.commands._common import open_existing

NAME = "report"
HELP = "write a static HTML report of a sweep: status, figures/tables, training curves"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep name (or sweep file) in the database")
    p.add_argument("--out", default=None, help="output folder (default: report/<sweep>/)")
    p.add_argument("--no-paper", action="store_true", help="do not draw the paper's reported values")
    p.add_argument("--refresh", type=int, default=0, metavar="SECONDS",
                   help="the page reloads itself every SECONDS (rebuild the report meanwhile)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from orchestrator.report import build_report

    name = args.sweep
    if Path(name).is_file() and name.endswith((".yaml", ".yml")):
        try:
            name = yaml.safe_load(Path(name).read_text())["name"]
        except (yaml.YAMLError, KeyError, TypeError) as e:
            raise UsageError(f"{args.sweep}: cannot read the sweep name: {e!r}") from None
    if args.refresh < 0:
        raise UsageError(f"--refresh {args.refresh}: must be >= 0")
    store = open_existing(args, readonly=True)
    try:
        known = store.sweep_names()
        if name not in known:
            raise UsageError(f"no sweep named '{name}' in {store.url} (known: {', '.join(known) or 'none'})")
        path = build_report(store, name, args.out or Path("report") / name, with_paper=not args.no_paper,
                            refresh_s=args.refresh)
    finally:
        store.dispose()
    print(f"wrote {path} (open it in a browser: file://{path.resolve()})")
    return 0
