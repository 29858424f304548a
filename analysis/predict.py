"""Predict configurations that have not run, and check the predictions that were recorded.

Three pieces, all on DataFrames shaped like ``orchestrator.query.runs_table`` (the
orchestrator reads the database and passes them in; analysis imports no orchestrator):

* :func:`predict_targets` — fit a law on finished runs (per line and evaluation protocol:
  :mod:`analysis.protocol`), predict each target configuration with a prediction interval
  for the mean of its seeds (parameter uncertainty + seed noise, :mod:`analysis.laws`);
  the rows are what ``Store.add_predictions`` records.
* :func:`ladder` — recorded predictions next to what the runs measured: error and whether
  the interval covered the measured mean; :func:`coverage` the rate over many targets.
* :func:`holdout` — the check a grid can make of itself: per line, fit all but the largest
  x and predict it (the ``predictions`` output of ``orchestrate figures``).

Laws: ``tokens`` (``L = E + A·T^(−α)`` per line, :mod:`analysis.fits`), ``joint``
(``L = E + A·T^(−α) + B·N^(−β)`` over tokens and decoder parameters, :mod:`analysis.joint`),
and where a held-out fit keeps only 2 token counts, the 2-parameter ``A·T^(−α)`` (a straight
line in log–log; ordinary least squares with a t-interval, n − 2 dof).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from analysis import laws
from analysis.common import DESIGN, prepare
from analysis.fits import fit_power_law
from analysis.protocol import canonical, difference, protocol, protocol_column

LAW_TEXT = {"tokens": "E + A*T^-alpha", "joint": "E + A*T^-alpha + B*N^-beta", "pure": "A*T^-alpha"}
# columns that move along a line, per law (everything else in DESIGN keys the line)
MOVES = {"tokens": {"model.patch_size", "tokens"}, "joint": {"model.patch_size", "tokens", "model.decoder_size"}}
LEVEL = 0.95


def _key(row: dict, cols: list[str]) -> str:
    def norm(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        return int(v) if isinstance(v, float) and v.is_integer() else v
    return json.dumps({c: norm(row.get(c)) for c in cols}, sort_keys=True, default=str)


def line_columns(fit: pd.DataFrame, targets: pd.DataFrame, law: str) -> list[str]:
    return [c for c in DESIGN if (c in fit or c in targets) and c not in MOVES[law]]


class PureFit:
    """``log y = a − α·log x`` by least squares: the 2-parameter law for 2 distinct x."""

    def __init__(self, x, y):
        lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
        self.n, self.mx = len(lx), lx.mean()
        X = np.stack([np.ones_like(lx), lx - self.mx], 1)
        self.coef, *_ = np.linalg.lstsq(X, ly, rcond=None)
        r = ly - X @ self.coef
        self.dof = self.n - 2
        self.s = float(np.sqrt((r ** 2).sum() / self.dof)) if self.dof >= 1 else np.nan
        self.cov = self.s ** 2 * np.linalg.pinv(X.T @ X)
        self.alpha = -float(self.coef[1])

    def predict_interval(self, x, seeds: float = 1, level: float = LEVEL):
        g = np.stack([np.ones_like(np.log(np.atleast_1d(x))), np.log(np.atleast_1d(x)) - self.mx], 1)
        m = g @ self.coef
        h = laws.t_quantile(self.dof, level) * np.sqrt(np.einsum("mp,pq,mq->m", g, self.cov, g) + self.s ** 2 / seeds)
        return np.exp(m), np.exp(m - h), np.exp(m + h)

    def params(self) -> dict:
        t = laws.t_quantile(self.dof, LEVEL)
        se = np.sqrt(self.cov[1, 1])
        return {"alpha": [self.alpha, self.alpha - t * se, self.alpha + t * se]}


def _fit(law: str, g: pd.DataFrame, metric: str):
    """The law fitted to one line's rows, or an explanation why not."""
    g = g[pd.to_numeric(g[metric], errors="coerce") > 0]
    if law == "joint":
        from analysis.joint import fit_joint  # noqa: PLC0415  (joint imports this module's helpers)

        if g["tokens"].nunique() < 2 or g["decoder_params"].nunique() < 2 or len(g) < 6:
            return None, f"needs ≥ 2 token counts, ≥ 2 decoder sizes and ≥ 6 runs, has {len(g)} runs"
        return fit_joint(g["tokens"], g["decoder_params"], g[metric]), ""
    nx = g["tokens"].nunique()
    if nx >= 3:
        return fit_power_law(g["tokens"], g[metric]), ""
    if nx == 2 and len(g) >= 3:
        return PureFit(g["tokens"], g[metric]), ""
    return None, f"{nx} token count(s) with a value, {len(g)} runs: too few to fit"


