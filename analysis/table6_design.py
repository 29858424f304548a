"""Table 6: the design space — split depth k (left) and SSL method (right)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.common import ABLATION_METRICS, Output, prepare, select
from analysis.paper import paper_runs
from analysis.render import cell_table


def table6_split_depth(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """``table6_split_depth.{md,tex}``: one row per split depth (k = depth: no STC).

    The paper's half has rFID, SSIM, IS w/o and w/ CFG; ours adds PSNR, LPIPS and gFID and has
    no guided IS (the generator reports one IS, at its configured ``generator.cfg_scale``).
    """
    out = Output("table6_split_depth")
    df = prepare(runs)
    paper = prepare(paper_runs("table6_split_depth")) if with_paper else None
    cell_table(out, df, ["k"], ABLATION_METRICS, Path(out_dir), "table6_split_depth",
               "Table 6 (left): split depth k of staged token compression", paper=paper)
    return out


def table6_ssl_method(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """``table6_ssl_method.{md,tex}``: one row per SSL method (runs with SSL)."""
    out = Output("table6_ssl_method")
    df = prepare(runs)
    df = select(df, out, "SSL on", df["ssl"] != "none")
    if df.empty:
        return out
    paper = prepare(paper_runs("table6_ssl_method")) if with_paper else None
    cell_table(out, df, ["ssl"], ABLATION_METRICS, Path(out_dir), "table6_ssl_method",
               "Table 6 (right): joint training with different SSL methods", paper=paper)
    return out
