"""Shared pieces of the figure/table functions: normalised run frames, cell aggregation,
metric labels that name their backbone, missing-data warnings, and the
:class:`Output` record every function returns.

Input frames have the shape of ``orchestrator.query.runs_table``: one row per run with
``run_hash, sweep, status``, flattened config columns (``model.patch_size``, …), metric
columns and ``<metric>_backbone``.  :func:`prepare` adds the derived design columns the
paper's figures group by:

=============  ==========================================================================
``tokens``     image tokens per image, ``(image_size / patch_size)²``
``depth``      encoder depth: the tokenizer stage's ``encoder_depth`` metric (paper rows carry
               ``encoder_depth`` too); NaN for runs recorded before that metric existed
``k``          split depth with ``None`` (vanilla) normalised to ``depth``
``stc``        staged token compression on ⇔ ``k < depth``
``ssl``        ``ssl.method`` (``"none"`` when absent)
``lambda_ssl`` ``loss.ssl`` where SSL is on, else NaN (the weight is unused without SSL)
=============  ==========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.stats import t_halfwidth

# metric -> (axis/table label with units, better direction, decimals)
METRICS: dict[str, tuple[str, str, int]] = {
    "rfid": ("rFID", "↓", 2),
    "gfid": ("gFID", "↓", 2),
    "inception_score": ("IS", "↑", 2),
    "psnr": ("PSNR (dB)", "↑", 2),
    "ssim": ("SSIM", "↑", 3),
    "lpips": ("LPIPS", "↓", 3),
    "probe_acc_before": ("probe acc. before bottleneck (%)", "↑", 1),
    "probe_acc_after": ("probe acc. after bottleneck (%)", "↑", 1),
    "structure_loss": ("structure loss 1 − A_after/A_before", "↓", 2),
    "gflops_total": ("GFLOPs per image (tokenizer)", "", 1),
    "gflops_encoder": ("GFLOPs per image (encoder)", "", 1),
    "gflops_decoder": ("GFLOPs per image (decoder)", "", 1),
}
RECON_METRICS = ["rfid", "psnr", "lpips", "ssim"]
GEN_METRICS = ["gfid", "inception_score"]
ABLATION_METRICS = RECON_METRICS + GEN_METRICS  # the columns of Tables 2, 3, 6, 8-10

# Backbones whose numbers are the metric's standard definition; anything else is named.
STANDARD_BACKBONES = {"inception-v3-compat", "lpips-vgg16", "paper:inception-v3"}

# Design columns: varying ones that a function does not group by explicitly become extra
# keys (more lines / rows), so runs of different designs are never averaged together.
# Seeds are not design columns: runs differing only in seed are averaged (n shown).
DESIGN = [
    "data.name", "data.image_size", "model.encoder_size", "model.decoder_size",
    "model.patch_size", "k", "model.compression", "model.latent_size", "model.latent_channels",
    "ssl", "lambda_ssl", "loss.perceptual", "loss.adversarial", "finetune.enabled",
    "optim.lr", "train.steps", "generator.size", "generator.steps", "generator.cfg_scale",
]

_SHORT = {
    "data.name": "{v}", "data.image_size": "{v}px", "model.encoder_size": "enc {v}",
    "model.decoder_size": "dec {v}", "model.patch_size": "p={v}", "model.compression": "{v}",
    "model.latent_size": "h={v}", "model.latent_channels": "c={v}", "lambda_ssl": "λ_ssl={v}",
}


@dataclass
class Output:
    """What one figure/table function produced: files written and warnings."""

    name: str
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(f"{self.name}: {message}")


# ----------------------------------------------------------------------------- frames


def prepare(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``tokens, depth, k, stc, ssl, lambda_ssl`` (see module doc); returns a copy."""
    df = runs.copy()
    if df.empty:
        for col in ("tokens", "depth", "k", "k_frac", "stc", "ssl", "lambda_ssl"):
            df[col] = pd.Series(dtype=object)
        return df
    if "data.image_size" in df and "model.patch_size" in df:
        df["tokens"] = (df["data.image_size"].astype(float) / df["model.patch_size"].astype(float)) ** 2
    else:
        df["tokens"] = np.nan
    # The resolved depth comes from the database (analysis imports nothing from core/).
    df["depth"] = pd.to_numeric(df["encoder_depth"], errors="coerce") if "encoder_depth" in df else np.nan
    split = df["model.split_depth"] if "model.split_depth" in df else pd.Series([None] * len(df), index=df.index)
    split = pd.to_numeric(split.astype(object).where(split.notna(), np.nan), errors="coerce")
    df["k"] = split.fillna(df["depth"])
    # A set split depth below the depth is STC; with an unknown depth a set k counts as STC.
    df["stc"] = split.notna() & ~(split >= df["depth"])
    df["k_frac"] = df["k"] / df["depth"]  # compares k across encoder depths (paper: 12 layers)
    df["ssl"] = df["ssl.method"].fillna("none") if "ssl.method" in df else "none"
    lam = pd.to_numeric(df["loss.ssl"], errors="coerce") if "loss.ssl" in df else np.nan
    df["lambda_ssl"] = np.where(df["ssl"] != "none", lam, np.nan)
    for col in ("probe_acc_before", "probe_acc_after"):
        # Percent, as the paper prints them; the probe reports fractions in [0, 1].
        if col in df and df["sweep"].ne("paper").any():
            vals = pd.to_numeric(df[col], errors="coerce")
            mine = df["sweep"] != "paper"
            if vals[mine].dropna().le(1.0).all():
                df.loc[mine, col] = vals[mine] * 100.0
    return df


