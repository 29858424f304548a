"""Read the results database into pandas tables.

* :func:`runs_table` — one row per run: ``run_hash, sweep, status`` + one column per
  flattened config key (``model.patch_size``) + one column per metric (its value at the
  last step of the loaded attempt) + ``<metric>_backbone``.
* :func:`metric_history` — every metric row: ``run_hash, sweep, stage, name, step, value, backbone``.
* :func:`predictions_table` — recorded scaling-law predictions, one row each.
* :func:`read_only_sql` — one read-only statement, enforced by the database
  (``orchestrator.db.readonly``).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import pandas as pd
from sqlalchemy import Text, case, cast, select

from orchestrator.db import fastjson
from orchestrator.db.configs import UNSET, flatten
from orchestrator.db.models import Metric, Prediction, Run, RunStage, Sweep
from orchestrator.db.readonly import (DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S, QueryTimeout,  # noqa: F401
                                       ReadOnlyViolation, check_statement, run_statement)
from orchestrator.db.store import Store

BASE_COLUMNS = ["run_hash", "sweep", "status"]


def _fetch(store: Store, q) -> list[tuple]:
    """Rows of a Core select as plain tuples straight from the driver cursor: result-row
    processing costs more than the query itself at 100k metric rows (summary hot path)."""
    store.check_schema()
    with store.engine.connect() as conn:
        c = q.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        params = c.construct_params()
        args = [params[k] for k in c.positiontup] if c.positional else params
        cur = conn.connection.dbapi_connection.cursor()
        try:
            cur.execute(str(c), args)
            return cur.fetchall()
        finally:
            cur.close()


def _metric_rows(store: Store, names: Sequence[str] | None, sweep: str | None) -> pd.DataFrame:
    q = (select(Run.run_hash, Sweep.name.label("sweep"), Metric.stage, Metric.name, Metric.step,
                Metric.value, Metric.backbone)
         .join(Run, Metric.run_id == Run.id).join(Sweep, Run.sweep_id == Sweep.id))
    if names:
        q = q.where(Metric.name.in_(list(names)))
    if sweep is not None:
        q = q.where(Sweep.name == sweep)
    rows = _fetch(store, q.order_by(Metric.id))
    df = pd.DataFrame(rows, columns=["run_hash", "sweep", "stage", "name", "step", "value", "backbone"])
    df["step"] = df["step"].astype("Int64")
    df["value"] = df["value"].astype(float)
    return df


def metric_history(store: Store, names: Sequence[str] | None = None, sweep: str | None = None) -> pd.DataFrame:
    """All metric rows of the loaded attempts, sorted by run, name, step.

    Returns
    -------
    DataFrame with columns ``run_hash, sweep, stage, name, step, value, backbone``.
    """
    df = _metric_rows(store, names, sweep)
    return df.sort_values(["run_hash", "name", "step"], na_position="first", kind="stable").reset_index(drop=True)


PREDICTION_COLUMNS = ["id", "created_at", "batch", "sweep", "target", "metric", "protocol", "law", "params",
                      "fit_on", "fit_runs", "value", "lower", "upper", "level", "code_version"]


def predictions_table(store: Store, sweep: str | None = None, metric: str | None = None) -> pd.DataFrame:
    """Recorded predictions (table ``predictions``), oldest first, optionally filtered.

    Returns
    -------
    DataFrame with columns ``PREDICTION_COLUMNS``; ``params`` and ``fit_runs`` decoded from JSON,
    ``target`` and ``protocol`` kept as their canonical JSON text (comparable with ``==``),
    ``created_at`` tz-aware UTC; a missing ``sweep`` / ``fit_on`` reads as NA.
    """
    q = select(*(getattr(Prediction, c) for c in PREDICTION_COLUMNS))
    if sweep is not None:
        q = q.where(Prediction.sweep == sweep)
    if metric is not None:
        q = q.where(Prediction.metric == metric)
    store.check_schema()
    with store.engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(q.order_by(Prediction.id))]
    df = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True)  # SQLite hands back naive UTC
    for c in ("value", "lower", "upper", "level"):
        df[c] = df[c].astype(float)
    return df


def _tuples(v: Any) -> Any:
    return tuple(v) if type(v) is list else v  # hashable cells (groupby, drop_duplicates)


def config_columns(sweep_ids: list, deltas: list, bases: dict[Any, dict]) -> dict[str, list]:
    """Flattened config columns of many runs from their sweeps' base configs and their deltas
    (see ``orchestrator.db.configs``): one C-speed ``map`` per key, then the few differing
    cells.  ``bases[sweep_id]`` is the flat base; a run whose delta is its whole flat config
    uses a sweep id with base ``{}``."""
    keys: dict[str, None] = {}
    for base in bases.values():
        keys.update(dict.fromkeys(base))
    for d in deltas:
        if len(d) and d.keys() - keys.keys():
            keys.update(dict.fromkeys(k for k in d if k != UNSET))
    cols = {}
    for k in keys:
        per_sweep = {sid: _tuples(base.get(k)) for sid, base in bases.items()}
        cols[k] = list(map(per_sweep.__getitem__, sweep_ids))
    for i, d in enumerate(deltas):
        for k, v in d.items():
            if k == UNSET:
                for kk in v:
                    cols[kk][i] = None
            else:
                cols[k][i] = _tuples(v)
    return cols


def runs_table(store: Store, sweep: str | None = None, metrics: Sequence[str] | None = None,
               status: str | None = None) -> pd.DataFrame:
    """One row per run (see the module docstring), oldest run first.

    Parameters
    ----------
    sweep : only this sweep's runs.
    metrics : metric names to include (default: every metric present); a requested metric
        that no run has is an all-NaN column.
    status : only runs in this state.
    """
    # Deltas (small) for every run; the full config only where a run has no delta.
    q = (select(Run.id, Run.run_hash, Sweep.name, Run.status, Run.sweep_id, cast(Run.config_delta, Text),
                case((Run.config_delta.is_(None), cast(Run.config, Text)), else_=None))
         .join(Sweep, Run.sweep_id == Sweep.id))
    if sweep is not None:
        q = q.where(Sweep.name == sweep)
    if status is not None:
        q = q.where(Run.status == status)
    runs = _fetch(store, q.order_by(Run.id))
    ids, hashes, sweeps, statuses, sids, deltas, fulls = (list(c) for c in zip(*runs)) if runs else ([],) * 7
    bases = {sid: json.loads(text or "{}") for sid, text in _fetch(
        store, select(Sweep.id, cast(Sweep.base_config, Text)).where(Sweep.id.in_(set(sids))))} if sids else {}
    # One json.loads over all deltas (not one per run).
    deltas = fastjson.loads("[" + ",".join(d or "{}" for d in deltas) + "]")
    for i, full in enumerate(fulls):
        if full is not None:  # no delta stored: the whole flat config, over an empty base
            sids[i], deltas[i] = None, flatten(json.loads(full))
            bases[None] = {}
    table = pd.DataFrame({"run_hash": hashes, "sweep": sweeps, "status": statuses,
                          **config_columns(sids, deltas, bases)})

    # Stages reused from another run (run_stages.source_id): that run's metrics of the stage
    # belong to this row too (stored once, read everywhere).
    src = RunStage.__table__.alias("src")
    q = (select(RunStage.run_id, RunStage.stage, src.c.run_id).join(src, RunStage.source_id == src.c.id))
    if sweep is not None:
        q = q.join(Run, Run.id == RunStage.run_id).join(Sweep, Run.sweep_id == Sweep.id).where(Sweep.name == sweep)
    shared: dict[tuple[int, str], list[int]] = {}
    for rid, stage, owner in _fetch(store, q):
        shared.setdefault((owner, stage), []).append(rid)
    # Metrics: value at the last step (a null step counts as the earliest; ties: the later row).
    q = select(Metric.run_id, Metric.name, Metric.step, Metric.value, Metric.backbone, Metric.stage)
    if metrics:
        q = q.where(Metric.name.in_(list(metrics)))
    if sweep is not None:
        mine = select(Run.id).join(Sweep, Run.sweep_id == Sweep.id).where(Sweep.name == sweep)
        q = q.where(Metric.run_id.in_(mine) if not shared else
                    Metric.run_id.in_(mine) | Metric.run_id.in_(sorted({o for o, _ in shared})))
    last: dict[str, dict[int, tuple]] = {}  # name -> run id -> (step, value, backbone)
    for rid, name, step, value, backbone, stage in _fetch(store, q.order_by(Metric.id)):
        per_run = last.setdefault(name, {})
        for r in (rid, *shared.get((rid, stage), ())):
            prev = per_run.get(r)
            if prev is None or step is not None and (prev[0] is None or step >= prev[0]):
                per_run[r] = (step, value, backbone)
    names = list(metrics) if metrics else sorted(last)
    nothing = (None, float("nan"), None)
    for n in names:  # psnr, psnr_backbone, ssim, ... (dict lookups per run: no pivot)
        per_run = last.get(n, {})
        cells = [per_run.get(rid, nothing) for rid in ids]
        table[n] = pd.Series([c[1] for c in cells], dtype=float)
        table[f"{n}_backbone"] = [c[2] for c in cells]
    return table


# ----------------------------------------------------------------------------- read-only SQL


def check_read_only(sql: str, dialect: str = "sqlite") -> str:
    """The text that would run for ``sql`` if it is one read-only query, else raise
    :class:`ReadOnlyViolation` (see ``orchestrator.db.readonly.check_statement``)."""
    return check_statement(sql, dialect)


def read_only_sql(url: str, sql: str, timeout_s: float = DEFAULT_TIMEOUT_S, max_rows: int = DEFAULT_MAX_ROWS,
                  role: str | None = None) -> pd.DataFrame:
    """Run one read-only statement and return its rows (at most ``max_rows``).

    Enforced by the database (``orchestrator.db.readonly``): one parsed query re-generated
    from its parse tree; PostgreSQL as the SELECT-only reader role (``orchestrate db
    grant-reader``) in read-only sessions with ``statement_timeout``; SQLite opened
    ``mode=ro`` + ``query_only`` with a time budget and a heap limit.

    Raises
    ------
    ReadOnlyViolation
        for a statement that could write, several statements, or a PostgreSQL database
        without the reader role (exit code 2 in the CLI).
    QueryTimeout
        when it runs past ``timeout_s`` seconds (or SQLite's heap limit).
    ValueError
        for SQL the database rejects (syntax error, unknown table), with its message.
    FileNotFoundError
        for a SQLite URL whose file does not exist.
    """
    res = run_statement(url, sql, timeout_s=timeout_s, max_rows=max_rows, role=role)
    df = pd.DataFrame(res.rows, columns=res.columns)
    df.attrs["truncated"] = res.truncated
    return df
