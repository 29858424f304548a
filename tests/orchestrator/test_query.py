"""runs_table / metric_history / read-only SQL and the `query` / `status` commands."""
from __future__ import annotations

import hashlib
import io
import json

import pandas as pd
import pytest
from sqlalchemy import text

from orchestrator.db import Store
from orchestrator.ingest import ingest
from orchestrator.query import ReadOnlyViolation, check_read_only, metric_history, read_only_sql, runs_table


@pytest.fixture
def reader(db_url, monkeypatch):
    """PostgreSQL: a fresh SELECT-only reader role (``db grant-reader``) for SQL queries, named
    through $ORCHESTRATE_READER_ROLE; dropped afterwards.  SQLite needs none."""
    if not db_url.startswith("postgresql"):
        yield None
        return
    import uuid

    import sqlalchemy as sa

    from orchestrator.db.store import with_driver

    role = f"r_{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("ORCHESTRATE_READER_ROLE", role)
    eng = sa.create_engine(with_driver(db_url))
    yield lambda: _grant(eng, role)  # called once the tables exist
    with eng.connect() as c:
        c.exec_driver_sql(f"DROP OWNED BY {role}")
        c.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        c.commit()
    eng.dispose()


def _grant(eng, role):
    from orchestrator.db.readonly import grant_reader

    with eng.begin() as c:
        grant_reader(c, role, login=True)


@pytest.fixture
def filled(db_url, write_result, tmp_path, real_config, reader):
    """Two real runs of sweep `patch` (+ one failed run of sweep `other`), ingested."""
    (h4, c4), (h8, c8) = real_config(4), real_config(8)
    write_result(h4, "tokenizer", 1, sweep="patch", config=c4, params={"model.patch_size": 4},
                 metrics=[{"name": "train_loss", "value": 2.0, "step": 100},
                          {"name": "train_loss", "value": 1.5, "step": 200},
                          {"name": "gflops_total", "value": 0.3, "step": None}])
    write_result(h4, "evaluate", 1, sweep="patch", config=c4, params={"model.patch_size": 4},
                 metrics=[{"name": "rfid", "value": 40.0, "step": 200, "backbone": "embedded-featnet-v1",
                           "num_samples": 64}])
    write_result(h8, "tokenizer", 1, sweep="patch", config=c8, params={"model.patch_size": 8},
                 metrics=[{"name": "train_loss", "value": 3.0, "step": 200}])
    write_result("f" * 16, "tokenizer", 1, sweep="other", status="failed", metrics=[],
                 error={"type": "ValueError", "message": "bad lr", "log_tail": "..."})
    store = Store(db_url)
    store.upgrade()
    assert not ingest(store, [tmp_path / "runs"]).errors
    if reader:
        reader()
    yield store, h4, h8
    store.dispose()


def test_runs_table_one_row_per_run(filled):
    store, h4, h8 = filled
    df = runs_table(store, sweep="patch").sort_values("model.patch_size", ignore_index=True)
    assert list(df["run_hash"]) == [h4, h8] and list(df["sweep"]) == ["patch", "patch"]
    assert list(df.columns[:3]) == ["run_hash", "sweep", "status"]
    assert list(df["model.patch_size"]) == [4, 8] and list(df["optim.betas"]) == [(0.9, 0.95)] * 2
    assert list(df.columns[-6:]) == ["gflops_total", "gflops_total_backbone", "rfid", "rfid_backbone",
                                     "train_loss", "train_loss_backbone"]
    row4, row8 = df.iloc[0], df.iloc[1]
    assert row4["train_loss"] == 1.5  # value at the last step
    assert row4["rfid"] == 40.0 and row4["rfid_backbone"] == "embedded-featnet-v1"
    assert row8["train_loss"] == 3.0 and pd.isna(row8["rfid"])
    assert list(df["status"]) == ["finished", "finished"]

    only = runs_table(store, metrics=["rfid", "psnr"])
    assert len(only) == 3 and list(only.columns[-4:]) == ["rfid", "rfid_backbone", "psnr", "psnr_backbone"]
    assert only["psnr"].isna().all()
    failed = runs_table(store, status="failed")
    assert list(failed["run_hash"]) == ["f" * 16] and list(failed["sweep"]) == ["other"]
    assert runs_table(store, sweep="nothing").empty


