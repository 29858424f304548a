"""The joint law over tokens T and decoder parameters N, and the iso-compute view.

``L(T, N) = E + A·T^(−α) + B·N^(−β)`` (Chinchilla's form with tokens in place of data), in
log space with the Huber loss and multi-start of :mod:`analysis.laws`; intervals profile-t
for the exponents α, β and Wald-t (log space) for E, A, B, all with n − 5 residual degrees
of freedom; prediction intervals for the mean of m new seeds.  One fit per line: runs that
differ only in patch size, decoder size and seed (SSL, STC, … separate lines), one
evaluation protocol (:mod:`analysis.protocol`).

``joint_fits`` (an ``orchestrate figures`` output) writes ``joint_fits.{md,tex,json}``: the
form, the points used, every residual (json), every parameter with its interval, and the
iso-compute table: for each tokenizer GFLOPs budget (the measured GFLOPs of the grid's
configurations), the (patch, decoder) the fit predicts best among those within it, with its
interval and whether the runner-up's interval overlaps (then the fit cannot tell them apart).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import laws
from analysis.common import DESIGN, Output, describe, metric_label, prepare
from analysis.protocol import protocol_column, short
from analysis.render import write_json, write_table

NAMES = ["E", "A", "alpha", "B", "beta"]
FORM = "L = E + A·T^(−α) + B·N^(−β)  (T tokens, N decoder parameters)"
_GRID = np.linspace(laws.EXP_BOUNDS[0], laws.EXP_BOUNDS[1], 41)


@dataclass
class JointFit:
    theta: np.ndarray  # (e, a, α, b, β) in normalised units
    cov: np.ndarray
    s: float
    n: int
    x0: np.ndarray  # geometric means of T and N
    ci: dict = field(default_factory=dict)  # name -> (low, high), original units
    residuals: np.ndarray = field(default_factory=lambda: np.empty(0))  # log residuals per point
    level: float = laws.LEVEL

    @property
    def dof(self) -> int:
        return self.n - 5

    @property
    def values(self) -> dict:
        la, _ = laws.to_original(self.theta, self.cov, self.x0)
        return {"E": float(np.exp(self.theta[0])), "A": float(np.exp(la[0])), "alpha": float(self.theta[2]),
                "B": float(np.exp(la[1])), "beta": float(self.theta[4])}

    def params(self) -> dict:
        v = self.values
        return {k: [v[k], *self.ci.get(k, (np.nan, np.nan))] for k in NAMES}

    def predict_interval(self, T, N, seeds: float = 1, level: float | None = None):
        lx = np.log(np.stack([np.atleast_1d(np.asarray(T, float)), np.atleast_1d(np.asarray(N, float))], 1) / self.x0)
        m, h = laws.log_interval(self.theta, self.cov, lx, self.s, self.dof, seeds, level or self.level)
        return np.exp(m), np.exp(m - h), np.exp(m + h)


def fit_joint(T, N, y, level: float = laws.LEVEL) -> JointFit:
    """Fit the joint law to runs (every seed a point).

    Raises
    ------
    ValueError
        with fewer than 2 distinct T or N, fewer than 6 points, or non-positive values.
    """
    T, N, y = (np.asarray(v, dtype=float) for v in (T, N, y))
    if (T <= 0).any() or (N <= 0).any() or (y <= 0).any():
        raise ValueError("joint fit needs T, N, y > 0")
    if len(np.unique(T)) < 2 or len(np.unique(N)) < 2 or len(y) < 6:
        raise ValueError("joint fit needs ≥ 2 token counts, ≥ 2 decoder sizes and ≥ 6 points")
    x0 = np.exp(np.log(np.stack([T, N], 1)).mean(0))
    lx, ly = np.log(np.stack([T, N], 1) / x0), np.log(y)
    lo, hi = laws.default_bounds(ly, 2)
    theta, loss = laws.best_fit(lx, ly, lo=lo, hi=hi)
    cov, s, dof = laws.covariance(theta, lx, ly, lo, hi)
    t = laws.t_quantile(dof, level)
    la, var_la = laws.to_original(theta, cov, x0)

    def wald(v, var):
        if not (dof >= 1 and var > 0):
            return (np.nan, np.nan)
        with np.errstate(over="ignore"):
            return (float(np.exp(v - t * np.sqrt(var))), float(np.exp(v + t * np.sqrt(var))))

    ci = {"E": wald(theta[0], cov[0, 0]), "A": wald(la[0], var_la[0]), "B": wald(la[1], var_la[1])}
    for name, i in (("alpha", 2), ("beta", 4)):
        ci[name] = tuple(float(v) for v in laws.profile_interval(theta, loss, lx, ly, i, _GRID, level))
    m, _ = laws.log_model(theta[None], lx[None])
    return JointFit(theta=theta, cov=cov, s=s, n=len(y), x0=x0, ci=ci, residuals=ly - m[0], level=level)


def iso_compute(fit: JointFit, cand: pd.DataFrame, level: float = laws.LEVEL) -> pd.DataFrame:
    """``cand``: one row per (patch, decoder) with ``label, tokens, decoder_params, gflops``.
    Per budget (each candidate's GFLOPs): the best predicted candidate within it."""
    v, lo, hi = fit.predict_interval(cand["tokens"], cand["decoder_params"], seeds=np.inf, level=level)
    c = cand.assign(pred=v, lo=lo, hi=hi).sort_values("gflops")
    rows = []
    for budget in sorted(c["gflops"].unique()):
        within = c[c["gflops"] <= budget].sort_values("pred")
        best = within.iloc[0]
        second = within.iloc[1] if len(within) > 1 else None
        rows.append({"GFLOPs ≤": f"{budget:.4g}", "best (patch, decoder)": best["label"],
                     "predicted [95 % CI]": f"{best['pred']:.3g} [{best['lo']:.3g}, {best['hi']:.3g}]",
                     "runner-up": "" if second is None else f"{second['label']}: {second['pred']:.3g} "
                                                              f"[{second['lo']:.3g}, {second['hi']:.3g}]",
                     "distinguishable": "" if second is None else ("no" if second["lo"] <= best["hi"] else "yes")})
    return pd.DataFrame(rows)


def joint_fits(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """Write ``joint_fits.{md,tex,json}`` (module docstring); warns when no line has both a
    token and a decoder direction."""
    out = Output("joint_fits")
    df = prepare(runs)
    # N: ``decoder_params`` when the caller gives it (`orchestrate predict`/`next`: 12·width²·depth
    # from the config, since targets never ran), else the decoder's recorded parameter count
    # (``figures`` reads the database only and loads no model code)
    if "decoder_params" not in df or df["decoder_params"].isna().all():
        df["decoder_params"] = pd.to_numeric(df["params_decoder"], errors="coerce") if "params_decoder" in df else np.nan
    need = {"tokens", "decoder_params", "model.decoder_size"}
    rows, iso, detail = [], [], []
    for metric in ("rfid", "gfid"):
        if metric not in df or not need <= set(df):
            continue
        d = df[(pd.to_numeric(df[metric], errors="coerce") > 0) & df["decoder_params"].notna()].copy()
        if d.empty:
            continue
        d["_protocol"] = protocol_column(d, metric)
        protocols = sorted(d["_protocol"].unique())
        keys = [c for c in DESIGN if c in d and c not in ("model.patch_size", "model.decoder_size")
                and d[c].astype(object).nunique(dropna=False) > 1]
        for key, g in d.groupby(keys + ["_protocol"], dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            if g["tokens"].nunique() < 2 or g["decoder_params"].nunique() < 2 or len(g) < 6:
                continue
            f = fit_joint(g["tokens"], g["decoder_params"], g[metric].astype(float))
            label = describe({**dict(zip(keys, key)), "stc": bool(g["stc"].iloc[0])}, keys) or "all runs"
            if len(protocols) > 1:
                label += f" [{short(key[-1], protocols)}]"
            p = f.params()
            rows.append({"metric": metric_label(metric, sorted({str(b) for b in g.get(f'{metric}_backbone', pd.Series()).dropna()})),
                         "line": label, "runs": f.n, "dof": f.dof,
                         "residual sd (log)": f"{f.s:.3g}" if np.isfinite(f.s) else "",
                         **{k: (f"{p[k][0]:.3g} [{p[k][1]:.3g}, {p[k][2]:.3g}]" if np.isfinite(p[k][1])
                                else f"{p[k][0]:.3g}") for k in NAMES}})
            detail.append({"metric": metric, "line": label, "form": FORM, "params": p, "dof": f.dof,
                           "points": [{"run_hash": h, "tokens": float(t), "decoder_params": float(n_), "y": float(y),
                                       "log_residual": float(r)} for h, t, n_, y, r in
                                      zip(g["run_hash"], g["tokens"], g["decoder_params"], g[metric], f.residuals)]})
            if "gflops_total" in g:
                cand = (g.groupby(["model.patch_size", "model.decoder_size"], dropna=False)
                        .agg(tokens=("tokens", "first"), decoder_params=("decoder_params", "first"),
                             gflops=("gflops_total", "mean")).reset_index())
                cand = cand[cand["gflops"].notna()]
                if len(cand):
                    cand["label"] = [f"p={int(p_)}, dec {dd}" for p_, dd in zip(cand["model.patch_size"], cand["model.decoder_size"])]
                    iso.append(iso_compute(f, cand).assign(metric=metric, line=label))
    if not rows:
        out.warn("no line with ≥ 2 token counts, ≥ 2 decoder sizes and ≥ 6 runs with rFID/gFID; no joint fit")
        return out
    out_dir = Path(out_dir)
    out.files.append(write_json(detail, out_dir, "joint_fits"))
    out.files += write_table(pd.DataFrame(rows), out_dir, "joint_fits",
                             f"Joint fits {FORM}; log space, Huber, multi-start; 95 % intervals: profile-t for α, β, "
                             "Wald-t for E, A, B (n − 5 dof)")
    if iso:
        out.files += write_table(pd.concat(iso, ignore_index=True), out_dir, "iso_compute",
                                 "Iso-compute: best (patch, decoder) within each tokenizer GFLOPs budget by the joint "
                                 "fit (95 % interval of the curve; distinguishable: the runner-up's interval does not overlap)")
    return out
