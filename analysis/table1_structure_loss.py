"""Table 1: linear-probe accuracy before/after the bottleneck and structure loss vs patch
size, with and without staged compression (paper Sec. 3.3)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.common import Output, prepare, select
from analysis.paper import paper_runs
from analysis.render import cell_table

METRICS = ["gfid", "probe_acc_before", "probe_acc_after", "structure_loss"]


def table1_structure_loss(runs: pd.DataFrame, out_dir: Path, with_paper: bool = False) -> Output:
    """Write ``table1_structure_loss.{md,tex}``: one row per (patch, split depth) cell."""
    out = Output("table1_structure_loss")
    df = prepare(runs)
    df = select(df, out, "a patch size", df["tokens"].notna())
    if df.empty:
        return out
    paper = prepare(paper_runs("table1")) if with_paper else None
    cell_table(out, df, ["model.patch_size", "k"], METRICS, Path(out_dir), "table1_structure_loss",
               "Table 1: probe accuracy before/after the bottleneck and structure loss", paper=paper)
    return out
