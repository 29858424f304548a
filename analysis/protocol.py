"""Evaluation protocols: which runs' rFID/gFID may share a fit, a prediction or a figure line.

Two FIDs are comparable only when measured the same way: the feature backbone (the name the
metric row carries, which also names the weights: ``inception-v3-compat`` is the
torch-fidelity ``pt_inception-2015-12-05`` file, ``embedded-featnet-v1`` the project's own
network) and the Inception weights file, the reference statistics (gFID: the
``eval.fid_reference`` npz, e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``, or the balanced
validation subset), the number of samples, and the seed of the subsets.  A line that mixes
protocols is split into one series per protocol (:func:`protocol_column`); a prediction for
a configuration measured under another protocol is refused, naming the difference
(:func:`difference`).
"""
from __future__ import annotations

import json
from pathlib import PurePath

import pandas as pd

# metric -> {protocol field: config column}; the backbone comes from ``<metric>_backbone``
FIELDS = {
    "rfid": {"weights": "eval.inception_weights", "num_samples": "eval.num_samples",
             "subset_seed": "eval.subset_seed"},
    "gfid": {"weights": "eval.inception_weights", "reference": "eval.fid_reference",
             "num_samples": "generator.num_samples", "subset_seed": "eval.subset_seed"},
}
FIELDS["inception_score"] = {k: v for k, v in FIELDS["gfid"].items() if k != "reference"}


def _norm(field: str, value) -> object:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return {"reference": "validation subset"}.get(field)
    if field in ("weights", "reference"):
        return PurePath(str(value)).name  # the file, not where one machine keeps it
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def protocol(row, metric: str) -> dict:
    """The protocol of one run's ``metric`` (a runs-table row or dict); {} for other metrics."""
    if metric not in FIELDS:
        return {}
    get = row.get if hasattr(row, "get") else (lambda k, d=None: d)
    out = {"backbone": get(f"{metric}_backbone")}
    if out["backbone"] is None or (isinstance(out["backbone"], float) and pd.isna(out["backbone"])):
        out["backbone"] = None
    for field, col in FIELDS[metric].items():
        out[field] = _norm(field, get(col))
    if out["backbone"] and not str(out["backbone"]).startswith("inception"):
        out.pop("weights")  # the weights file is unused by the other backbones
    return out


def canonical(p: dict) -> str:
    return json.dumps(p, sort_keys=True, default=str)


def protocol_column(df: pd.DataFrame, metric: str) -> pd.Series:
    """Canonical JSON of each row's protocol for ``metric`` (one string per row)."""
    return pd.Series([canonical(protocol(r, metric)) for r in df.to_dict("records")], index=df.index, dtype=object)


def difference(a: str | dict, b: str | dict) -> str:
    """``num_samples 512 vs 50000; reference validation subset vs VIRTUAL_imagenet256_labeled.npz``."""
    a = json.loads(a) if isinstance(a, str) else a
    b = json.loads(b) if isinstance(b, str) else b
    return "; ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def short(p: str | dict, others: list) -> str:
    """The fields of ``p`` that differ among ``others`` (all protocols of a line), for a label."""
    p = json.loads(p) if isinstance(p, str) else p
    others = [json.loads(o) if isinstance(o, str) else o for o in others]
    keys = sorted(k for k in p if len({str(o.get(k)) for o in others}) > 1)
    return ", ".join(f"{k}={p[k]}" for k in keys)
