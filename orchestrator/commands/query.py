"""`orchestrate query [SQL] [--sweep S] [--metrics a,b] [--format table|csv|json]`.

Without SQL: one row per run (axis/config values and metrics as columns, see
``orchestrator.query.runs_table``).  With SQL: one read-only statement.  Never writes.
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd

from orchestrator.cli import UsageError, db_url
from orchestrator.commands._common import open_existing

NAME = "query"
HELP = "print results as a table / CSV / JSON: one row per run, or a read-only SQL statement"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", nargs="?", default=None, help="a read-only SQL statement (SELECT/WITH)")
    p.add_argument("--sweep", default=None, help="only this sweep's runs")
    p.add_argument("--metrics", default=None, help="comma-separated metric names (default: all)")
    p.add_argument("--status", default=None, help="only runs in this state")
    p.add_argument("--columns", default=None,
                   help="comma-separated columns to keep (default: run_hash, sweep, status, the config keys "
                        "that vary, the metrics); 'all' keeps every config key")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")


def varying(df: pd.DataFrame) -> pd.DataFrame:
    """Drop config columns that have one value across all rows (the table a researcher wants)."""
    keep = [c for c in df.columns if "." not in c or df[c].astype(str).nunique(dropna=False) > 1]
    return df[keep]


def emit(df: pd.DataFrame, fmt: str) -> None:
    if fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        sys.stdout.write(df.to_json(orient="records", date_format="iso", default_handler=str) + "\n")
    else:
        from tabulate import tabulate

        print(tabulate(df, headers="keys", tablefmt="simple", showindex=False, missingval=""))


def run(args: argparse.Namespace) -> int:
    from orchestrator.query import ReadOnlyViolation, read_only_sql, runs_table

    if args.sql is not None:
        if args.sweep or args.metrics or args.status or args.columns:
            raise UsageError("--sweep/--metrics/--status/--columns apply only without SQL")
        try:
            df = read_only_sql(db_url(args), args.sql)
        except (ReadOnlyViolation, ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
    else:
        store = open_existing(args, readonly=True)
        try:
            metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
            df = runs_table(store, sweep=args.sweep, metrics=metrics, status=args.status)
        finally:
            store.dispose()
        if args.columns == "all":
            pass
        elif args.columns:
            cols = [c.strip() for c in args.columns.split(",") if c.strip()]
            unknown = [c for c in cols if c not in df.columns]
            if unknown:
                raise UsageError(f"unknown column(s) {unknown}; known: {list(df.columns)}")
            df = df[cols]
        elif len(df) > 1:
            df = varying(df)
    emit(df, args.format)
    return 0
