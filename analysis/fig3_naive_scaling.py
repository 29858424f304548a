"""Fig. 3: naive token scaling — rFID and gFID vs image tokens, one line per tokenizer size,
no staged compression (paper Sec. 3.2)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.common import Output, prepare, select
from analysis.paper import paper_runs
from analysis.render import line_figure

TOKENS_LABEL = "tokens per image (H/p)²"


def fig3_naive_scaling(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """Write ``fig3_naive_scaling.{png,pdf}`` from the runs without STC.

    Lines: encoder-decoder size; other varying design columns (e.g. SSL) become panels.
    ``with_paper``: Table 3's w/o-SSL rows (the paper's Fig. 3 values are not in its text).
    """
    out = Output("fig3_naive_scaling")
    df = prepare(runs)
    df = select(df, out, "no staged compression (split_depth = encoder depth)", ~df["stc"].astype(bool))
    if df.empty:
        return out
    paper = None
    if with_paper:
        p = prepare(paper_runs("table3"))
        paper = p[p["ssl"] == "none"]
    line_figure(out, df, "tokens", TOKENS_LABEL, ["model.encoder_size", "model.decoder_size"], ["rfid", "gfid"],
                Path(out_dir), "fig3_naive_scaling", "Fig. 3: naive token scaling (no STC)", paper=paper, fit=True,
                paper_title="paper, Table 3 w/o SSL (ImageNet 256², Inception FID)")
    return out
