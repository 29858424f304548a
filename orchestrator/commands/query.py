"""`orchestrate query [SQL] [--sweep S] [--metrics a,b] [--wide] [--format table|csv|json|parquet]`.

``--predictions``: recorded predictions against what was measured.
Without SQL: one row per run (see ``orchestrator.query.runs_table``), compact by default:
run id, sweep, status, the config keys that vary, the metrics, and a ``<metric>_backbone``
column only where it is non-null and not constant (a constant backbone is printed once above
the table; csv/json/parquet keep it as a column so the file says what produced each number).
The terminal table shows the :data:`HEADLINE` metrics (the rest: ``--metrics a,b`` or
``--wide``) and a config value that is unset (a vanilla run's ``model.split_depth``) as ``—``.
``--wide`` (or ``--columns all``) shows every column.  With SQL: one read-only statement,
enforced by the database (``orchestrator.db.readonly``).  Never writes.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from orchestrator.cli import db_url
from orchestrator.errors import UsageError
from orchestrator.commands._common import open_existing

if TYPE_CHECKING:  # pandas is imported when a query runs, not when the CLI parses (0.5 s)
    import pandas as pd

NAME = "query"
HEADLINE = ("rfid", "gfid", "psnr", "lpips", "structure_loss", "gflops_total")  # the default table's metrics
UNSET = "—"  # an unset config value in the table (None: e.g. split_depth of a vanilla run = encoder depth)
HELP = "print results as a table / CSV / JSON / parquet: one row per run, or a read-only SQL statement"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", nargs="?", default=None, help="a read-only SQL statement (SELECT/WITH)")
    p.add_argument("--sweep", default=None, help="only this sweep's runs")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated metric names (default: all; in a table: {', '.join(HEADLINE)})")
    p.add_argument("--status", default=None, help="only runs in this state")
    p.add_argument("--columns", default=None,
                   help="comma-separated columns to keep (default: run_hash, sweep, status, the config keys "
                        "that vary, the metrics); 'all' keeps every config key")
    p.add_argument("--wide", action="store_true", help="every config key and every *_backbone column")
    p.add_argument("--predictions", action="store_true",
                   help="recorded predictions (orchestrate predict) beside the measured mean of their targets: "
                        "error, covered, and the coverage rate")
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    p.add_argument("--out", default=None, help="write to this file instead of stdout (needed for parquet on a terminal)")
    p.add_argument("--timeout", type=float, default=None,
                   help="SQL: stop the statement after this many seconds (default 30)")
    p.add_argument("--role", default=None,
                   help="SQL on PostgreSQL: the reader role (default: $ORCHESTRATE_READER_ROLE or tcae_reader)")


def varying(df: pd.DataFrame) -> pd.DataFrame:
    """Drop config columns that have one value across all rows (the table a researcher wants)."""
    keep = [c for c in df.columns if "." not in c or df[c].astype(str).nunique(dropna=False) > 1]
    return df[keep]


def compact(df: pd.DataFrame, keep_constant_backbones: bool = False) -> tuple[pd.DataFrame, dict[str, str]]:
    """The default view: varying config keys, metrics, informative ``*_backbone`` columns.

    Returns (table, constants): an all-null backbone column is dropped; one with a single
    non-null value is dropped into ``constants`` (shown once above the table) unless
    ``keep_constant_backbones``; a varying one stays.
    """
    if len(df) > 1:
        df = varying(df)
    constants: dict[str, str] = {}
    drop = []
    metrics = set(df.columns)
    for c in df.columns:
        if not (c.endswith("_backbone") and c[: -len("_backbone")] in metrics):
            continue
        values = df[c].dropna().unique()
        if len(values) == 0:
            drop.append(c)
        elif len(values) == 1 and not keep_constant_backbones:
            constants[c] = str(values[0])
            drop.append(c)
    return df.drop(columns=drop), constants


def _to_parquet(df: pd.DataFrame, target) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UsageError("--format parquet needs pyarrow (pip install pyarrow); pandas alone cannot write "
                         "parquet") from None
    import pandas as pd
    import pyarrow as pa

    df = df.copy()
    for c in df.columns:  # tuples -> lists; mixed-type object columns -> text (parquet columns have one type)
        if df[c].dtype == object:
            kinds = {type(v) for v in df[c] if v is not None and not (isinstance(v, float) and pd.isna(v))}
            if any(k is tuple for k in kinds):
                df[c] = [list(v) if isinstance(v, tuple) else v for v in df[c]]
            if len(kinds - {tuple, list}) > 1 or (kinds & {tuple, list} and len(kinds) > 1):
                df[c] = [None if v is None else str(v) for v in df[c]]
    try:
        df.to_parquet(target, index=False, engine="pyarrow")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        df.astype({c: str for c in df.columns if df[c].dtype == object}).to_parquet(target, index=False)


def emit(df: pd.DataFrame, fmt: str, out: str | None = None, constants: dict[str, str] | None = None) -> None:
    if fmt == "parquet":
        if out is None and sys.stdout.isatty():
            raise UsageError("--format parquet writes binary data: give --out FILE.parquet or redirect stdout")
        _to_parquet(df, out if out is not None else sys.stdout.buffer)
        if out is None:
            sys.stdout.flush()
        return
    stream = open(out, "w") if out is not None else sys.stdout
    try:
        if fmt == "csv":
            df.to_csv(stream, index=False)
        elif fmt == "json":
            stream.write(df.to_json(orient="records", date_format="iso", default_handler=str) + "\n")
        else:
            from tabulate import tabulate

            for k, v in (constants or {}).items():
                stream.write(f"{k}: {v} (every run)\n" if k == "sweep" else
                             f"{k}: {v} (every run with {k[: -len('_backbone')]})\n")
            stream.write(tabulate(for_terminal(df), headers="keys", tablefmt="simple", showindex=False,
                                  missingval="") + "\n")
    finally:
        if out is not None:
            stream.close()


def for_terminal(df: pd.DataFrame) -> pd.DataFrame:
    """The table as printed: config columns (dotted names) show an unset value as :data:`UNSET`,
    not ``nan``, and are headed by their last name part where that is unambiguous."""
    df = df.copy()
    for c in (c for c in df.columns if "." in c and df[c].isna().any()):
        df[c] = [UNSET if _missing(v) else int(v) if isinstance(v, float) and v.is_integer() else v for v in df[c]]
    leaves = [c.rsplit(".", 1)[-1] for c in df.columns]
    return df.rename(columns={c: leaf for c, leaf in zip(df.columns, leaves)
                              if "." in c and leaves.count(leaf) == 1 and leaf not in df.columns})


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _predictions(args: argparse.Namespace) -> int:
    """``--predictions``: the prediction ladder (``orchestrate predict --ladder``, every sweep or ``--sweep``)."""
    from orchestrator.commands.predict import coverage_line, ladder_table

    if args.sql is not None or args.metrics or args.status or args.columns or args.wide:
        raise UsageError("--predictions takes only --sweep, --format and --out")
    store = open_existing(args, readonly=True)
    try:
        table = ladder_table(store, args.sweep)
    finally:
        store.dispose()
    emit(table, args.format, args.out, {})
    print(coverage_line(table), file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    from orchestrator.query import DEFAULT_TIMEOUT_S, read_only_sql, runs_table

    constants: dict[str, str] = {}
    if args.predictions:
        return _predictions(args)
    if args.sql is not None:
        if args.sweep or args.metrics or args.status or args.columns or args.wide:
            raise UsageError("--sweep/--metrics/--status/--columns/--wide apply only without SQL")
        if args.timeout is not None and not args.timeout > 0:
            raise UsageError(f"--timeout must be > 0, got {args.timeout}")
        try:  # ReadOnlyViolation and QueryTimeout are ValueErrors
            df = read_only_sql(db_url(args), args.sql, timeout_s=args.timeout or DEFAULT_TIMEOUT_S, role=args.role)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
        if df.attrs.get("truncated"):
            print(f"orchestrate query: only the first {len(df)} rows are shown", file=sys.stderr)
    else:
        store = open_existing(args, readonly=True)
        try:
            metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
            headline = metrics is None and args.format == "table" and not (args.wide or args.columns)
            df = runs_table(store, sweep=args.sweep, metrics=HEADLINE if headline else metrics, status=args.status)
            if headline:  # a headline metric no run has yet is no column
                empty = [m for m in HEADLINE if m in df.columns and df[m].isna().all()]
                df = df.drop(columns=[c for m in empty for c in (m, f"{m}_backbone") if c in df.columns])
        finally:
            store.dispose()
        if args.columns == "all" or args.wide:
            pass
        elif args.columns:
            cols = [c.strip() for c in args.columns.split(",") if c.strip()]
            unknown = [c for c in cols if c not in df.columns]
            if unknown:
                raise UsageError(f"unknown column(s) {unknown}; known: {list(df.columns)}")
            df = df[cols]
        else:
            df, constants = compact(df, keep_constant_backbones=args.format != "table")
            if args.format == "table" and len(df) > 1 and df["sweep"].nunique() == 1:  # said once, above
                constants, df = {"sweep": df["sweep"].iloc[0], **constants}, df.drop(columns=["sweep"])
    emit(df, args.format, args.out, constants)
    return 0
