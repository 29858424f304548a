"""Fig. 4: token scaling with staged token compression vs without (paper Sec. 3.3)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.common import Output, prepare, select
from analysis.fig3_naive_scaling import TOKENS_LABEL
from analysis.paper import paper_runs
from analysis.render import line_figure


def fig4_stc_scaling(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """Write ``fig4_stc_scaling.{png,pdf}``: gFID and rFID vs tokens, one line per split depth
    (``no STC`` = vanilla); other varying design columns become panels.

    ``with_paper``: Table 3 (no STC, ± SSL) and Table 2's STC rows (p=8, k=6).
    """
    out = Output("fig4_stc_scaling")
    df = prepare(runs)
    df = select(df, out, "a patch size and split depth", df["tokens"].notna())
    if df.empty:
        return out
    if not df["stc"].astype(bool).any():
        out.warn("no runs with staged compression (split_depth < encoder depth): only the no-STC lines")
    if df["stc"].astype(bool).all():
        out.warn("no runs without staged compression: no baseline line")
    paper = None
    if with_paper:
        t2 = prepare(paper_runs("table2"))
        paper = pd.concat([prepare(paper_runs("table3")), t2[t2["stc"]]], ignore_index=True)
    line_figure(out, df, "tokens", TOKENS_LABEL, ["k"], ["gfid", "rfid"], Path(out_dir), "fig4_stc_scaling",
                "Fig. 4: token scaling with staged compression", paper=paper, fit=True,
                paper_title="paper, Tables 2-3 (ImageNet 256², Inception FID)")
    return out
