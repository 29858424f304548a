"""`orchestrate next SWEEP_FILE --budget 500 --unit gpu-h --metric gfid [--from SWEEP] [--law tokens|joint]`.

Proposes the next rung: the configurations of SWEEP_FILE that have not run yet are
predicted from the fits of the finished runs (``orchestrate predict``'s machinery), priced
with the project's cost model (``orchestrator.cost.estimate``: the dry-run estimate, at the
FLOP rates measured on finished runs where the database has them), and chosen under the
budget by :func:`analysis.next_rung.propose` (the best predicted value within the budget,
then the widest intervals per unit cost).  Writes the choice as a sweep file (the same
base, stages and executor; the chosen configurations as one ``zip`` group) that
``orchestrate submit`` accepts as is, and prints the reasoning.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import yaml

from orchestrator.commands._common import open_existing
from orchestrator.errors import UsageError

if TYPE_CHECKING:  # pandas loads when the command runs, not when the CLI parses
    import pandas as pd

NAME = "next"
HELP = "propose the next configurations to run under a compute budget, written as a sweep file"
UNITS = {"gpu-h": "GPU-h", "core-h": "core-h"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_file", help="the candidate grid (its configurations not yet run are candidates)")
    p.add_argument("--budget", type=float, required=True, help="compute budget in --unit")
    p.add_argument("--unit", choices=sorted(UNITS), default="gpu-h", help="gpu-h (GPU stages) or core-h (CPU stages)")
    p.add_argument("--metric", default="gfid", help="the metric to improve, lower is better (default gfid)")
    p.add_argument("--from", dest="fit_sweep", default=None, help="sweeps whose finished runs are fitted (default: its name)")
    p.add_argument("--law", choices=["tokens", "joint"], default="tokens")
    p.add_argument("--out", default=None, help="sweep file to write (default: <sweep file folder>/<name>_next.yaml)")


def cost_of(sweep, runs: list, unit: str, store) -> float:
    """Estimated cost of ``runs`` (RunSpecs of ``sweep``) in ``unit``: the stages that use
    GPUs for gpu-h, the CPU-only stages for core-h (``orchestrator.cost.estimate``)."""
    from orchestrator.cost import estimate

    plan = SimpleNamespace(todo={r.run_hash: list(sweep.stage_order) for r in runs}, runs={r.run_hash: r for r in runs})
    costs = estimate(plan, sweep.spec, store)
    return float(sum(c.est_hours for c in costs if bool(c.gpus) == (unit == "gpu-h")))


def write_sweep(sweep, chosen: pd.DataFrame, out: Path) -> Path:
    """The chosen configurations as a sweep file next to ``out`` (runs_dir made absolute
    when the file moves to another folder, so the runs land where the original's do)."""
    raw = yaml.safe_load(Path(sweep.path).read_text())
    raw["name"] = f"{sweep.name}_next"
    targets = [json.loads(t) for t in chosen["target"]]
    keys = sorted({k for t in targets for k in t})
    raw.pop("axes", None)
    raw["zip"] = [{k: [t.get(k) for t in targets] for k in keys}] if keys else []
    if Path(out).resolve().parent != Path(sweep.path).resolve().parent:
        raw["runs_dir"] = str(sweep.runs_root.parent)
    out.write_text(f"# written by `orchestrate next` from {Path(sweep.path).name}: the chosen configurations\n"
                   + yaml.safe_dump(raw, sort_keys=False))
    return out


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.next_rung import propose
    from analysis.predict import predict_targets
    from orchestrator.commands.predict import fit_frame, target_frame, with_decoder_params
    from orchestrator.sweep import SweepError, load_sweep

    if not args.budget > 0:
        raise UsageError(f"--budget {args.budget}: must be positive")
    try:
        sweep = load_sweep(args.sweep_file)
    except SweepError as e:
        raise UsageError(str(e)) from None
    unit = UNITS[args.unit]
    store = open_existing(args, readonly=True)
    try:
        fit = fit_frame(store, [s.strip() for s in (args.fit_sweep or sweep.name).split(",") if s.strip()])
        done = store.finished_run_hashes(sweep=sweep.name)
        targets = target_frame(sweep)
        by_target: dict[str, list] = {}
        for r in sweep.runs:
            by_target.setdefault(json.dumps({k: v for k, v in r.params.items() if k != "train.seed"},
                                            sort_keys=True, default=str), []).append(r)
        todo = {t: [r for r in rs if r.run_hash not in done] for t, rs in by_target.items()}
        targets = targets[targets["target"].map(lambda t: bool(todo.get(t)))]
        if args.law == "joint":
            fit, targets = with_decoder_params(fit, targets)
        rows, refused = predict_targets(fit, targets, args.metric, law=args.law)
        cand = pd.DataFrame(rows, columns=["target", "value", "lower", "upper"]) if rows else pd.DataFrame(
            columns=["target", "value", "lower", "upper"])
        cand["cost"] = [cost_of(sweep, todo[t], args.unit, store) for t in cand["target"]]
    finally:
        store.dispose()
    if cand.empty:
        print(f"no candidate could be predicted ({len(targets)} not yet run)", file=sys.stderr)
        for w in refused:
            print(f"  not predicted: {w}", file=sys.stderr)
        return 1
    if not (cand["cost"] > 0).any():
        raise UsageError(f"--unit {args.unit}: the sweep's stages use no {unit} (try --unit "
                         f"{'core-h' if args.unit == 'gpu-h' else 'gpu-h'})")
    chosen, notes = propose(cand, args.budget, unit)
    print(f"{len(cand)} candidates not yet run, predicted from {len(fit)} finished runs ({args.law} law, "
          f"{args.metric}, 95 % PI, mean of the sweep's seeds); budget {args.budget:g} {unit}")
    if chosen.empty:
        print("nothing fits the budget:")
        for n in notes:
            print(f"  {n}")
        return 1
    for r in chosen.to_dict("records"):
        print(f"  choose {r['target']}: {args.metric} {r['value']:.4g} [{r['lower']:.4g}, {r['upper']:.4g}], "
              f"cost {r['cost']:.4g} {unit} — {r['reason']}")
    for n in notes:
        print(f"  left out {n}")
    out = Path(args.out) if args.out else Path(sweep.path).with_name(f"{sweep.name}_next.yaml")
    write_sweep(sweep, chosen, out)
    print(f"total {chosen['cost'].sum():.4g} of {args.budget:g} {unit}; wrote {out} "
          f"(check it with: orchestrate submit {out} --dry-run)")
    for w in refused:
        print(f"  not predicted: {w}", file=sys.stderr)
    return 0
