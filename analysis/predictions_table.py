"""The ``predictions`` output of ``orchestrate figures``: predicted vs measured.

* ``predictions_holdout.{md,tex}`` — the check a grid makes of itself: per line and
  protocol with ≥ 3 token counts, the law fitted without the largest token count predicts
  it (:func:`analysis.predict.holdout`);
* ``predictions_recorded.{md,tex}`` — the ladder: every prediction recorded by
  ``orchestrate predict`` next to the measured mean of its target, the error and whether
  the interval covered it, with the coverage rate over the measured targets.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.common import Output
from analysis.predict import coverage, holdout, ladder
from analysis.render import write_table


def _fmt(table: pd.DataFrame) -> pd.DataFrame:
    t = table.copy()
    t["predicted [95 % PI]"] = [f"{v:.3g} [{lo:.3g}, {hi:.3g}]" for v, lo, hi in zip(t["predicted"], t["lower"], t["upper"])]
    t["measured (n)"] = [f"{m:.3g} ({n})" if n else "not yet" for m, n in zip(t["measured"], t["n"])]
    t["error"] = [f"{e:+.3g} ({r:+.0%})" if np.isfinite(e) else "" for e, r in zip(t["error"], t["rel_error"])]
    t["covered"] = [("yes" if c else "no") if c is not None else "" for c in t["covered"]]
    keep = [c for c in ("line", "target", "metric", "batch", "law", "fit on") if c in t]
    return t[keep + ["predicted [95 % PI]", "measured (n)", "error", "covered"]]


def predictions(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False,
                recorded: pd.DataFrame | None = None) -> Output:
    """Write the held-out table and, given ``recorded`` (``predictions_table``), the ladder."""
    out = Output("predictions")
    out_dir = Path(out_dir)
    held = pd.concat([holdout(runs, m) for m in ("rfid", "gfid")], ignore_index=True) if len(runs) else pd.DataFrame()
    if len(held):
        rate, n = coverage(held)
        out.files += write_table(_fmt(held), out_dir, "predictions_holdout",
                                 f"Fit small, predict large: per line, the law fitted without the largest token count "
                                 f"predicts it (mean of its seeds; 95 % prediction interval with seed noise); "
                                 f"covered {rate:.0%} of {n}")
    else:
        out.warn("no line with ≥ 3 token counts (and enough runs below the largest) to hold one out")
    if recorded is not None and len(recorded):
        lad = ladder(recorded, runs)
        rate, n = coverage(lad)
        cov = f"coverage {rate:.0%} over {n} measured targets" if n else "no target measured yet"
        out.files += write_table(_fmt(lad), out_dir, "predictions_recorded",
                                 f"Recorded predictions (orchestrate predict) vs measured: {cov}")
    return out
