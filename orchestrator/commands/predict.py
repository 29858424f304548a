"""`orchestrate predict SWEEP_FILE [--from SWEEP] [--fit-on EXPR] [--metric M,...] [--law tokens|joint]`.

Fits a scaling law on the finished runs of a sweep (``--from``, default the sweep file's
own name; ``--fit-on "tokens<=256"`` keeps a subset), predicts every configuration of
SWEEP_FILE (finished or not; seeds averaged) with a prediction interval that includes seed
noise, and records the predictions in the database (table ``predictions``) with their
provenance — the runs and law used, the time, the code version — before the targets land.
``orchestrate figures`` and the report then show predicted vs measured and the coverage
(``--ladder`` prints it here).  Every fit uses one evaluation protocol; a target measured
another way is refused, naming the difference (exit 1 when nothing could be predicted).
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas loads when a command runs, not when the CLI parses
    import pandas as pd

from orchestrator.commands._common import open_existing
from orchestrator.errors import UsageError

NAME = "predict"
HELP = "fit a scaling law on finished runs and record predictions for a sweep file's configurations"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_file", help="the sweep whose configurations are predicted")
    p.add_argument("--from", dest="fit_sweep", default=None,
                   help="comma-separated sweeps whose finished runs are fitted (default: the sweep file's name)")
    p.add_argument("--fit-on", default=None, help='subset of the fit runs, e.g. "tokens<=256"')
    p.add_argument("--metric", default="rfid,gfid", help="comma-separated metrics (default: rfid,gfid)")
    p.add_argument("--law", choices=["tokens", "joint"], default="tokens",
                   help="tokens: E + A·T^-α per line; joint: E + A·T^-α + B·N^-β over tokens and decoder parameters")
    p.add_argument("--level", type=float, default=0.95, help="prediction interval level (default 0.95)")
    p.add_argument("--dry-run", action="store_true", help="print the predictions, record nothing")
    p.add_argument("--ladder", action="store_true",
                   help="print the recorded predictions of this sweep vs what its runs measured, then exit")


def target_frame(sweep) -> pd.DataFrame:
    """One row per configuration of a loaded sweep (seeds averaged): flattened config, the
    derived columns the laws need, ``target`` (canonical JSON of its grid values, seed
    excluded) and ``seeds``."""
    import pandas as pd

    from core.models.flops_formulas import tokenizer_flops
    from core.models.geometry import VIT_SIZES
    from orchestrator.db.configs import flatten

    groups: dict[str, dict] = {}
    for r in sweep.runs:
        grid = {k: v for k, v in r.params.items() if k != "train.seed"}
        key = json.dumps(grid, sort_keys=True, default=str)
        if key not in groups:
            cfg = r.config
            row = flatten(r.config_dict())
            row.update(target=key, seeds=0, run_hash=r.run_hash, sweep=sweep.name, status="target",
                       encoder_depth=VIT_SIZES[cfg.model.encoder_size].depth,
                       gflops_total=tokenizer_flops(cfg.model, cfg.data.image_size)["total"] / 1e9)
            groups[key] = row
        groups[key]["seeds"] += 1
    return pd.DataFrame(list(groups.values()))


def fit_frame(store, sweeps: list[str]) -> pd.DataFrame:
    import pandas as pd

    from orchestrator.query import runs_table

    known = store.sweep_names()
    missing = [s for s in sweeps if s not in known]
    if missing:
        raise UsageError(f"--from: no sweep {missing} in the database; known: {', '.join(known) or 'none'}")
    from core.models.geometry import VIT_SIZES

    frames = [runs_table(store, sweep=s, status="finished") for s in sweeps if store.runs(sweep=s, status="finished")]
    fit = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_hash", "sweep", "status"])
    if "model.encoder_size" in fit:  # the depth a run recorded, else its config's (as for the targets)
        depth = fit["model.encoder_size"].map(lambda s: VIT_SIZES[s].depth if s in VIT_SIZES else None)
        fit["encoder_depth"] = pd.to_numeric(fit.get("encoder_depth", depth), errors="coerce").fillna(depth)
    return fit


def decoder_params(frame: pd.DataFrame) -> pd.Series:
    """The joint law's N: parameters of the decoder's transformer blocks, 12·width²·depth, from
    the config (a configuration never run has it too; embeddings and projections excluded,
    as in Kaplan et al.'s N)."""
    import pandas as pd

    from core.models.geometry import VIT_SIZES

    sizes = frame["model.decoder_size"] if "model.decoder_size" in frame else pd.Series(None, index=frame.index)
    return sizes.map(lambda s: 12 * VIT_SIZES[s].width ** 2 * VIT_SIZES[s].depth if s in VIT_SIZES else None).astype(float)


def with_decoder_params(fit: pd.DataFrame, targets: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    import pandas as pd

    return fit.assign(decoder_params=decoder_params(fit)), targets.assign(decoder_params=decoder_params(targets))


def ladder_table(store, sweep: str | None = None) -> "pd.DataFrame":
    """Every recorded prediction (of ``sweep``, or all) beside the measured mean of its target's
    finished runs: :func:`analysis.predict.ladder` (also ``orchestrate query --predictions``)."""
    import pandas as pd

    from analysis.predict import ladder
    from orchestrator.query import predictions_table, runs_table

    runs = runs_table(store, sweep=sweep) if store.runs(sweep=sweep) else pd.DataFrame(
        columns=["run_hash", "sweep", "status"])
    return ladder(predictions_table(store, sweep=sweep), runs)


def coverage_line(table: "pd.DataFrame") -> str:
    from analysis.predict import coverage

    rate, n = coverage(table)
    return f"coverage: {rate:.0%} of {n} measured targets" if n else "no target measured yet"


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.predict import predict_targets, select_runs
    from orchestrator.cli import version_string
    from orchestrator.sweep import SweepError, load_sweep

    try:
        sweep = load_sweep(args.sweep_file)
    except SweepError as e:
        raise UsageError(str(e)) from None
    if not 0 < args.level < 1:
        raise UsageError(f"--level {args.level}: must be between 0 and 1")
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    store = open_existing(args, readonly=args.ladder or args.dry_run)
    try:
        if args.ladder:
            table = ladder_table(store, sweep.name)
            print(table.to_string(index=False) if len(table) else f"no recorded predictions for sweep {sweep.name}")
            print(coverage_line(table))
            return 0
        fit = fit_frame(store, [s.strip() for s in (args.fit_sweep or sweep.name).split(",") if s.strip()])
        try:
            fit = select_runs(fit, args.fit_on)
        except ValueError as e:
            raise UsageError(str(e)) from None
        targets = target_frame(sweep)
        if args.law == "joint":
            fit, targets = with_decoder_params(fit, targets)
        rows, refused = [], []
        for m in metrics:
            r, why = predict_targets(fit, targets, m, law=args.law, level=args.level, fit_on=args.fit_on)
            rows += r
            refused += why
        batch, version = uuid.uuid4().hex, version_string()
        for r in rows:
            r.update(batch=batch, sweep=sweep.name, code_version=version)
        if rows and not args.dry_run:
            store.add_predictions(rows)
    finally:
        store.dispose()
    print(f"{len(fit)} finished runs fitted ({args.fit_on or 'all'}); {len(rows)} predictions for sweep {sweep.name}"
          + ("" if args.dry_run or not rows else f", recorded as batch {batch[:8]}"))
    for r in rows:
        tgt = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in json.loads(r["target"]).items())
        print(f"  {r['metric']:5s} [{tgt}]: {r['value']:.4g} [{r['lower']:.4g}, {r['upper']:.4g}] "
              f"({r['level']:.0%} PI, mean of {r['params']['seeds']} seed(s); {r['law']} on {len(r['fit_runs'])} runs)")
    for w in refused:
        print(f"  not predicted: {w}", file=sys.stderr)
    return 0 if rows else 1
