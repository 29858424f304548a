"""The ``predictions`` table (revision 0004): append-only batched writes through Store and the
pandas reader the analysis uses, on SQLite and PostgreSQL."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from orchestrator.db import Store
from orchestrator.query import PREDICTION_COLUMNS, predictions_table


def _row(sweep, metric, value, **kw):
    target = json.dumps({"model.patch_size": 4, "model.split_depth": 2}, sort_keys=True)
    protocol = json.dumps({"backbone": "inception", "num_samples": 1000}, sort_keys=True)
    return {"batch": "b" * 32, "sweep": sweep, "target": target, "metric": metric, "protocol": protocol,
            "law": "E + A*T^-alpha", "params": {"E": [1.0, 0.5, 1.5], "alpha": [0.3, 0.2, 0.4]},
            "fit_on": "tokens<=256", "fit_runs": ["a" * 16, "b" * 16], "value": value,
            "lower": value - 1, "upper": value + 1, "level": 0.95, "code_version": "orchestrate 0.1", **kw}


def test_add_and_read_predictions(store):
    assert store.add_predictions([_row("s1", "rfid", 3.5), _row("s1", "gfid", 7.0), _row("s2", "rfid", 2.0)]) == 3
    assert store.add_predictions([_row(None, "rfid", 1.0, fit_on=None)]) == 1
    df = predictions_table(store)
    assert list(df.columns) == PREDICTION_COLUMNS and len(df) == 4
    assert list(df["value"]) == [3.5, 7.0, 2.0, 1.0]
    assert df["params"][0] == {"E": [1.0, 0.5, 1.5], "alpha": [0.3, 0.2, 0.4]}
    assert df["fit_runs"][0] == ["a" * 16, "b" * 16]
    assert json.loads(df["target"][0]) == {"model.patch_size": 4, "model.split_depth": 2}
    assert df["created_at"].notna().all() and str(df["created_at"].dt.tz) == "UTC"
    assert pd.isna(df["fit_on"][3]) and pd.isna(df["sweep"][3])
    only = predictions_table(store, sweep="s1", metric="rfid")
    assert list(only["value"]) == [3.5] and list(only["lower"]) == [2.5]
    # readers see them too (analysis opens the database read-only)
    ro = Store(store.url, readonly=True)
    assert len(predictions_table(ro, metric="rfid")) == 3
    ro.dispose()


def test_a_bad_row_writes_nothing(store):
    """One transaction: a row missing a required column rolls back the whole batch."""
    bad = _row("s1", "rfid", 1.0)
    del bad["law"]
    with pytest.raises(Exception):
        store.add_predictions([_row("s1", "rfid", 3.5), bad])
    assert predictions_table(store).empty