def _params(fit) -> dict:
    if isinstance(fit, PureFit):
        return fit.params()
    if hasattr(fit, "params"):
        return fit.params()
    return {"E": [fit.E, *fit.E_ci], "A": [fit.A, *fit.A_ci], "alpha": [fit.alpha, *fit.alpha_ci]}


def _x(law: str, row) -> tuple:
    return (row["tokens"],) if law == "tokens" else (row["tokens"], row["decoder_params"])


def predict_targets(fit_runs: pd.DataFrame, targets: pd.DataFrame, metric: str, law: str = "tokens",
                    level: float = LEVEL, fit_on: str | None = None) -> tuple[list[dict], list[str]]:
    """Predictions of ``metric`` for every row of ``targets`` (one row per configuration:
    config columns, ``target`` = canonical JSON of its grid values, ``seeds`` = how many seeds
    it will average).  Returns (rows for ``Store.add_predictions`` without batch/sweep/
    code_version, refusals naming the target and why)."""
    if law not in MOVES:
        raise ValueError(f"law must be one of {sorted(MOVES)}, got {law!r}")
    fit = prepare(fit_runs)
    tg = prepare(targets)
    if metric not in fit:
        return [], [f"{metric}: no finished run has it"]
    fit = fit[pd.to_numeric(fit[metric], errors="coerce").notna()].copy()
    fit["_protocol"] = protocol_column(fit, metric)
    cols = line_columns(fit, tg, law)
    fit["_line"] = [_key(r, cols) for r in fit.to_dict("records")]
    fits: dict[tuple[str, str], tuple] = {}
    rows, refused = [], []
    for t in tg.to_dict("records"):
        line = _key(t, cols)
        mine = fit[fit["_line"] == line]
        want = protocol(t, metric)
        known = {k: v for k, v in want.items() if v is not None}
        label = t["target"]
        if mine.empty:
            refused.append(f"{label}: {metric}: no finished run on its line ({line})")
            continue
        ok = [p for p in mine["_protocol"].unique() if all(json.loads(p).get(k) == v for k, v in known.items())]
        if len(ok) != 1:
            why = (f"measured under {len(ok)} matching protocols" if ok else "its evaluation protocol differs from "
                   "the fit runs': " + "; ".join(difference(p, canonical(want)) for p in mine["_protocol"].unique()))
            refused.append(f"{label}: {metric}: {why}")
            continue
        g = mine[mine["_protocol"] == ok[0]]
        if (line, ok[0]) not in fits:
            fits[(line, ok[0])] = _fit(law, g, metric)
        f, why = fits[(line, ok[0])]
        if f is None:
            refused.append(f"{label}: {metric}: {why}")
            continue
        x = _x(law, t)
        value, lo, hi = (float(v[0]) for v in f.predict_interval(*[[v] for v in x], seeds=t.get("seeds", 1), level=level))
        name = "pure" if isinstance(f, PureFit) else law
        rows.append({"target": label, "metric": metric, "protocol": ok[0], "law": LAW_TEXT[name],
                     "params": {**_params(f), "seeds": int(t.get("seeds", 1)), "x": list(map(float, x))},
                     "fit_on": fit_on, "fit_runs": sorted(g["run_hash"].astype(str)), "value": value,
                     "lower": lo, "upper": hi, "level": level})
    return rows, refused


