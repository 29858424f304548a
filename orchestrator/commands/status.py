"""`orchestrate status [SWEEP]`: counts per state and a per-run table.

``orchestrator.reconcile.refresh_states(store, sweep)`` is called first for each shown sweep
(settle crashed submissions, ingest new result files, read Slurm states with one sacct).
"""
from __future__ import annotations

import argparse
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
    from orchestrator.reconcile import refresh_states  # lazy: `status --no-refresh` needs no Slurm code

    return refresh_states


def _runs(store, sweep: str | None) -> list:
    """Runs with their stages as plain rows (two Core queries: loading 1,000 runs and 2,000 stages
    as ORM objects cost 4x more), oldest first."""
    from types import SimpleNamespace

    from sqlalchemy import select

    from orchestrator.db.models import Run, RunStage, Sweep

    q = (select(Run.id, Run.run_hash, Sweep.name, Run.status, Run.slurm_job_id, Run.host, Run.error_tail)
         .join(Sweep, Sweep.id == Run.sweep_id).order_by(Run.id))
    sq = select(RunStage.run_id, RunStage.id, RunStage.stage, RunStage.status, RunStage.attempt, RunStage.source_id)
    if sweep is not None:
        q = q.where(Sweep.name == sweep)
        sq = sq.join(Run, Run.id == RunStage.run_id).join(Sweep, Sweep.id == Run.sweep_id).where(Sweep.name == sweep)
    with store.session() as s:
        runs = {r.id: SimpleNamespace(run_hash=r.run_hash, sweep=SimpleNamespace(name=r.name), status=r.status,
                                      slurm_job_id=r.slurm_job_id, host=r.host, error_tail=r.error_tail, stages=[])
                for r in s.execute(q)}
        for st in s.execute(sq):
            if st.run_id in runs:
                runs[st.run_id].stages.append(st)
    return list(runs.values())


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    store = open_existing(args)
    try:
        names = store.sweep_names()
        if args.sweep is not None and args.sweep not in names:
            raise UsageError(f"no sweep named '{args.sweep}' in {store.url} (known: {names})")
        refresh, failed = None if args.no_refresh else _refresh_hook(), False
        if refresh is not None:
            from orchestrator.cost import record_actual
        if args.watch:
            from orchestrator.watch import watch_status

            return watch_status(store, args.sweep, names, refresh, args.interval)
        if refresh is not None:
            for name in [args.sweep] if args.sweep else names:
                try:
                    refresh(store, name)
                    record_actual(store, name)  # sacct hours
                except Exception as e:  # show what the database knows anyway
                    print(f"orchestrate status: refreshing sweep {name} failed: {e!r}", file=sys.stderr)
                    failed = True
        runs = _runs(store, args.sweep)
    finally:
        store.dispose()

    counts = Counter(r.status for r in runs)
    title = f"sweep {args.sweep}" if args.sweep else f"{len(names)} sweep(s)"
    shared = sum(st.source_id is not None for r in runs for st in r.stages)
    print(f"{title}: {len(runs)} run(s): " + (", ".join(f"{s} {n}" for s, n in sorted(counts.items())) or "none")
          + (f"; {shared} stage(s) reused from other runs" if shared else ""))
    shown = runs if args.limit <= 0 else runs[: args.limit]
    rows = []
    for r in shown:
        # a stage reused from another run is that run's result: shown once there, named here
        stages = " ".join(f"{st.stage}:" + ("reused" if st.source_id is not None else st.status
                                            + (f"#{st.attempt}" if st.attempt and st.attempt > 1 else ""))
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
