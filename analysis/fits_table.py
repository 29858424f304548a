"""The ``fits`` output: scaling-law fits of rFID/gFID vs tokens, tokenizer GFLOPs and
decoder parameters (:mod:`analysis.fits`), one row per (metric, x, line), as a table
(``fits.{md,tex}``) and machine-readable (``fits.json``).

A line is a group of runs that differ only in the scaled quantity and in seed: for x =
tokens (and GFLOPs "tokens ↑") the patch size varies, for x = decoder parameters (and
GFLOPs "decoder ↑") the decoder size varies; every other varying design column separates
lines (never pooled).  The exponent α of ``L = E + A·x^(−α)`` is reported with its 95 %
profile-t interval (:mod:`analysis.fits`); the trend verdict is the calibrated test there.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.common import Output, aggregate, describe, extra_keys, metric_label, prepare
from analysis.fits import ALPHA_BOUNDS
from analysis.paper import paper_runs
from analysis.protocol import protocol_column, short
from analysis.render import fit_rows, write_json, write_table

FIT_METRICS = ["rfid", "gfid"]
# (x column, x label, the design column that moves x along a line)
SPECS = [
    ("tokens", "tokens", "model.patch_size"),
    ("gflops_total", "GFLOPs (tokens ↑)", "model.patch_size"),
    ("gflops_total", "GFLOPs (decoder ↑)", "model.decoder_size"),
    ("params_decoder", "decoder params", "model.decoder_size"),
]


def _verdict(f) -> str:
    if f.at_bound:
        return f"α at the fit bound ±{ALPHA_BOUNDS[1]:g}: a step, not a power law"
    verdict = {"decreasing": "falls with x", "increasing": "rises with x", "no trend": "no trend"}[f.trend]
    dof = f.n - 3  # runs minus fitted parameters
    if dof < 1:
        verdict += "; 3 points for 3 parameters: interval meaningless"
    elif dof < 3:
        verdict += f"; {dof} residual dof: interval unreliable"
    if f.n_x == 3:
        verdict += "; 3 x values: the curve is not tested by any other point"
    return verdict


def fit_lines(df: pd.DataFrame, metric: str, x: str, vary: str) -> list[tuple[str, object]]:
    """``(line label, PowerLawFit)`` per line of ``df`` with ≥ 3 distinct x values.

    Runs measured under different evaluation protocols (:mod:`analysis.protocol`) are
    separate lines, labelled by what differs, never one fit."""
    if x not in df or metric not in df:
        return []
    keys = [k for k in extra_keys(df, [vary]) if not (vary == "model.patch_size" and k == "tokens")]
    df = df.assign(_protocol=protocol_column(df, metric))
    protocols = sorted(df.loc[pd.to_numeric(df[metric], errors="coerce").notna(), "_protocol"].unique())
    agg = aggregate(df, keys + ["_protocol", vary], [metric])
    lines = agg.groupby(keys + ["_protocol"], dropna=False, sort=True)
    out = []
    for key, g in lines:
        key = key if isinstance(key, tuple) else (key,)
        fit = fit_rows(df, [h for hs in g["run_hashes"] for h in hs], x, metric)
        if fit is not None:
            label = describe({**dict(zip(keys, key)), "stc": bool(g["stc"].iloc[0])}, keys) or "all runs"
            if len(protocols) > 1:
                label += f" [{short(key[-1], protocols)}]"
            out.append((label, fit))
    return out


def _rows(df: pd.DataFrame, source: str) -> list[dict]:
    rows = []
    for metric in FIT_METRICS:
        for x, xlabel, vary in SPECS:
            for line, f in fit_lines(df, metric, x, vary):
                bb = sorted({str(b) for b in df.get(f"{metric}_backbone", pd.Series(dtype=object)).dropna()})
                rows.append({
                    "source": source, "metric": metric_label(metric, bb), "x": xlabel, "line": line,
                    "runs": f.n, "x values": f.n_x, "intervals": f.method,
                    "alpha": f.alpha, "alpha_low": f.alpha_ci[0], "alpha_high": f.alpha_ci[1],
                    "E": f.E, "E_low": f.E_ci[0], "E_high": f.E_ci[1], "A": f.A,
                    "trend": f.trend, "verdict": _verdict(f),
                })
    return rows


def fits(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """Write ``fits.{md,tex,json}``; ``with_paper``: also the fits of the paper's Table 3
    (= its Fig. 3/4 token-scaling points, rFID/gFID vs tokens, SSL off and on)."""
    out = Output("fits")
    df = prepare(runs)
    rows = _rows(df, "this database") if len(df) else []
    if with_paper:
        rows += _rows(prepare(paper_runs("table3")), "paper Table 3")
    if not rows:
        out.warn("no line with ≥ 3 distinct values of tokens / GFLOPs / decoder params and an rFID/gFID; "
                 "nothing to fit")
        return out
    out_dir = Path(out_dir)
    out.files.append(write_json(rows, out_dir, "fits"))

    def ci(v, lo, hi, fmt):
        return f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if np.isfinite(lo) else f"{v:{fmt}}"

    table = pd.DataFrame([{
        "source": r["source"], "metric": r["metric"], "x": r["x"], "line": r["line"], "runs": r["runs"],
        "x values": r["x values"], "α [95 % CI]": ci(r["alpha"], r["alpha_low"], r["alpha_high"], ".2f"),
        "E [95 % CI]": ci(r["E"], r["E_low"], r["E_high"], ".3g"), "A": f"{r['A']:.3g}",
        "verdict": r["verdict"],
    } for r in rows])
    out.files += write_table(table, out_dir, "fits",
                             "Scaling-law fits L = E + A·x^(−α) (log space, Huber, multi-start; 95 % intervals: "
                             "profile-t for α and E, Wald-t for A, n − 3 residual dof; every run and seed a point)")
    return out