def ladder(predictions: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Recorded predictions next to the measured mean of their targets' finished runs.

    ``predictions``: ``orchestrator.query.predictions_table``; ``runs``: ``runs_table``.
    Columns: target, metric, batch, predicted, lower, upper, measured (mean over seeds, same
    protocol as predicted), n, error (measured − predicted), rel_error, covered (None while
    the target has no measurement)."""
    out = []
    df = runs[runs["status"] == "finished"] if "status" in runs else runs
    for p in predictions.to_dict("records"):
        target = json.loads(p["target"])
        m = p["metric"]
        sel = df
        for k, v in target.items():
            sel = sel[sel[k].astype(object).map(lambda a, v=v: _same(a, v))] if k in sel else sel.iloc[0:0]
        if m in sel and len(sel):
            sel = sel[pd.to_numeric(sel[m], errors="coerce").notna()]
            sel = sel[protocol_column(sel, m) == p["protocol"]] if len(sel) else sel
        vals = pd.to_numeric(sel[m], errors="coerce").dropna() if m in sel else pd.Series(dtype=float)
        meas = float(vals.mean()) if len(vals) else np.nan
        out.append({"target": _short(target), "metric": m, "batch": str(p.get("batch", ""))[:8],
                    "law": p["law"], "predicted": p["value"], "lower": p["lower"], "upper": p["upper"],
                    "measured": meas, "n": len(vals), "error": meas - p["value"],
                    "rel_error": (meas - p["value"]) / p["value"],
                    "covered": bool(p["lower"] <= meas <= p["upper"]) if len(vals) else None})
    return pd.DataFrame(out, columns=["target", "metric", "batch", "law", "predicted", "lower", "upper", "measured",
                                      "n", "error", "rel_error", "covered"])


def coverage(table: pd.DataFrame) -> tuple[float, int]:
    """(share of measured targets inside their interval, how many were measured)."""
    c = table["covered"].dropna() if len(table) else pd.Series(dtype=object)
    return (float(c.astype(bool).mean()) if len(c) else np.nan), len(c)


def _same(a, v) -> bool:
    if a is None or (isinstance(a, float) and np.isnan(a)):
        return v is None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(a, (int, float, np.number)):
        return float(a) == float(v)
    return a == v


def _short(target: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(target.items()))


def holdout(runs: pd.DataFrame, metric: str, level: float = LEVEL) -> pd.DataFrame:
    """Per line and protocol with ≥ 3 token counts: fit all but the largest, predict the
    largest (the mean of its seeds), compare.  Columns as :func:`ladder` plus ``fit on``."""
    df = prepare(runs)
    if metric not in df or "tokens" not in df:
        return pd.DataFrame()
    df = df[pd.to_numeric(df[metric], errors="coerce") > 0].copy()
    if df.empty:
        return pd.DataFrame()
    df["_protocol"] = protocol_column(df, metric)
    cols = [c for c in DESIGN if c in df and c not in MOVES["tokens"] and df[c].astype(object).nunique(dropna=False) > 1]
    out = []
    groups = df.groupby(cols + ["_protocol"], dropna=False) if cols else df.groupby(["_protocol"])
    for key, g in groups:
        xs = sorted(g["tokens"].unique())
        if len(xs) < 3:
            continue
        small, big = g[g["tokens"] < xs[-1]], g[g["tokens"] == xs[-1]]
        f, why = _fit("tokens", small, metric)
        if f is None:
            continue
        v, lo, hi = (float(a[0]) for a in f.predict_interval([xs[-1]], seeds=len(big), level=level))
        meas = float(big[metric].astype(float).mean())
        key = key if isinstance(key, tuple) else (key,)
        line = ", ".join(f"{c.split('.')[-1]}={k}" for c, k in zip(cols, key[:-1])) or "all runs"
        out.append({"line": line, "metric": metric, "law": LAW_TEXT["pure" if isinstance(f, PureFit) else "tokens"],
                    "fit on": "tokens " + ", ".join(f"{x:g}" for x in xs[:-1]), "target": f"tokens {xs[-1]:g}",
                    "predicted": v, "lower": lo, "upper": hi, "measured": meas, "n": len(big),
                    "error": meas - v, "rel_error": (meas - v) / v, "covered": bool(lo <= meas <= hi)})
    return pd.DataFrame(out)


_COND = r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|!=|<|>)\s*([\w.+-]+)\s*$"  # value: a number or a plain word


def select_runs(runs: pd.DataFrame, expr: str | None) -> pd.DataFrame:
    """Rows of ``runs`` satisfying ``expr``: conditions ``column OP value`` joined by ``,`` or
    `` and `` (``tokens<=256``, ``model.decoder_size==mini``); ``tokens`` and the other
    derived columns of :func:`analysis.common.prepare` may be used.  Never evaluated as code.

    Raises
    ------
    ValueError
        naming the condition that does not parse or the column that does not exist.
    """
    import re

    if not expr:
        return runs
    df = prepare(runs)
    keep = pd.Series(True, index=df.index)
    for part in re.split(r",|\band\b", expr):
        m = re.match(_COND, part)
        if not m:
            raise ValueError(f"--fit-on: cannot read condition {part.strip()!r} (want e.g. tokens<=256)")
        col, op, raw = m.groups()
        if col not in df:
            raise ValueError(f"--fit-on: no column {col!r} in the fit runs")
        try:
            val, vals = float(raw), pd.to_numeric(df[col], errors="coerce")
        except ValueError:
            val, vals = raw, df[col].astype(str)
        keep &= {"<=": vals <= val, ">=": vals >= val, "==": vals == val, "!=": vals != val,
                 "<": vals < val, ">": vals > val}[op].fillna(False).astype(bool)
    return runs[keep.values]
