"""`orchestrate submit SWEEP.yaml`: validate, plan, submit (or print the plan)."""
from __future__ import annotations

import argparse
import contextlib
import json

from orchestrator.cli import db_url
from orchestrator.errors import UsageError
from orchestrator.sweep import EXECUTORS, SweepError, load_sweep

NAME = "submit"
HELP = "validate a sweep file and submit its runs (skips runs already finished or queued)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--executor", choices=EXECUTORS, default=None, help="override the sweep file's executor")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, arrays, dependencies), submit nothing")
    p.add_argument("--wait", action="store_true", help="block until every submitted stage is over, then ingest")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="with --wait: give up waiting after this long (exit 1; the jobs keep running)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def load_or_usage_error(path: str):
    try:
        return load_sweep(path)
    except SweepError as e:
        raise UsageError(f"invalid sweep ({len(e.errors)} problems):\n{e}") from None


def existing_store(url: str):
    """The store if the database exists (a dry run must not create one), else None."""
    from orchestrator.db.store import Store, sqlite_path

    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    store = Store(url)
    return store if store.current_revision() is not None else None


def print_result(result, as_json: bool, dry_run: bool, sweep=None, url: str | None = None) -> None:
    from orchestrator import cost

    # measured FLOP rates from the database's finished runs, when it exists (a dry run creates none)
    costs = (cost.estimate(result.plan, sweep.spec, existing_store(url) if url else None)
             if dry_run and sweep is not None else None)
    if as_json:
        print(json.dumps({**result.to_dict(), **({"cost": cost.to_dict(costs, sweep.spec.cost.gpu_peak_tflops)}
                                                 if costs is not None else {})},
                         indent=1, default=str))
        return
    print(result.plan.describe())
    if dry_run:
        if costs:
            print(cost.describe(costs, sweep.spec))
        print("dry run: nothing submitted")
        return
    for arr in result.plan.arrays:
        if arr.job_id:
            print(f"array{arr.index} ({arr.stage}): slurm job {arr.job_id.split('_')[0]}")
    if result.states:
        counts: dict[str, int] = {}
        for st in result.states.values():
            counts[st] = counts.get(st, 0) + 1
        print("stages: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def run(args: argparse.Namespace) -> int:
    from orchestrator.submit import open_store, submit_sweep

    sweep = load_or_usage_error(args.sweep)  # before the database is touched
    url = db_url(args)
    if sweep.spec.search is not None:
        if args.dry_run:
            raise UsageError(f"{args.sweep}: --dry-run is not available for a search sweep")
        from orchestrator.search import run_search

        summary = run_search(open_store(url), sweep, executor=args.executor)
        print(json.dumps(summary, indent=1) if args.json else
              f"study {summary['study']}: {summary['n_trials']} trials, best {summary['best_value']} "
              f"at {summary['best_params']}")
        return 0
    store = existing_store(url) if args.dry_run else open_store(url)
    return submit_and_report(lambda: submit_sweep(store, sweep, executor=args.executor, dry_run=args.dry_run,
                                                  wait=args.wait, timeout_s=args.timeout), args, sweep)


def submit_and_report(submit, args: argparse.Namespace, sweep=None) -> int:
    """Run ``submit()`` and print its result; an sbatch refusal is one line and exit 2, a
    ``--wait`` that ran past ``--timeout`` exit 1 (shared by submit and retry)."""
    import sys

    from orchestrator.executors import SubmissionRefused

    if args.timeout is not None and not args.wait:
        raise UsageError("--timeout needs --wait")
    try:
        from orchestrator.watch import submit_progress

        live = sweep is not None and not args.json and not args.dry_run
        with submit_progress(db_url(args), sweep, args.executor or sweep.spec.executor, args.wait, live) \
                if live else contextlib.nullcontext():
            result = submit()
    except SubmissionRefused as e:
        if e.transient:
            print(f"orchestrate: {args.sweep}: {e}; submit again (arrays already queued are not submitted twice)",
                  file=sys.stderr)
            return 1
        raise UsageError(f"{args.sweep}: {e} (fix the stage's resources in the sweep file and submit again; "
                         f"arrays already queued are not submitted twice)") from None
    except TimeoutError as e:
        print(f"orchestrate: {e}; the jobs keep running (`orchestrate status`)", file=sys.stderr)
        return 1
    print_result(result, args.json, args.dry_run, sweep, db_url(args))
    return 1 if any(st == "failed" for st in result.states.values()) else 0
