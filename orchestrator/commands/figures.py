"""`orchestrate figures [--sweep S] [--out DIR] [--with-paper] [--only NAME,...]`.

Regenerates every paper figure/table the database supports (analysis/registry.py) and the
scaling-law fits (``fits.{md,tex,json}``, curves with bands on Figs. 3, 4, 8), the joint
token × decoder fits with the iso-compute table, and predicted vs measured (held-out token
counts, and the predictions recorded by ``orchestrate predict``); prints the files written
and the warnings (missing cells/metrics, proxy backbones, skipped items).  Reads the
database only (opened read-only).

:func:`load_frames` / :func:`load_predictions` are the one place that turns the database
into the frames :mod:`analysis` works on (the report uses them too): analysis takes
DataFrames and imports nothing from the orchestrator.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import UsageError
from orchestrator.commands._common import open_existing

if TYPE_CHECKING:  # pandas is imported when figures are made, not when the CLI parses (every command)
    import pandas as pd

NAME = "figures"
HELP = "regenerate the paper's figures (PNG+PDF) and tables (Markdown+LaTeX) from the database"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", default=None, help="only this sweep's runs (default: all runs)")
    p.add_argument("--out", default="figures", help="output folder (default: figures/)")
    p.add_argument("--with-paper", action="store_true",
                   help="draw the paper's reported values beside yours (analysis/paper_data.yaml)")
    p.add_argument("--only", default=None, help="comma-separated names (see --list)")
    p.add_argument("--list", action="store_true", help="list the figures/tables and what they need, then exit")


def run(args: argparse.Namespace) -> int:
    from analysis.registry import REGISTRY, generate

    if args.list:
        for e in REGISTRY.values():
            extra = " + per-step history" if e.history else ""
            paper = f"; paper: {e.paper}" if e.paper else ""
            print(f"{e.name}: metrics {', '.join(e.metrics)}{extra}{paper}")
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    unknown = sorted(set(only or []) - set(REGISTRY))
    if unknown:
        raise UsageError(f"--only: unknown names {unknown}; known: {', '.join(REGISTRY)}")
    store = open_existing(args, readonly=True)
    try:
        if args.sweep is not None and args.sweep not in store.sweep_names():
            raise UsageError(f"--sweep {args.sweep!r}: no such sweep; known: {', '.join(store.sweep_names()) or 'none'}")
        runs, history = load_frames(store, sweep=args.sweep)
        recorded = load_predictions(store, sweep=args.sweep)
    finally:
        store.dispose()
    out_dir = Path(args.out)
    outputs = generate(runs, out_dir, history, with_paper=args.with_paper, only=only, predictions=recorded)
    files = [f for o in outputs for f in o.files]
    warnings = [w for o in outputs for w in o.warnings]
    print(f"{len(runs)} runs{f' in sweep {args.sweep}' if args.sweep else ''}; wrote {len(files)} files to {out_dir}/")
    for f in files:
        print(f"  {f}")
    if warnings:
        print(f"{len(warnings)} warnings:", file=sys.stderr)
        for w in warnings:
            print(f"  warning: {w}", file=sys.stderr)
    failed = [o.name for o in outputs if any(": failed:" in w for w in o.warnings)]
    return 1 if failed else 0


HISTORY_COLUMNS = ["run_hash", "sweep", "stage", "name", "step", "value", "backbone"]


def load_frames(store, sweep: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs_table, metric_history of gfid/IS)`` of one sweep (or all) from a Store."""
    from analysis.fig6_convergence import NAMES as HISTORY_NAMES
    from orchestrator.query import BASE_COLUMNS, metric_history, runs_table

    from orchestrator.commands.predict import decoder_params

    if not store.runs(sweep=sweep):  # nothing to read (runs_table needs at least one run)
        import pandas as pd

        return pd.DataFrame(columns=BASE_COLUMNS), pd.DataFrame(columns=HISTORY_COLUMNS)
    runs = runs_table(store, sweep=sweep)
    runs["decoder_params"] = decoder_params(runs)  # the joint law's N (same as `predict`)
    return runs, metric_history(store, HISTORY_NAMES, sweep=sweep)


def load_predictions(store, sweep: str | None = None) -> pd.DataFrame:
    """The recorded predictions for ``sweep``'s configurations (all with None)."""
    from orchestrator.query import predictions_table

    return predictions_table(store, sweep=sweep)
