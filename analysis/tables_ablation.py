"""Tables 2, 3, 8, 9, 10: the STC / SSL / compression-module / λ_ssl / latent-channel
ablations, each reporting rFID, PSNR, LPIPS, SSIM, gFID and IS."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.common import ABLATION_METRICS, Output, prepare, select
from analysis.paper import paper_runs
from analysis.render import cell_table


def _table(name: str, runs: pd.DataFrame, out_dir: Path, with_paper: bool, row_keys: list[str],
           caption: str, paper_table: str, what: str | None = None, mask=None) -> Output:
    out = Output(name)
    df = prepare(runs)
    if mask is not None:
        df = select(df, out, what, mask(df))
        if df.empty:
            return out
    paper = prepare(paper_runs(paper_table)) if with_paper else None
    cell_table(out, df, row_keys, ABLATION_METRICS, Path(out_dir), name, caption, paper=paper)
    return out


def table2_stc(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """``table2_stc.{md,tex}``: one row per (SSL, split depth) cell."""
    return _table("table2_stc", runs, out_dir, with_paper, ["ssl", "k"],
                  "Table 2: staged token compression with and without SSL", "table2")


def table3_ssl(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """``table3_ssl.{md,tex}``: SSL on/off per patch size, runs without STC."""
    return _table("table3_ssl", runs, out_dir, with_paper, ["model.patch_size", "ssl"],
                  "Table 3: self-supervision across patch sizes (no STC)", "table3",
                  "no staged compression", lambda df: ~df["stc"].astype(bool))


def table8_compression(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """``table8_compression.{md,tex}``: compression module, runs with STC (it has none without)."""
    return _table("table8_compression", runs, out_dir, with_paper, ["model.compression"],
                  "Table 8: compression module inside the encoder", "table8",
                  "staged compression (the module exists only with STC)", lambda df: df["stc"].astype(bool))


def table9_lambda_ssl(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """``table9_lambda_ssl.{md,tex}``: SSL loss weight, runs with SSL."""
    return _table("table9_lambda_ssl", runs, out_dir, with_paper, ["lambda_ssl"],
                  "Table 9: weight of the SSL loss", "table9", "SSL on", lambda df: df["ssl"] != "none")


def table10_channels(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """``table10_channels.{md,tex}``: latent channels × SSL × split depth."""
    return _table("table10_channels", runs, out_dir, with_paper, ["model.latent_channels", "ssl", "k"],
                  "Table 10: latent channels with STC / SSL", "table10")
