"""Fig. 6: generator convergence — gFID and IS vs generator training steps, one line per
tokenizer variant (paper Sec. 4.2)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.common import Output, prepare
from analysis.render import line_figure

NAMES = ["gfid", "inception_score"]


def history_wide(history: pd.DataFrame) -> pd.DataFrame:
    """Long ``metric_history`` rows -> one row per (run, step): ``<name>``, ``<name>_backbone``."""
    h = history[history["name"].isin(NAMES)].dropna(subset=["step"])
    if h.empty:
        return pd.DataFrame(columns=["run_hash", "step", *NAMES])
    h = h.sort_values("step").drop_duplicates(["run_hash", "name", "step"], keep="last")
    values = h.pivot(index=["run_hash", "step"], columns="name", values="value")
    bb = h.pivot(index=["run_hash", "step"], columns="name", values="backbone").add_suffix("_backbone")
    return values.join(bb).reset_index()


def fig6_convergence(runs: pd.DataFrame, history: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """Write ``fig6_convergence.{png,pdf}`` from the generator's per-step gFID/IS history."""
    out = Output("fig6_convergence")
    wide = history_wide(history)
    if wide.empty:
        out.warn("no gfid/inception_score history (generator stage not run or no eval steps); skipped")
        return out
    cfg = prepare(runs).drop(columns=[c for c in NAMES + [f"{n}_backbone" for n in NAMES] if c in runs])
    df = wide.merge(cfg, on="run_hash", how="left")
    unknown = sorted(set(wide["run_hash"]) - set(cfg["run_hash"]))
    if unknown:
        out.warn(f"history of runs not in the runs table (no config; drawn as one variant): {unknown}")
    one_step = df.groupby("run_hash")["step"].nunique()
    if (one_step <= 1).all():
        out.warn("every run has gFID/IS at a single generator step; set generator.eval_at for curves")
    # Lines: the paper's variants (baseline / +STC / +STC+SSL); other varying design columns
    # (patch, decoder, ...) become panels, so no panel holds more than a handful of lines.
    variants = [c for c in ("k", "ssl") if c in df and df[c].astype(object).nunique(dropna=False) > 1]
    if with_paper:
        out.warn("the paper's Fig. 6 values are not in its text; no paper curve drawn")
    line_figure(out, df, "step", "generator training steps", variants, NAMES, Path(out_dir),
                "fig6_convergence", "Fig. 6: generator convergence per tokenizer", logx=False)
    return out
