"""Name -> figure/table function, with what each needs, and the driver that runs them all.

Every function takes the runs frame (``orchestrator.query.runs_table`` shape), an output
folder and ``with_paper``; Fig. 6 also takes the metric history, ``predictions`` the recorded
predictions (``orchestrator.query.predictions_table`` shape).  The frames are read by the
caller (``orchestrator.commands.figures.load_frames``): analysis imports no orchestrator.  Each returns an
:class:`analysis.common.Output` (files written + warnings) and never raises for missing
data.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from analysis.common import ABLATION_METRICS, Output
from analysis.fig3_naive_scaling import fig3_naive_scaling
from analysis.fig4_stc_scaling import fig4_stc_scaling
from analysis.fig6_convergence import NAMES as HISTORY_NAMES
from analysis.fig6_convergence import fig6_convergence
from analysis.fig8_gflops import fig8_gflops
from analysis.fits_table import fits
from analysis.joint import joint_fits
from analysis.paper import paper_table, table_names, load_paper_data
from analysis.predictions_table import predictions
from analysis.render import write_table
from analysis.table1_structure_loss import METRICS as TABLE1_METRICS
from analysis.table1_structure_loss import table1_structure_loss
from analysis.table6_design import table6_split_depth, table6_ssl_method
from analysis.tables_ablation import table2_stc, table3_ssl, table8_compression, table9_lambda_ssl, table10_channels


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Output]
    metrics: tuple[str, ...]  # metrics it reads
    history: bool = False  # also needs metric_history (per-step values)
    paper: str = ""  # paper tables it can draw beside the user's values
    recorded: bool = False  # also takes the recorded predictions


REGISTRY: dict[str, Entry] = {e.name: e for e in [
    Entry("fig3_naive_scaling", fig3_naive_scaling, ("rfid", "gfid"), paper="table3"),
    Entry("table1_structure_loss", table1_structure_loss, tuple(TABLE1_METRICS), paper="table1"),
    Entry("fig4_stc_scaling", fig4_stc_scaling, ("gfid", "rfid"), paper="table2, table3"),
    Entry("table2_stc", table2_stc, tuple(ABLATION_METRICS), paper="table2"),
    Entry("table3_ssl", table3_ssl, tuple(ABLATION_METRICS), paper="table3"),
    Entry("fig6_convergence", fig6_convergence, tuple(HISTORY_NAMES), history=True),
    Entry("fig8_gflops", fig8_gflops, ("gfid", "gflops_total"), paper="table11"),
    Entry("table6_split_depth", table6_split_depth, tuple(ABLATION_METRICS), paper="table6_split_depth"),
    Entry("table6_ssl_method", table6_ssl_method, tuple(ABLATION_METRICS), paper="table6_ssl_method"),
    Entry("table8_compression", table8_compression, tuple(ABLATION_METRICS), paper="table8"),
    Entry("table9_lambda_ssl", table9_lambda_ssl, tuple(ABLATION_METRICS), paper="table9"),
    Entry("table10_channels", table10_channels, tuple(ABLATION_METRICS), paper="table10"),
    Entry("fits", fits, ("rfid", "gfid", "gflops_total", "params_decoder"), paper="table3"),
    Entry("joint_fits", joint_fits, ("rfid", "gfid", "params_decoder", "gflops_total")),
    Entry("predictions", predictions, ("rfid", "gfid"), recorded=True),
]}


def write_paper_tables(out_dir: Path) -> Output:
    """Every paper table as printed (``paper/<table>.{md,tex}``), for reference."""
    out = Output("paper_tables")
    tables = load_paper_data()
    for name in table_names():
        frame = paper_table(name).rename(columns={"label": "row"})
        caption = f"Paper {tables[name]['source']}: {tables[name]['caption']} (as reported)"
        out.files += write_table(frame, Path(out_dir) / "paper", name, caption)
    return out


def generate(runs: pd.DataFrame, out_dir: str | Path, history: pd.DataFrame | None = None,
             with_paper: bool = False, only: list[str] | None = None,
             predictions: pd.DataFrame | None = None) -> list[Output]:
    """Run every registered function (or those in ``only``) on the frames.

    An unexpected exception in one function becomes a warning on its Output (with the
    exception), so one broken figure never stops the others.

    Raises
    ------
    KeyError
        naming the known entries when ``only`` names an unknown one.
    """
    out_dir = Path(out_dir)
    unknown = sorted(set(only or []) - set(REGISTRY))
    if unknown:
        raise KeyError(f"unknown figures/tables {unknown}; known: {sorted(REGISTRY)}")
    if history is None:
        history = pd.DataFrame(columns=["run_hash", "sweep", "stage", "name", "step", "value", "backbone"])
    outputs = []
    for entry in REGISTRY.values():
        if only and entry.name not in only:
            continue
        try:
            if runs.empty and not entry.history:
                out = Output(entry.name)
                out.warn("no runs in the database selection; skipped")
            elif entry.history:
                out = entry.fn(runs, history, out_dir, with_paper=with_paper)
            elif entry.recorded:
                out = entry.fn(runs, out_dir, with_paper=with_paper, recorded=predictions)
            else:
                out = entry.fn(runs, out_dir, with_paper=with_paper)
        except Exception as e:  # noqa: BLE001 - reported, never swallowed silently
            out = Output(entry.name)
            last = traceback.extract_tb(e.__traceback__)[-1]
            out.warn(f"failed: {type(e).__name__}: {e} ({Path(last.filename).name}:{last.lineno})")
        outputs.append(out)
    if with_paper:
        outputs.append(write_paper_tables(out_dir))
    return outputs