def test_metric_history(filled):
    store, h4, _ = filled
    df = metric_history(store, ["train_loss"], sweep="patch")
    assert list(df.columns) == ["run_hash", "sweep", "stage", "name", "step", "value", "backbone"]
    assert [tuple(r) for r in df[df.run_hash == h4][["step", "value"]].itertuples(index=False)] == [
        (100, 2.0), (200, 1.5)]
    assert len(metric_history(store)) == 5


@pytest.mark.parametrize("sql", [
    "INSERT INTO sweeps (name, created_at) VALUES ('x', '2025-01-01')",
    "update runs set status = 'failed'",
    "DELETE FROM metrics",
    "DROP TABLE runs",
    "WITH x AS (SELECT 1) DELETE FROM runs",
    "SELECT 1; DELETE FROM runs",
    "PRAGMA journal_mode=DELETE",
    "ATTACH DATABASE '/tmp/x.db' AS x",
    "REPLACE INTO sweeps (id, name, created_at) VALUES (1, 'x', '2025')",
    "CREATE TABLE t (a int)",
    "ALTER TABLE runs ADD COLUMN x int",
])
def test_read_only_sql_refuses_writes(sqlite_url, tmp_path, run_cli, sql):
    store = Store(sqlite_url)
    store.upgrade()
    store.upsert_run("a" * 16, "s", {"x": 1})
    store.dispose()
    db = tmp_path / "results.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(ReadOnlyViolation):
        read_only_sql(sqlite_url, sql)
    out = run_cli("query", sql, "--db", sqlite_url)
    assert out.returncode == 2 and "query: error:" in out.stderr
    assert len(read_only_sql(sqlite_url, "SELECT * FROM runs")) == 1
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_read_only_check_ignores_literals_and_comments():
    # the statement that runs is re-generated from its parse tree (comments dropped)
    assert check_read_only("SELECT name FROM metrics WHERE name = 'delete' -- drop\n;") \
        == "SELECT name FROM metrics WHERE name = 'delete'"
    assert check_read_only("select replace(name, 'a', 'b') from sweeps")


def test_read_only_connection_refuses_writes_itself(db_url, reader):
    """Past the statement check, the connection itself cannot write (mode=ro / READ ONLY)."""
    store = Store(db_url)
    store.upgrade()
    if reader:
        reader()
    ro = Store(db_url, readonly=True)
    with pytest.raises(Exception, match="(?i)read.?only"):
        with ro.engine.begin() as c:
            c.execute(text("INSERT INTO sweeps (name, created_at) VALUES ('x', '2025-01-01')"))
    assert store.sweep_names() == []
    assert list(read_only_sql(db_url, "SELECT count(*) AS n FROM sweeps")["n"]) == [0]
    ro.dispose()
    store.dispose()


def test_query_command_formats(filled, run_cli):
    store, h4, h8 = filled
    out = run_cli("query", "--db", store.url, "--sweep", "patch", "--format", "csv")
    assert out.returncode == 0, out.stderr
    df = pd.read_csv(io.StringIO(out.stdout)).sort_values("model.patch_size")
    # constant config keys are dropped by default; the varying axis and the metrics stay
    assert list(df.columns[:4]) == ["run_hash", "sweep", "status", "model.patch_size"] and "data.image_size" not in df.columns
    assert list(df["train_loss"]) == [1.5, 3.0]
    out = run_cli("query", "--db", store.url, "--metrics", "rfid", "--columns", "run_hash,rfid", "--format", "json")
    rows = json.loads(out.stdout)
    assert out.returncode == 0 and {r["run_hash"]: r["rfid"] for r in rows}[h4] == 40.0
    out = run_cli("query", "SELECT run_hash, status FROM runs ORDER BY id", "--db", store.url)
    assert out.returncode == 0 and h4 in out.stdout and "status" in out.stdout
    out = run_cli("query", "--db", store.url, "--columns", "nope")
    assert out.returncode == 2 and "nope" in out.stderr
    out = run_cli("query", "SELECT * FROM nothere", "--db", store.url)
    assert out.returncode == 2 and "nothere" in out.stderr
    out = run_cli("query", "--columns", "all", "--db", store.url, "--format", "csv")
    assert "data.image_size" in out.stdout.splitlines()[0]


