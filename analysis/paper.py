"""The paper's reported numbers (analysis/paper_data.yaml) as read-only reference data.

Two views:

* :func:`paper_table` — one table as printed: ``label`` + the paper's metric columns.
* :func:`paper_runs` — the same rows shaped like ``orchestrator.query.runs_table`` (flattened
  config columns + metric columns + ``<metric>_backbone``, ``sweep = "paper"``,
  ``status = "reference"``), so every figure/table function can draw the paper's rows with
  the code that draws the user's.

Paper rows never enter the user's frames: they carry ``run_hash = "paper:<table>:<i>"`` and
the backbone ``paper:inception-v3`` (ImageNet 256², Inception FID as reported, not re-measured).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

PAPER_DATA = Path(__file__).with_name("paper_data.yaml")
PAPER_SWEEP = "paper"

# Metrics that carry a backbone in the contract (docs/ARCHITECTURE.md, "backbone").
_BACKBONE_METRICS = {"rfid", "gfid", "gfid_cfg", "inception_score", "inception_score_cfg", "lpips"}


class PaperDataError(ValueError):
    """The reference file is malformed; the message names the table and the row."""


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    return yaml.safe_load(PAPER_DATA.read_text())


@lru_cache(maxsize=4)
def load_paper_data(path: str | Path = PAPER_DATA) -> dict[str, Any]:
    """Parse and check the reference file; returns its ``tables`` mapping.

    Raises
    ------
    PaperDataError
        naming the table and row when a row has no metrics or uses a metric that its
        table's ``columns`` do not declare.
    """
    doc = yaml.safe_load(Path(path).read_text())
    tables = doc.get("tables") or {}
    for name, table in tables.items():
        declared = set((table.get("columns") or {}).values())
        for i, row in enumerate(table.get("rows") or []):
            metrics = row.get("metrics")
            if not metrics:
                raise PaperDataError(f"{path}: table {name!r} row {i}: no metrics")
            unknown = set(metrics) - declared
            if unknown:
                raise PaperDataError(f"{path}: table {name!r} row {i}: metrics {sorted(unknown)} not in columns")
    return tables


def table_names() -> list[str]:
    return list(load_paper_data())


def paper_table(name: str) -> pd.DataFrame:
    """One paper table as printed: ``label`` then its metric columns in paper order.

    Raises
    ------
    KeyError
        naming the known tables when ``name`` is not one.
    """
    tables = load_paper_data()
    if name not in tables:
        raise KeyError(f"no paper table {name!r}; known: {sorted(tables)}")
    table = tables[name]
    metrics = list(table["columns"].values())
    rows = [{"label": str(r["label"]), **{m: r["metrics"].get(m) for m in metrics}} for r in table["rows"]]
    return pd.DataFrame(rows, columns=["label", *metrics])


def paper_runs(name: str) -> pd.DataFrame:
    """One paper table shaped like ``runs_table``: config columns, metrics, backbones.

    Config columns come from the file's ``defaults`` (what the paper states for all of its
    experiments), the table's ``setting`` and each row's ``config``; a config key the paper
    does not state is absent (NaN), never guessed.  ``split_depth`` None = no STC, as in ours.
    """
    tables = load_paper_data()
    if name not in tables:
        raise KeyError(f"no paper table {name!r}; known: {sorted(tables)}")
    table = tables[name]
    doc = _document()
    backbone = doc.get("fid_backbone", "paper:inception-v3")
    rows = []
    for i, r in enumerate(table["rows"]):
        row: dict[str, Any] = {"run_hash": f"paper:{name}:{i}", "sweep": PAPER_SWEEP, "status": "reference",
                               "paper_label": str(r["label"]), "paper_suspect": bool(r.get("suspect", False))}
        row["encoder_depth"] = int(doc.get("encoder_depth", 12))
        row.update(doc.get("defaults") or {})
        row.update(table.get("setting") or {})
        row.update(r.get("config") or {})
        for metric, value in r["metrics"].items():
            row[metric] = value
            if metric in _BACKBONE_METRICS and value is not None:
                row[f"{metric}_backbone"] = backbone
        rows.append(row)
    return pd.DataFrame(rows)


def structure_loss_from_accuracy(before: float, after: float) -> float:
    """Structure loss 1 − acc_after / acc_before (paper Sec. 3.3)."""
    return 1.0 - after / before

