"""Fig. 8: gFID vs tokenizer GFLOPs — token-number scaling (smaller patches at a fixed
decoder) vs decoder-size scaling (larger decoders at a fixed patch), both drawn as connected
curves (paper Sec. 4.3)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from analysis.common import (
    Output, aggregate, backbones, check_backbones, describe, extra_keys, metric_label, prepare, select,
    warn_missing,
)
from analysis.paper import paper_runs
from analysis.render import CI_NOTE, draw_fit, fit_rows, save_figure

KEYS = ["model.decoder_size", "model.patch_size"]
METRICS = ["gfid", "gflops_total"]
_SIZE_ORDER = ["micro", "mini", "Ti", "S", "B", "L"]


def _fit(ax, raw: pd.DataFrame | None, g: pd.DataFrame, color, label: str) -> None:
    """Power-law fit of gFID vs GFLOPs along one scaling direction, with its band."""
    if raw is None:
        return
    fit = fit_rows(raw, [h for hs in g["run_hashes"] for h in hs], "gflops_total", "gfid")
    if fit is not None:
        draw_fit(ax, fit, color, label)


def _panel(ax, agg: pd.DataFrame, raw: pd.DataFrame | None = None) -> int:
    """Both scaling directions of one panel; with ``raw`` (the runs), each direction with
    ≥ 3 points also gets its power-law fit gFID = E + A·GFLOPs^(−α) and 95 % band."""
    drawn = 0
    pts = agg.dropna(subset=METRICS)
    for i, (dec, g) in enumerate(pts.groupby("model.decoder_size")):  # token-number scaling
        if len(g) > 1:
            g = g.sort_values("gflops_total")
            ax.plot(g["gflops_total"], g["gfid"], "o-", color=f"C{i % 5}", label=f"tokens ↑ (dec {dec}, patch ↓)")
            _fit(ax, raw, g, f"C{i % 5}", f"tokens ↑ dec {dec}")
    for i, (p, g) in enumerate(pts.groupby("model.patch_size")):  # decoder-size scaling
        if len(g) > 1:
            g = g.assign(order=g["model.decoder_size"].map(_SIZE_ORDER.index)).sort_values("order")
            ax.plot(g["gflops_total"], g["gfid"], "s--", color=f"C{(i + 5) % 10}", mfc="none",
                    label=f"decoder ↑ (p={int(p)})")
            _fit(ax, raw, g, f"C{(i + 5) % 10}", f"decoder ↑ p={int(p)}")
    for r in pts.to_dict("records"):
        n = int(r.get("gfid_n", 1))
        ax.annotate(f"p{int(r['model.patch_size'])}/{r['model.decoder_size']}" + (f" n={n}" if n > 1 else ""),
                    (r["gflops_total"], r["gfid"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        drawn += 1
    if "gfid_ci" in pts and pts["gfid_ci"].notna().any():  # 95 % t-interval over seeds
        ax.errorbar(pts["gflops_total"], pts["gfid"], yerr=pts["gfid_ci"].fillna(0.0), fmt="none", ecolor="0.4",
                    capsize=3, lw=0.8)
    if drawn and not ax.get_legend_handles_labels()[0]:
        ax.plot(pts["gflops_total"], pts["gfid"], "o")  # single points: nothing to connect
    return drawn


def fig8_gflops(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """Write ``fig8_gflops.{png,pdf}``; varying design columns other than decoder size and
    patch (split depth, SSL, ...) become panels.  ``with_paper``: Table 11's two system-level
    points (the paper's Fig. 8 values are not in its text)."""
    out = Output("fig8_gflops")
    df = prepare(runs)
    df = select(df, out, "a patch size and decoder size", df["tokens"].notna())
    if df.empty:
        return out
    facets = extra_keys(df, KEYS)
    agg = aggregate(df, facets + KEYS, METRICS)
    warn_missing(out, agg, facets + KEYS, METRICS)
    check_backbones(out, agg, METRICS)
    unknown = sorted(set(agg["model.decoder_size"].dropna()) - set(_SIZE_ORDER))
    if unknown:
        out.warn(f"unknown decoder sizes {unknown}; skipped")
        agg = agg[~agg["model.decoder_size"].isin(unknown)]
    groups = list(agg.groupby(facets, dropna=False)) if facets else [((), agg)]
    n = len(groups) + with_paper
    ncols = min(n, 4)  # wrap many panels (e.g. 5 split depths x 2 SSL settings) into rows
    fig, grid = plt.subplots(-(-n // ncols), ncols, figsize=(5.2 * ncols, 4.0 * -(-n // ncols)), squeeze=False,
                             layout="constrained")
    axes = grid.ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    drawn = 0
    for ax, (key, g) in zip(axes, groups):
        drawn += _panel(ax, g, df)
        key = key if isinstance(key, tuple) else (key,)
        sub = describe({**dict(zip(facets, key)), "stc": bool(g["stc"].iloc[0]) if len(g) else False}, facets)
        ax.set_title("Fig. 8: token vs decoder scaling" + (f"\n{sub}" if sub else ""), fontsize=9)
        ax.set_xlabel(metric_label("gflops_total", backbones(agg, "gflops_total")))
        ax.set_ylabel(metric_label("gfid", backbones(agg, "gfid")))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if with_paper:
        ax = axes[n - 1]
        p = paper_runs("table11")
        ax.plot(p["gflops_total"], p["gfid"], "s", mfc="none", label="paper (Table 11, w/o CFG)")
        for r in p.to_dict("records"):
            ax.annotate(r["paper_label"], (r["gflops_total"], r["gfid"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_title("paper, Table 11 (ImageNet 256², system level)", fontsize=9)
        ax.set_xlabel("tokenizer GFLOPs (paper, as reported)")
        ax.set_ylabel("gFID (paper)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        out.warn("the paper's Fig. 8 values are not in its text; its panel shows Table 11 only")
    if drawn == 0:
        plt.close(fig)
        out.warn("no run has both gfid and gflops_total; figure skipped")
        return out
    fig.supxlabel(CI_NOTE, fontsize=7)
    out.files += save_figure(fig, Path(out_dir), "fig8_gflops")
    return out