def extra_keys(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """Design columns that vary within ``df`` and are not among ``keys``.

    A missing value counts as a value of its own (a config key set in some runs only), except
    for ``lambda_ssl``, which is missing exactly where SSL is off (``ssl`` tells those apart).
    """
    out = []
    for col in DESIGN:
        if col in df and col not in keys and df[col].astype(object).nunique(dropna=col == "lambda_ssl") > 1:
            out.append(col)
    return out


def describe(values: dict, cols: list[str]) -> str:
    """Short label of a cell, e.g. ``p=8, STC k=6, SSL ibot``."""
    parts = []
    for col in cols:
        v = values.get(col)
        if col == "k":
            parts.append("no STC" if pd.isna(v) or not values.get("stc", True) else f"STC k={int(v)}")
        elif col == "ssl":
            parts.append("no SSL" if v == "none" else f"SSL {v}")
        elif col == "lambda_ssl" and pd.isna(v):
            continue
        else:
            v = int(v) if isinstance(v, float) and v.is_integer() else v
            parts.append(_SHORT.get(col, col.split(".")[-1] + "={v}").format(v=v))
    return ", ".join(parts)


def aggregate(df: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, spread and count of each metric per cell (runs differing only in seed are one cell).

    Returns one row per cell: the key columns, ``stc``, ``runs`` (comma-joined run hashes),
    ``run_hashes`` (list), ``n``, and per metric ``<m>`` (mean), ``<m>_std``, ``<m>_ci`` (half-width of the 95 %
    t-interval of the mean, :func:`analysis.stats.t_halfwidth`; NaN for n < 2), ``<m>_n``,
    ``<m>_backbone``.
    """
    rows = []
    if df.empty:
        return pd.DataFrame(columns=[*keys, "stc", "runs", "n"])
    for cell, group in df.groupby(keys, dropna=False, sort=True):
        cell = cell if isinstance(cell, tuple) else (cell,)
        row = dict(zip(keys, cell))
        row["stc"] = bool(group["stc"].iloc[0]) if "stc" in group else False
        row["runs"] = ",".join(str(h)[:8] for h in group["run_hash"])
        row["run_hashes"] = list(group["run_hash"])  # the raw rows of the cell (scaling-law fits)
        row["n"] = len(group)
        for m in metrics:
            vals = pd.to_numeric(group[m], errors="coerce") if m in group else pd.Series(dtype=float)
            vals = vals.dropna()
            row[m] = vals.mean() if len(vals) else np.nan
            row[f"{m}_std"] = vals.std(ddof=1) if len(vals) > 1 else np.nan
            row[f"{m}_ci"] = t_halfwidth(vals)
            row[f"{m}_n"] = len(vals)
            bb = group.get(f"{m}_backbone")
            row[f"{m}_backbone"] = ",".join(sorted({str(b) for b in bb.dropna()})) if bb is not None else ""
        rows.append(row)
    return pd.DataFrame(rows)


def backbones(agg: pd.DataFrame, metric: str) -> list[str]:
    col = f"{metric}_backbone"
    if col not in agg:
        return []
    return sorted({b for s in agg[col].dropna() for b in str(s).split(",") if b})


def metric_label(metric: str, used_backbones: list[str] | None = None) -> str:
    """Axis/column label with units; names the backbone unless it is the standard one.

    ``metric_label("rfid", ["embedded-featnet-v1"]) == "rFID [embedded-featnet-v1]"`` so a
    proxy FID never reads as Inception FID.
    """
    label = METRICS.get(metric, (metric, "", 2))[0]
    odd = [b for b in (used_backbones or []) if b not in STANDARD_BACKBONES]
    return f"{label} [{', '.join(used_backbones)}]" if odd else label


def check_backbones(out: Output, agg: pd.DataFrame, metrics: list[str]) -> None:
    for m in metrics:
        used = backbones(agg, m)
        if len(used) > 1:
            out.warn(f"{m} mixes backbones {used}: values from different backbones are not comparable")


def warn_missing(out: Output, agg: pd.DataFrame, keys: list[str], metrics: list[str]) -> None:
    """One warning per metric naming the cells (and runs) where it has no value."""
    for m in metrics:
        if m not in agg:
            continue
        holes = agg[agg[f"{m}_n"] == 0] if f"{m}_n" in agg else agg[agg[m].isna()]
        if len(holes):
            cells = "; ".join(f"{describe(r, keys) or 'all'} (runs {r['runs']})" for r in holes.to_dict("records"))
            out.warn(f"{m} missing for {cells}")


def warn_grid(out: Output, agg: pd.DataFrame, line_keys: list[str], x: str, xlabel: str) -> None:
    """Warn about (line, x) cells absent from the observed grid, e.g. one decoder lacks p=32."""
    if agg.empty:
        return
    xs = sorted(agg[x].dropna().unique())
    groups = agg.groupby(line_keys, dropna=False) if line_keys else [((), agg)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        have = set(group[x].dropna())
        lacking = [v for v in xs if v not in have]
        if lacking:
            name = describe({**dict(zip(line_keys, key)), "stc": group["stc"].iloc[0]}, line_keys) or "all runs"
            out.warn(f"no run for {name} at {xlabel} {', '.join(_fmt_num(v) for v in lacking)}")


def select(df: pd.DataFrame, out: Output, what: str, mask: pd.Series) -> pd.DataFrame:
    """Rows where ``mask`` holds; warns (naming ``what``) when none do."""
    sel = df[mask.fillna(False).astype(bool)] if len(df) else df
    if sel.empty:
        out.warn(f"no runs with {what}; skipped")
    return sel


def _fmt_num(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def fmt_value(metric: str, mean: float, half: float = np.nan, n: int = 1) -> str:
    """``12.34`` or ``12.34 ± 0.56`` (``half``: 95 % CI half-width, shown when n > 1);
    empty for a missing value."""
    if pd.isna(mean):
        return ""
    if isinstance(mean, str):
        return mean
    dec = METRICS.get(metric, ("", "", 2))[2]
    text = f"{mean:.{dec}f}"
    if n and n > 1 and pd.notna(half):
        text += f" ± {half:.{dec}f}"
    return text


def fmt_half(metric: str, half: float) -> str:
    """The ± column of a table: ``0.56`` (95 % CI half-width), empty without an interval."""
    if pd.isna(half):
        return ""
    return f"{half:.{METRICS.get(metric, ('', '', 2))[2]}f}"