def test_status_command(filled, run_cli, tmp_path):
    store, h4, h8 = filled
    out = run_cli("status", "--db", store.url, "--no-refresh")
    assert out.returncode == 0, out.stderr
    assert "3 run(s): failed 1, finished 2" in out.stdout
    assert h4 in out.stdout and "tokenizer:finished" in out.stdout and "ValueError: bad lr" in out.stdout
    out = run_cli("status", "patch", "--db", store.url, "--limit", "1")
    assert out.returncode == 0 and "sweep patch: 2 run(s): finished 2" in out.stdout and "1 more run(s)" in out.stdout
    out = run_cli("status", "nope", "--db", store.url)
    assert out.returncode == 2 and "no sweep named 'nope'" in out.stderr
    out = run_cli("status", "--db", f"sqlite:///{tmp_path}/missing.db")
    assert out.returncode == 2 and "missing.db" in out.stderr
    assert not (tmp_path / "missing.db").exists()  # status never creates a database


def test_config_columns_equal_naive_flatten(db_url, write_result, tmp_path):
    """Delta storage (sweep base + per-run delta), runs from ingest, from upsert_run and without
    a delta give exactly the columns of flattening each run's full config."""
    from orchestrator.db.configs import apply_delta, config_delta, flatten

    base = {"model": {"patch_size": 4, "split": None}, "optim": {"betas": [0.9, 0.95], "lr": 1e-3}, "flag": True}
    variants = [base, {**base, "model": {"patch_size": 8, "split": 2}},
                {"model": {"patch_size": 4}, "optim": {"betas": [0.8, 0.9], "lr": 1}, "extra": "x"},
                {**base, "flag": 1}]  # int 1 is not bool True
    for i, cfg in enumerate(variants):
        write_result(f"{i:016x}", sweep="a" if i % 2 else "b", config=cfg)
    store = Store(db_url)
    store.upgrade()
    ingest(store, [tmp_path / "runs"])
    store.upsert_run("e" * 16, "a", {**base, "optim": {"betas": [1, 2], "lr": 5.0}})
    store.upsert_run("f" * 16, "c", base)
    with store.engine.begin() as c:  # a run without a delta (e.g. written by older code)
        c.execute(text("UPDATE runs SET config_delta = NULL WHERE run_hash = :h"), {"h": "f" * 16})
    configs = {r.run_hash: r.config for r in store.runs(with_config=True)}
    df = runs_table(store).set_index("run_hash")
    for h, cfg in configs.items():
        flat = flatten(cfg)
        row = {k: v for k, v in df.loc[h].items() if "." in k or k in ("flag", "extra")}
        expect = {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}
        got = {k: v for k, v in row.items() if not (v is None or (isinstance(v, float) and pd.isna(v)))}
        assert got == {k: v for k, v in expect.items() if v is not None}, h
    assert config_delta(flatten(variants[3]), flatten(base)) == {"flag": 1}  # 1 == True, but not the same value
    assert apply_delta(flatten(base), config_delta(flatten(variants[2]), flatten(base))) == flatten(variants[2])
    store.dispose()


def test_tree_delta_equals_flat_delta(real_config):
    """The ingest fast path (section-wise comparison) gives the exact flat delta."""
    import copy
    import random

    from orchestrator.db.configs import UNSET, apply_delta, config_delta, flatten, tree_delta, unflatten

    base = real_config(4)[1]
    flat_base = flatten(base)
    assert unflatten(flat_base) == base
    rng = random.Random(0)
    for _ in range(300):
        c = copy.deepcopy(base)
        for _ in range(rng.randint(0, 4)):
            secs = [k for k, v in c.items() if isinstance(v, dict) and v]
            sec = rng.choice(secs)
            key, r = rng.choice(list(c[sec])), rng.random()
            if r < 0.5:
                c[sec][key] = rng.choice([7, 2.5, "x", None, [1, 2], {"z": 1}])
            elif r < 0.7:
                del c[sec][key]
            elif r < 0.8:
                c[sec] = 3
            elif r < 0.9:
                c[sec]["new"] = {"deep": 1}
            else:
                del c[sec]
        fast, exact = tree_delta(c, base), config_delta(flatten(c), flat_base)
        assert sorted(fast.pop(UNSET, [])) == sorted(exact.pop(UNSET, [])) and fast == exact
        assert apply_delta(flat_base, tree_delta(c, base)) == flatten(c)
