"""`orchestrate status [SWEEP]`: counts per state and a per-run table.

``orchestrator.reconcile.refresh_states(store, sweep)`` is called first for each shown sweep
(settle crashed submissions, ingest new result files, read Slurm states with one sacct).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter

from orchestrator.errors import UsageError
from orchestrator.commands._common import open_existing

NAME = "status"
HELP = "show run counts per state and a per-run table (refreshing states first)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", nargs="?", default=None, help="only this sweep (default: all)")
    p.add_argument("--limit", type=int, default=200, help="per-run rows to print (0 = all)")
    p.add_argument("--no-refresh", action="store_true", help="do not ingest / query Slurm first")
    p.add_argument("--watch", action="store_true", help="live view until no stage is active (Ctrl-C stops watching)")
    p.add_argument("--interval", type=float, default=5.0, help="--watch: seconds between refreshes")


def _refresh_hook():
    return importlib.import_module("orchestrator.reconcile").refresh_states


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    store = open_existing(args)
    try:
        names = store.sweep_names()
        if args.sweep is not None and args.sweep not in names:
            raise UsageError(f"no sweep named '{args.sweep}' in {store.url} (known: {names})")
        refresh, failed = None if args.no_refresh else _refresh_hook(), False
        if args.watch:
            from orchestrator.watch import watch_status

            return watch_status(store, args.sweep, names, refresh, args.interval)
        if refresh is not None:
            for name in [args.sweep] if args.sweep else names:
                try:
                    refresh(store, name)
                    importlib.import_module("orchestrator.cost").record_actual(store, name)  # sacct hours
                except Exception as e:  # show what the database knows anyway
                    print(f"orchestrate status: refreshing sweep {name} failed: {e!r}", file=sys.stderr)
                    failed = True
        runs = store.runs(sweep=args.sweep)
    finally:
        store.dispose()

    counts = Counter(r.status for r in runs)
    title = f"sweep {args.sweep}" if args.sweep else f"{len(names)} sweep(s)"
    print(f"{title}: {len(runs)} run(s): " + (", ".join(f"{s} {n}" for s, n in sorted(counts.items())) or "none"))
    shown = runs if args.limit <= 0 else runs[: args.limit]
    rows = []
    for r in shown:
        stages = " ".join(f"{st.stage}:{st.status}" + (f"#{st.attempt}" if st.attempt and st.attempt > 1 else "")
                          for st in sorted(r.stages, key=lambda x: x.id))
        err = (r.error_tail or "").strip().splitlines()
        rows.append([r.run_hash, r.sweep.name, r.status, stages, r.slurm_job_id or "", r.host or "",
                     err[0][:60] if err and r.status != "finished" else ""])
    if rows:
        print(tabulate(rows, headers=["run", "sweep", "status", "stages", "slurm job", "host", "error"],
                       tablefmt="simple"))
    if len(shown) < len(runs):
        print(f"... {len(runs) - len(shown)} more run(s) (--limit 0 shows all)")
    return 1 if failed else 0
